"""AnnotatorService: LLM annotators (``api``, ``model``) in Ray actors, and building any annotator
from the ``annotator`` config group.

Each actor holds one :class:`~trace_rl.annotate.llm.LLMAnnotator` (its own HTTP client with its own
concurrency bound, or its own copy of a frozen model). :meth:`AnnotatorService.annotate_batch` splits
a batch into contiguous chunks, one per actor, and joins the results in order. An actor that dies or
times out costs only its chunk: those responses get ``skipped="annotator_error"`` (counted as
``annotate/actor_failures``), the actor is replaced, and training goes on.

The API key is read once, in the driver, from the environment variable named by ``api_key_env``
and handed to the actors as a :class:`~trace_rl.annotate.llm.Secret` (its ``repr`` is masked), so
actors on other nodes need no copy of the driver's environment and the key is in no runtime_env,
log or file.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Sequence

from trace_rl.annotate.base import Annotation, get_annotator
from trace_rl.annotate.llm import _API_OPTS, _ANNOTATOR_OPTS, _MODEL_OPTS, Item, read_api_key

log = logging.getLogger(__name__)

SERVICE_KINDS = ("api", "model")


class AnnotatorActor:
    """One annotator inside a Ray actor (wrapped with ``ray.remote`` by the service)."""

    def __init__(self, kind: str, options: dict[str, Any], num_threads: int = 1):
        import os

        if kind == "model":
            import torch

            torch.set_num_threads(max(1, int(num_threads)))
        self.annotator = get_annotator(kind, **options)
        self.pid = os.getpid()

    def ready(self) -> int:
        return self.pid

    def annotate_batch(self, items: list[Item]) -> tuple[list[Annotation], dict[str, float]]:
        return self.annotator.annotate_batch(items), self.annotator.stats()

    def stats(self) -> dict[str, float]:
        return self.annotator.stats()


class AnnotatorService:
    """``num_actors`` Ray actors running annotator ``kind`` (``api`` or ``model``) with ``options``
    (those of :func:`~trace_rl.annotate.llm.api_annotator` / ``model_annotator``).
    ``batch_timeout_s``: the longest wait for one actor's chunk (None: no limit)."""

    def __init__(self, kind: str, *, num_actors: int = 2, options: dict[str, Any] | None = None,
                 cpus_per_actor: float = 1, gpus_per_actor: float = 0.0, batch_timeout_s: float | None = None,
                 placement: Any = None):
        """``placement``: a :class:`trace_rl.placement.Placement` with ``annotator`` slots; the actors (and
        their replacements) then go to free bundles of its annotator group instead of anywhere."""
        import ray

        if kind not in SERVICE_KINDS:
            raise ValueError(f"AnnotatorService runs annotator.kind in {SERVICE_KINDS}, not {kind!r}: oracle, random "
                             f"and none run in the driver, and self uses the rollout pool "
                             f"(get_annotator('self', generate=pool_text_generate(...)))")
        if int(num_actors) < 1:
            raise ValueError(f"annotator.num_actors={num_actors} must be >= 1 for an AnnotatorService")
        options = dict(options or {})
        if kind == "api" and options.get("api_key") is None:
            options["api_key"] = read_api_key(options.pop("api_key_env", None))
        options.pop("api_key_env", None)
        if kind == "api":
            get_annotator("api", **options)  # cheap: a bad option fails here, named, before any actor starts
        self.kind, self.options = kind, options
        self.batch_timeout_s = batch_timeout_s
        if placement is None:
            self._cls = ray.remote(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)(AnnotatorActor)
        else:
            if placement.count("annotator") < int(num_actors):
                raise ValueError(f"the placement plan has {placement.count('annotator')} annotator slot(s) for "
                                 f"annotator.num_actors={num_actors}; build it from the same config")
            self._cls = ray.remote(AnnotatorActor).options(**placement.any_bundle_options("annotator"))
        self._threads = max(1, int(cpus_per_actor))
        self.actors = [self._start() for _ in range(int(num_actors))]
        try:
            ray.get([a.ready.remote() for a in self.actors])
        except Exception:
            self.shutdown()
            raise
        self._snapshots: list[dict[str, float]] = [{} for _ in self.actors]
        self._retired: Counter = Counter()
        self._counts: Counter = Counter()

    def _start(self):
        return self._cls.remote(self.kind, self.options, self._threads)

    # -------------------------------------------------------------- annotate
    def __call__(self, problem, response: str, correct: bool) -> Annotation:
        return self.annotate_batch([(problem, response, correct)])[0]

    def annotate_batch(self, items: Sequence[Item]) -> list[Annotation]:
        """One annotation per ``(problem, response_text, correct)``, in order, the work split across the actors."""
        import ray

        items = list(items)
        n, k = len(items), len(self.actors)
        bounds = [(i * n // k, (i + 1) * n // k) for i in range(k)]
        refs = [(a, s, e, self.actors[a].annotate_batch.remote(items[s:e])) for a, (s, e) in enumerate(bounds) if e > s]
        out: list[Annotation] = [Annotation(skipped="annotator_error")] * n
        for a, s, e, ref in refs:
            try:
                anns, snapshot = ray.get(ref, timeout=self.batch_timeout_s)
            except ray.exceptions.RayError as err:
                log.warning("annotator actor %d failed on %d responses (%s); replacing it", a, e - s, type(err).__name__)
                self._counts["actor_failures"] += 1
                self._counts["annotator_errors"] += e - s
                self._replace(a)
                continue
            if len(anns) != e - s:
                log.warning("annotator actor %d returned %d annotations for %d responses", a, len(anns), e - s)
                self._counts["annotator_errors"] += e - s
                continue
            out[s:e] = anns
            self._snapshots[a] = snapshot
        return out

    def _replace(self, a: int) -> None:
        import ray

        self._retired.update(self._snapshots[a])
        self._snapshots[a] = {}
        try:
            ray.kill(self.actors[a], no_restart=True)
        except Exception:  # already dead
            pass
        self.actors[a] = self._start()

    # -------------------------------------------------------------- counters
    def stats(self) -> dict[str, float]:
        """Counters summed over the actors (as of their last batch) plus the service's own
        (``annotate/actor_failures``, ``annotate/annotator_errors``)."""
        total: Counter = Counter(self._retired)
        for snap in self._snapshots:
            total.update(snap)
        total.update({f"annotate/{k}": v for k, v in self._counts.items()})
        return {k: float(v) for k, v in total.items()}

    def actor_stats(self) -> list[dict[str, float]]:
        """Each live actor's own counters (asks the actors)."""
        import ray

        return ray.get([a.stats.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for a in getattr(self, "actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []


# ----------------------------------------------------------------------------------------- config
class _Override:
    """``cfg`` with some attributes replaced (works for dataclasses and plain objects alike)."""

    def __init__(self, cfg: Any, **values: Any):
        self._cfg, self._values = cfg, values

    def __getattr__(self, name: str) -> Any:
        if name in self._values:
            return self._values[name]
        return getattr(self._cfg, name)


def _plain(value: Any) -> Any:
    """OmegaConf containers (and nested ones) -> plain dicts / lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value

def make_annotator(cfg: Any, *, seed: int = 0, generate: Callable[[list[str]], list[str | None]] | None = None,
                   tokenizer: Any = None, placement: Any = None):
    """The annotator of an ``annotator`` config group (an ``AnnotatorConfig`` or any object with those
    attributes; missing attributes take the defaults of the backend). ``api`` / ``model`` run in an
    :class:`AnnotatorService` when ``num_actors > 0``, else in the driver process; ``self`` needs
    ``generate`` (the rollout pool, see :func:`~trace_rl.annotate.llm.pool_text_generate`)."""
    kind = cfg.kind
    if kind in ("oracle", "random", "none"):
        return get_annotator(kind, coverage=getattr(cfg, "random_coverage", 0.25), seed=seed)

    def pick(names: tuple[str, ...]) -> dict[str, Any]:
        return {n: getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None}

    common = pick(_ANNOTATOR_OPTS)
    if getattr(cfg, "cache_dir", None) == "":  # "" = no cache
        cfg = _Override(cfg, cache_dir=None)
    if kind == "self":
        kwargs = {k: _plain(v) for k, v in pick(("chat_template_kwargs",)).items()}
        return get_annotator("self", generate=generate, tokenizer=tokenizer, **kwargs, **common)
    if kind not in SERVICE_KINDS:
        return get_annotator(kind)  # unknown: get_annotator names the known kinds
    options = {**pick(_API_OPTS if kind == "api" else _MODEL_OPTS), **common}
    for name in ("extra_body", "chat_template_kwargs"):  # OmegaConf containers -> plain dicts
        if name in options:
            options[name] = _plain(options[name])
    num_actors = int(getattr(cfg, "num_actors", 0) or 0)
    if num_actors > 0:
        return AnnotatorService(kind, num_actors=num_actors, options=options,
                                cpus_per_actor=getattr(cfg, "cpus_per_actor", 1),
                                gpus_per_actor=getattr(cfg, "gpus_per_actor", 0.0), placement=placement)
    return get_annotator(kind, **options)


def check_config(cfg: Any, err: Callable[[str, str, str], None]) -> None:
    """Validate the ``annotator`` group before anything starts (called by ``trace_rl.config.validate``)."""
    import os
    import urllib.parse

    an = cfg.annotator
    kinds = ("oracle", "random", "none", "self", "model", "api")
    if an.kind not in kinds:
        err("annotator.kind", f"unknown value {an.kind!r}", f"use one of {', '.join(kinds)}")
    if not (0 < an.span_cap <= 1):
        err("annotator.span_cap", f"{an.span_cap} is outside (0, 1]", "use 0.25 (TRACE)")
    if not (0 < an.random_coverage <= 1):
        err("annotator.random_coverage", f"{an.random_coverage} is outside (0, 1]", "use 0.25")
    for name in ("max_segments", "max_ids", "concurrency", "max_tokens", "max_new_tokens", "batch_size"):
        if int(getattr(an, name)) < 1:
            err(f"annotator.{name}", f"{getattr(an, name)} < 1", "use 1 or more")
    if an.max_retries < 0:
        err("annotator.max_retries", f"{an.max_retries} < 0", "use 0 (no retry) or more (default 4)")
    if not an.timeout_s > 0:
        err("annotator.timeout_s", f"{an.timeout_s} must be > 0", "use e.g. 60 (seconds per request attempt)")
    if an.backoff_s < 0 or an.backoff_max_s < 0:
        err("annotator.backoff_s/backoff_max_s", "negative backoff", "use e.g. backoff_s=1 backoff_max_s=30")
    if an.num_actors < 0:
        err("annotator.num_actors", f"{an.num_actors} < 0", "use 0 (in the driver) or more actors")
    elif an.num_actors > 0 and an.kind not in SERVICE_KINDS:
        err("annotator.num_actors", f"annotator.kind={an.kind} does not run in annotator actors",
            f"set annotator.num_actors=0 (actors serve kinds {', '.join(SERVICE_KINDS)})")
    if an.kind == "api":
        url = urllib.parse.urlparse(an.base_url or "")
        if url.scheme not in ("http", "https") or not url.netloc:
            err("annotator.base_url", f"{an.base_url!r} is not an http(s) URL",
                "set annotator.base_url=http://127.0.0.1:8000/v1 (the API root of an OpenAI-compatible server)")
        if not an.model:
            err("annotator.model", "annotator.kind=api needs the served model name",
                "set annotator.model=<name> (vLLM: the --served-model-name or the model path it serves)")
        if an.api_key_env and not os.environ.get(an.api_key_env):
            err("annotator.api_key_env", f"the environment variable {an.api_key_env} is not set",
                f"export {an.api_key_env}=<key> before starting, or annotator.api_key_env=null for no key")
    elif an.kind == "model":
        if not an.model_path:
            err("annotator.model_path", "annotator.kind=model needs a checkpoint",
                "set annotator.model_path=/path/to/hf_checkpoint (a chat model, nothing is downloaded)")
        elif not os.path.exists(os.path.join(an.model_path, "config.json")):
            err("annotator.model_path", f"{an.model_path!r} is not a Hugging Face checkpoint directory",
                "point it at a directory with config.json and a tokenizer with a chat template")
