"""The one start-up shared by training (``trace_rl.train``) and evaluation (``trace_rl.eval``).

It brings up, in this order and each with its closer:

1. the configuration, checked completely before anything starts (:func:`validate`: the central
   config's own sections plus every subsystem's ``check_config``);
2. the files: model path, tokenizer, training prompts and held-out sets (:func:`load_files`);
3. the Ray cluster: a private one on 127.0.0.1, or the running one a job was submitted to;
4. the services (:func:`start_training_services`): which of them exist is decided ONCE, here, from
   the method's declared needs (:func:`decide_services`), and the placement plan, the teacher and the
   annotator all follow that decision. The slow ones (vLLM engines, learner ranks, teacher engines) are
   started concurrently and each one's start-up time is reported (``startup_s/<role>``).

``with_closers(body)`` runs ``body(closers)`` and closes whatever it started, in reverse order, however
it ends, so the next job of a Hydra multirun starts clean.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from trace_rl.config import Config, ConfigError, hydra_schema

log = logging.getLogger("trace_rl")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


# ---------------------------------------------------------------------------------------------- services
@dataclass(frozen=True)
class ServiceSet:
    """Which services a job runs, decided once from the method's declared needs (:func:`decide_services`)."""
    teacher: bool = False
    """A privileged-context TeacherService (the method needs teacher top-k or log-probs)."""
    annotator: str | None = None
    """The annotator kind when the method routes on annotated spans (None: no annotate stage)."""
    annotator_actors: bool = False
    """The annotator runs in its own Ray actors with their own resources (api / model, num_actors > 0)."""
    entropy: bool = False
    """The learners compute the policy's per-token entropy for routing (TIP)."""


def decide_services(cfg: Config) -> ServiceSet:
    """The services ``cfg`` needs: the one place that reads the method's needs for start-up (the placement
    plan and both stage builders take the answer from here)."""
    from trace_rl.algo import TEACHER_NEEDS, get_method

    needs = get_method(cfg.algorithm.name).needs
    an = cfg.annotator
    annotator = an.kind if "annotations" in needs else None
    return ServiceSet(teacher=bool(needs & TEACHER_NEEDS), annotator=annotator,
                      annotator_actors=bool(annotator in ("api", "model") and int(an.num_actors or 0) > 0),
                      entropy="entropy" in needs)


def subsystem_checks(cfg: Config) -> list[Callable[[Any, Any], None]]:
    """Every subsystem's ``check_config(cfg, err)``; each owns its section's validation."""
    from trace_rl.annotate.service import check_config as annotator_check
    from trace_rl.eval import check_config as eval_check
    from trace_rl.learner.group import check_config as learner_check
    from trace_rl.placement import check_config as placement_check
    from trace_rl.rollout.pool import check_config as rollout_check
    from trace_rl.sync import check_config as sync_check
    from trace_rl.teacher.service import check_config as teacher_check

    checks: list[Callable[[Any, Any], None]] = [rollout_check, learner_check, teacher_check, annotator_check,
                                                sync_check, eval_check]
    try:
        services = decide_services(cfg)
    except Exception:  # an unknown method: the core check names it
        return checks

    def placement(c: Any, err: Any) -> None:
        placement_check(c, err, teacher=services.teacher, annotator=services.annotator_actors)

    return [*checks, placement]


def validate(cfg: Any) -> Config:
    """``cfg`` (a Config, DictConfig or dict) typed and checked completely: the central config's sections
    and every subsystem's. Raises :class:`~trace_rl.config.ConfigError` listing every problem with its fix,
    before any actor starts."""
    from trace_rl.config import to_config, validate as validate_core

    cfg = to_config(cfg)
    return validate_core(cfg, checks=subsystem_checks(cfg))


def with_closers(body: Callable[[list], Any]) -> Any:
    """``body(closers)``; whatever it appended to ``closers`` (``(name, close)`` pairs) is closed in
    reverse order however it ends, and a failing close is logged, never raised over the body's error."""
    closers: list[tuple[str, Any]] = []
    try:
        return body(closers)
    finally:
        took = []
        for name, close in reversed(closers):
            t0 = time.perf_counter()
            try:
                close()
            except Exception as e:  # a failing shutdown must not hide the job's own error
                log.warning("shutting down %s failed: %s", name, e)
            took.append(f"{name} {time.perf_counter() - t0:.1f} s")
        if took:
            log.info("shut down: %s", ", ".join(took))


# ---------------------------------------------------------------------------------------------- files
def resolve_model_path(path: str) -> str:
    """``tiny`` -> the project's tiny SFT model (built and cached on first use); anything else as given."""
    if path == "tiny":
        from trace_rl.models.cache import tiny_model_path

        return str(tiny_model_path(stage="sft"))
    return path


def model_context(model_path: str) -> int | None:
    """The checkpoint's context length (``max_position_embeddings``), when its config says."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            return int(json.load(f).get("max_position_embeddings") or 0) or None
    except (OSError, ValueError):
        return None


def load_tokenizer(cfg: Config, model_path: str):
    from trace_rl.models.tokenizer import load_pretrained_tokenizer

    tokenizer = load_pretrained_tokenizer(cfg.model.tokenizer_path or model_path,
                                          trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, pad_id


def load_split(spec: str, split: str, n: int, seed: int):
    """'arith' / 'arith:<split>' or a file path -> problems."""
    from trace_rl.tasks import load_task_problems

    if not spec:
        return []
    name, _, sub = spec.partition(":")
    if name == "arith":
        return load_task_problems("arith", sub or split, n=n or None, seed=seed)
    return load_task_problems(spec, split, n=n or None, seed=seed)


def tokenize_prompts(problems, tokenizer, max_prompt_length: int, task: str,
                     chat_template_kwargs: dict[str, Any] | None = None):
    """Render each problem (:func:`render`) and tokenize them all at once; drop (and count) prompts that
    are too long. Returns ``(kept problems, their token ids, dropped count)``.

    ``chat_template_kwargs`` (``model.chat_template_kwargs``, e.g. ``{"enable_thinking": True}`` for
    Qwen3's thinking mode) are passed to ``tokenizer.apply_chat_template``; without them the prompt is
    exactly ``render_prompt``'s.
    """
    problems = list(problems)
    kept, ids, dropped = [], [], 0
    for p, tok in zip(problems, prompt_token_ids(problems, tokenizer, task, chat_template_kwargs)):
        if len(tok) > max_prompt_length:
            dropped += 1
            continue
        kept.append(p)
        ids.append(tok)
    return kept, ids, dropped


class PromptTable:
    """The training prompts, tokenized when first drawn (a run uses a small part of a large training set;
    tokenizing all of it up front cost seconds at every start). A prompt longer than
    ``data.max_prompt_length`` is dropped when drawn and counted (``dropped``); :meth:`draw` replaces it by
    the sampler's next prompt, so a step always gets ``k`` prompts."""

    def __init__(self, problems: list, tokenizer: Any, max_prompt_length: int, task: str,
                 chat_template_kwargs: dict[str, Any] | None = None):
        self.problems, self.tokenizer = problems, tokenizer
        self.max_prompt_length, self.task = int(max_prompt_length), task
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._ids: dict[int, list[int] | None] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.problems)

    def ids(self, indices: list[int]) -> list[list[int] | None]:
        """Token ids of the prompts at ``indices`` (None: longer than the limit)."""
        todo = [i for i in dict.fromkeys(indices) if i not in self._ids]
        if todo:
            fresh = prompt_token_ids([self.problems[i] for i in todo], self.tokenizer, self.task,
                                     self.chat_template_kwargs)
            for i, ids in zip(todo, fresh):
                if len(ids) > self.max_prompt_length:
                    self._ids[i] = None
                    self.dropped += 1
                    if self.dropped == 1:
                        log.warning("training prompt %s has %d tokens > data.max_prompt_length=%d: dropped (every "
                                    "such prompt is skipped and counted in data/prompts_dropped; raise the limit "
                                    "to keep them)", self.problems[i].uid, len(ids), self.max_prompt_length)
                else:
                    self._ids[i] = ids
        return [self._ids[i] for i in indices]

    def draw(self, sampler: Any, k: int) -> tuple[list[int], list[list[int]]]:
        """``k`` prompts that fit, in the sampler's order: ``(indices, token ids)``."""
        idx, ids = [], []
        while len(idx) < k:
            if self.dropped >= len(self.problems):
                raise ValueError(f"every training prompt is longer than data.max_prompt_length="
                                 f"{self.max_prompt_length}; raise it")
            want = sampler.next(k - len(idx))
            for i, t in zip(want, self.ids(want)):
                if t is not None:
                    idx.append(i)
                    ids.append(t)
        return idx, ids


def prompt_token_ids(problems: list, tokenizer: Any, task: str,
                     chat_template_kwargs: dict[str, Any] | None = None) -> list[list[int]]:
    """Every problem's prompt (:func:`render`) tokenized in one batch call, lengths unchecked."""
    kwargs = dict(chat_template_kwargs or {})
    if kwargs and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"model.chat_template_kwargs={kwargs} needs a tokenizer with a chat_template; "
                         f"{type(tokenizer).__name__} has none (load a chat/instruct checkpoint)")
    if not problems:
        return []
    texts = [render(p, tokenizer, task, kwargs) for p in problems]
    return [list(t) for t in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def render(problem: Any, tokenizer: Any, task: str, chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """A problem's prompt text: ``render_prompt``'s, or the tokenizer's chat template with
    ``model.chat_template_kwargs`` (e.g. Qwen3's ``enable_thinking``) when they are given."""
    from trace_rl.tasks import instruction_for
    from trace_rl.tasks.base import build_messages, render_prompt

    kwargs = dict(chat_template_kwargs or {})
    if kwargs:
        return tokenizer.apply_chat_template(build_messages(problem, instruction=instruction_for(task)),
                                             add_generation_prompt=True, tokenize=False, **kwargs)
    return render_prompt(problem, tokenizer, instruction=instruction_for(task))


@dataclass
class Files:
    """What a training job reads before any actor starts."""
    model_path: str
    tokenizer: Any
    pad_id: int
    prompts: PromptTable
    eval_sets: list
    max_model_len: int
    """The rollout engines' context (:func:`engine_contexts`)."""
    teacher_max_model_len: int | None = None
    """The teacher engines' context; None without a teacher."""

    @property
    def train_problems(self) -> list:
        return self.prompts.problems


def load_files(cfg: Config, services: ServiceSet) -> Files:
    """The model path, tokenizer, training prompts and held-out sets of a training job; a bad data file, or
    a task whose first prompts are all too long, fails here, before any actor starts."""
    from trace_rl.eval import EvalSet

    model_path = resolve_model_path(cfg.model.path)
    tokenizer, pad_id = load_tokenizer(cfg, model_path)
    problems = load_split(cfg.data.task, "train", cfg.data.train_size, cfg.data.seed)
    prompts = PromptTable(problems, tokenizer, cfg.data.max_prompt_length, cfg.data.task,
                          cfg.model.chat_template_kwargs)
    sample = list(range(min(len(problems), 64)))
    if not problems or all(t is None for t in prompts.ids(sample)):
        raise ValueError(f"data.task={cfg.data.task!r} gave no usable training prompts ({len(problems)} read; the "
                         f"first {len(sample)} are all longer than data.max_prompt_length="
                         f"{cfg.data.max_prompt_length}): raise data.max_prompt_length or check the file")
    eval_sets = []
    for name, spec in (("test", cfg.data.eval_test), ("ood", cfg.data.eval_ood)):
        probs, ids, _ = tokenize_prompts(load_split(spec, name, cfg.data.eval_size, cfg.data.seed), tokenizer,
                                         cfg.data.max_prompt_length, spec,
                                         chat_template_kwargs=cfg.model.chat_template_kwargs)
        if probs:
            eval_sets.append(EvalSet(name, probs, ids))
    rollout_len, teacher_len = engine_contexts(cfg, model_path, services)
    return Files(model_path, tokenizer, pad_id, prompts, eval_sets, rollout_len, teacher_len)


def engine_contexts(cfg: Config, model_path: str, services: ServiceSet) -> tuple[int, int | None]:
    """``(rollout engine context, teacher engine context or None)`` in tokens, each within its model's own
    context (``max_position_embeddings``), which an engine refuses to exceed. A prompt and response that
    cannot fit in the policy's context is a configuration error (named fields, the fix); the longer
    contexts that only help are capped: the self-annotator's prompts (problem, solution, numbered
    segments) and the teacher's privileged prompt (prompt + up to 2 x data.max_prompt_length of context);
    a teacher row longer than the teacher's context is left unscored and counted (``TeacherScorer``)."""
    need = cfg.data.max_prompt_length + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    limit = model_context(model_path)
    if limit is not None and need > limit:
        longest = "rollout.max_new_tokens" if cfg.rollout.max_new_tokens >= cfg.eval.max_new_tokens \
            else "eval.max_new_tokens"
        raise ConfigError(
            "invalid configuration:\n  - data.max_prompt_length + " + longest + f": {cfg.data.max_prompt_length} + "
            f"{need - cfg.data.max_prompt_length} = {need} tokens is more than the model's context ({limit}, "
            f"max_position_embeddings of {model_path}). Fix: lower data.max_prompt_length or {longest} so that "
            f"they sum to at most {limit}, or use a model with a longer context")
    rollout = need
    if services.annotator == "self" and limit is not None:
        # the policy annotates through the pool: its prompts are longer than the rollouts'
        rollout = max(need, min(limit, 4 * need + cfg.annotator.max_new_tokens))
    teacher = None
    if services.teacher:
        teacher_path = cfg.teacher.model_path or model_path
        teacher_limit = model_context(teacher_path)
        teacher = need + 2 * cfg.data.max_prompt_length
        if teacher_limit is not None:
            teacher = min(teacher, teacher_limit)
    return rollout, teacher


def make_run_dir(cfg: Config) -> Path:
    if cfg.trainer.run_dir:
        return Path(cfg.trainer.run_dir)
    try:  # under Hydra: the job's own output directory (one per multirun job)
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        name = cfg.logger.run_name or f"{cfg.algorithm.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return Path(cfg.trainer.output_dir) / name


# ---------------------------------------------------------------------------------------------- cluster
def start_cluster(cfg: Config, closers: list) -> dict[str, Any]:
    """Join the configured / submitted cluster, or start a private one on 127.0.0.1 (closed at the end)."""
    import ray

    from trace_rl.cluster import init_ray

    cluster = init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, num_gpus=cfg.cluster.num_gpus)
    if cluster.get("started_local"):
        closers.append(("ray", ray.shutdown))
    return cluster


def engine_threads(cfg: Config, *, training: bool = True) -> int:
    """``rollout.threads_per_engine``, or (0) every core while an engine generates alone (lockstep training,
    evaluation) and its share of the cores when it generates beside the learner ranks and the other engines
    (``trainer.max_staleness > 0``)."""
    from trace_rl.rollout.pool import default_engine_threads

    r = cfg.rollout
    if r.threads_per_engine:
        return int(r.threads_per_engine)
    busy = (cfg.learner.num_ranks + r.num_engines - 1) if training and cfg.trainer.max_staleness > 0 else 0
    return default_engine_threads(shared_with=busy)


def cpu_kv_cache_gib(cfg: Config, model_path: str, max_model_len: int, max_seqs: int) -> int | None:
    """The KV cache a vLLM engine without a GPU needs, in whole GiB (``VLLM_CPU_KVCACHE_SPACE``): the model's
    bytes per token (layers x 2 x KV heads x head size x dtype size) x ``max_model_len`` x the most sequences it
    holds at once (x 1.25), at least 1 and at most ``rollout.gpu_memory_utilization`` of the machine's
    memory. vLLM's own CPU default, that fraction of memory, allocates and zeroes gigabytes (6.5 s of
    start-up for the tiny model) that small models never use. None when the model's config does not say."""
    import math

    try:
        with open(os.path.join(model_path, "config.json")) as f:
            mc = json.load(f)
        mc = mc.get("text_config", mc)
        heads = int(mc["num_attention_heads"])
        head_dim = int(mc.get("head_dim") or int(mc["hidden_size"]) // heads)
        per_token = int(mc["num_hidden_layers"]) * 2 * int(mc.get("num_key_value_heads") or heads) * head_dim
    except (OSError, KeyError, TypeError, ValueError):
        return None
    per_token *= {"float32": 4}.get(cfg.model.dtype, 2)
    need = math.ceil(per_token * max_model_len * max_seqs * 1.25 / 2**30)
    try:
        cap = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * cfg.rollout.gpu_memory_utilization / 2**30)
    except (ValueError, OSError):
        cap = need
    return max(1, min(need, max(cap, 1)))


def start_rollout_pool(cfg: Config, model_path: str, *, max_model_len: int, seed: int, pad_id: int,
                       placement: Any = None, training: bool = True, max_seqs: int | None = None):
    """The rollout engines of ``cfg``. ``max_seqs``: the most sequences an engine holds at once (default: a
    training step's share or an evaluation set's, whichever is larger), for the CPU KV-cache size."""
    from trace_rl.rollout.pool import RolloutPool

    r = cfg.rollout
    env: dict[str, str] = {}
    if r.engine == "vllm" and r.gpus_per_engine == 0 and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        if max_seqs is None:
            per_engine = -(-cfg.data.prompts_per_step // r.num_engines) * r.n
            max_seqs = max(per_engine, -(-cfg.data.eval_size // r.num_engines) * cfg.eval.k)
        max_seqs = min(max_seqs, int(r.engine_options.get("max_num_seqs", 256)))
        gib = cpu_kv_cache_gib(cfg, model_path, max_model_len, max_seqs)
        if gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
    return RolloutPool(model_path, engine=r.engine, num_engines=r.num_engines, dtype=cfg.model.dtype, seed=seed,
                       max_model_len=max_model_len, gpu_memory_utilization=r.gpu_memory_utilization,
                       enforce_eager=r.enforce_eager, tensor_parallel_size=r.tensor_parallel_size,
                       cpus_per_engine=r.cpus_per_engine, gpus_per_engine=r.gpus_per_engine,
                       trust_remote_code=cfg.model.trust_remote_code, pad_token_id=pad_id, placement=placement,
                       engine_options=r.engine_options, threads_per_engine=engine_threads(cfg, training=training),
                       extra_env=env)


def algorithm_for_learners(cfg: Config):
    """The ``algorithm`` section with ``behaviour_is=auto`` resolved (on when rollout may run ahead)."""
    a = cfg.algorithm
    if a.behaviour_is == "auto":
        a = replace(a, behaviour_is="on" if cfg.trainer.max_staleness > 0 else "off")
    return a


def learner_for_placement(cfg: Config):
    """The ``learner`` section with ``nice=-1`` resolved: 5 when the ranks run on CPU cores beside engines
    that generate at the same time (asynchronous training without GPUs), else 0."""
    lc = cfg.learner
    if lc.nice < 0:
        shared = cfg.trainer.max_staleness > 0 and lc.gpus_per_rank == 0 and cfg.rollout.gpus_per_engine == 0
        lc = replace(lc, nice=5 if shared else 0)
    return lc


@dataclass
class TrainingServices:
    """Everything a training job talks to; built by :func:`start_training_services`."""
    cluster: dict[str, Any]
    services: ServiceSet
    placement: Any
    pool: Any
    learners: Any
    weight_sync: Any
    stages: Any  # trace_rl.pipeline.Stages: reward / annotate / teacher stage actors
    colocation: Any
    startup_s: dict[str, float] = field(default_factory=dict)


def start_cluster_and_load_files(cfg: Config, services: ServiceSet, closers: list) -> tuple[dict, Files, dict]:
    """Start (or join) the Ray cluster while the files load in a thread: Ray's processes start and the driver
    imports the tokenizer at the same time. A bad data file still fails before any actor starts.
    Returns ``(cluster info, files, timings)``."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as ex:
        files_future = ex.submit(load_files, cfg, services)
        cluster = start_cluster(cfg, closers)
        timings["startup_s/ray"] = time.perf_counter() - t0
        files = files_future.result()
    timings["startup_s/files"] = time.perf_counter() - t0
    return cluster, files, timings


def start_training_services(cfg: Config, files: Files, services: ServiceSet, run_dir: Path,
                            closers: list, cluster: dict | None = None) -> TrainingServices:
    """The cluster (unless ``cluster`` says it is up) and every service of a training job, each with its
    closer. The rollout engines, the learner ranks and the stage actors (teacher engines included) start
    concurrently."""
    from trace_rl.learner.group import LearnerGroup
    from trace_rl.pipeline import Stages
    from trace_rl.placement import ColocationProtocol, Placement, plan_from_config
    from trace_rl.sync import make_weight_sync

    timings: dict[str, float] = {}
    if cluster is None:
        t0 = time.perf_counter()
        cluster = start_cluster(cfg, closers)
        timings["startup_s/ray"] = time.perf_counter() - t0
    # every role's placement group, reserved up front (a plan that cannot fit fails here, named)
    t0 = time.perf_counter()
    placement = Placement(plan_from_config(cfg, teacher=services.teacher, annotator=services.annotator_actors),
                          timeout_s=cfg.cluster.placement_timeout_s)
    closers.append(("placement groups", placement.remove))
    timings["startup_s/placement"] = time.perf_counter() - t0

    def timed(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run():
            s = time.perf_counter()
            out = fn()
            timings[f"startup_s/{name}"] = time.perf_counter() - s
            return out
        return run

    algo = algorithm_for_learners(cfg)
    learner_cfg = learner_for_placement(cfg)
    futures: dict[str, Any] = {}

    def wait_for(name: str) -> Callable[[], Any]:
        return lambda: futures[name].result()

    engines_asleep = []

    def learner_group():
        if placement.colocated:
            # the engines give the accelerators back before the learners are built on them (vLLM takes
            # gpu_memory_utilization of the device when it builds)
            timings["startup_s/colocation_sleep"] = ColocationProtocol.sleep_engines(wait_for("rollout")())
            engines_asleep.append(True)
        return LearnerGroup(learner_cfg, algo, cfg.model, files.model_path, seed=cfg.trainer.seed,
                            placement_strategy=cfg.cluster.placement_strategy,
                            placement_timeout_s=cfg.cluster.placement_timeout_s,
                            total_steps=cfg.trainer.total_steps, placement=placement)

    builders = {
        "rollout": timed("rollout", lambda: start_rollout_pool(
            cfg, files.model_path, max_model_len=files.max_model_len, seed=cfg.rollout.seed, pad_id=files.pad_id,
            placement=placement)),
        "learner": timed("learner", lambda: learner_group()),
        # the stage actors start beside them; the annotate stage of annotator=self waits for the engines, an
        # EMA teacher for the learners' weights
        "stages": timed("stages", lambda: Stages.start(cfg, files, services, run_dir, pool=wait_for("rollout"),
                                                       learners=wait_for("learner"), placement=placement,
                                                       closers=closers)),
    }
    started: dict[str, Any] = {}
    t0 = time.perf_counter()
    # threads only wait on Ray: the actors themselves start in parallel processes
    with ThreadPoolExecutor(max_workers=len(builders)) as ex:
        for name, fn in builders.items():
            futures[name] = ex.submit(fn)
        errors = []
        for name, fut in futures.items():
            try:
                started[name] = fut.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after every started service is closeable
                errors.append((name, e))
    for name, close in (("rollout pool", "rollout"), ("learner group", "learner")):
        if close in started:
            closers.append((name, started[close].shutdown))
    if errors:
        raise errors[0][1]
    pool, learners, stages = started["rollout"], started["learner"], started["stages"]
    timings["startup_s/services"] = time.perf_counter() - t0
    colo = ColocationProtocol(pool, learners, enabled=placement.colocated, engines_asleep=bool(engines_asleep))
    weight_sync = make_weight_sync(cfg.rollout.weight_sync, learners, pool, bucket_mb=cfg.rollout.sync_bucket_mb,
                                   backend=cfg.rollout.sync_backend, dtype=cfg.model.dtype)
    closers.append(("weight sync", weight_sync.close))
    timings.update({f"startup_s/{k}_engine": v for k, v in _engine_startup(pool).items()})
    return TrainingServices(cluster, services, placement, pool, learners, weight_sync, stages, colo, timings)


def _engine_startup(pool: Any) -> dict[str, float]:
    infos = getattr(pool, "infos", None) or []
    return {"rollout": max((float(i.get("startup_s", 0.0)) for i in infos), default=0.0)}


# ---------------------------------------------------------------------------------------------- Hydra
def hydra_main(task: Callable[[Any], Any]) -> None:
    """Run ``task(composed config)`` under Hydra: trace_rl's ``conf/`` and schema (with its mandatory
    fields), the command line's overrides, ``-m`` sweeps. The entry of ``trace_rl.train`` and ``trace_rl.eval``."""
    import hydra
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="trace_rl_schema", node=hydra_schema())
    logging.basicConfig(level=os.environ.get("TRACE_RL_LOG", "INFO"), format="%(asctime)s %(name)s %(message)s")

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def _hydra_main(hcfg) -> None:
        task(hcfg)

    _hydra_main()


def wants_help() -> bool:
    return any(a in ("--help", "-h") for a in sys.argv[1:]) and "hydra" not in " ".join(sys.argv)


__all__ = ["ServiceSet", "decide_services", "validate", "subsystem_checks", "with_closers", "resolve_model_path",
           "model_context", "load_tokenizer", "load_split", "tokenize_prompts", "prompt_token_ids", "render", "PromptTable", "Files",
           "load_files", "make_run_dir",
           "start_cluster", "start_cluster_and_load_files", "start_rollout_pool", "algorithm_for_learners",
           "engine_threads", "TrainingServices",
           "start_training_services", "hydra_main", "wants_help", "CONF_DIR", "ConfigError"]
