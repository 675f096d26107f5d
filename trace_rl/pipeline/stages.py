"""The producer's stage actors: reward (which also hosts the routing of ``route.py``), annotate and teacher,
each a Ray actor that reads a batch chunk (an object ref, resolved by Ray in the actor) and returns the chunk with its fields filled in, plus a
small dict of counters. The driver only chains the refs: ``reward.score.remote(chunk_ref)`` and so on.

=========  ===============================================================================  =============
stage      what it adds to the chunk                                                         needs
=========  ===============================================================================  =============
reward     ``rewards`` (math-verify in a pool of killable worker processes, hard timeout)    always
annotate   ``key_mask`` / ``error_mask`` and ``meta["label"]`` (the configured annotator)    annotations
teacher    ``teacher_logprobs`` / ``teacher_topk_ids`` / ``teacher_topk_logprobs``            teacher_*
=========  ===============================================================================  =============

Each actor runs one call at a time, so chunks of one step are processed in the order they arrive and a
teacher re-sync submitted after a step's scoring calls is applied after them. :class:`Stages` is the
driver's handle: it starts the actors the :class:`~trace_rl.startup.ServiceSet` asks for, and closes them.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from trace_rl.batch import Batch

log = logging.getLogger(__name__)

__all__ = ["RewardStage", "AnnotateStage", "TeacherStage", "Stages"]


def _tokenizer(path: str, trust_remote_code: bool):
    from trace_rl.models.tokenizer import load_pretrained_tokenizer

    return load_pretrained_tokenizer(path, trust_remote_code=trust_remote_code)


class _Timed:
    """Wall-clock bookkeeping every stage returns with its counters."""

    def _stats(self, t_wall: float, t0: float, **counters: float) -> dict[str, float]:
        return {"start": t_wall, "end": time.time(), "busy_s": time.perf_counter() - t0, **counters}

    def ready(self) -> int:
        return os.getpid()


class RewardStage(_Timed):
    """Decode each response and score it against the gold answer with a :class:`VerifierPool`."""

    def __init__(self, tokenizer_path: str, *, trust_remote_code: bool = False, workers: int = 2,
                 timeout_s: float = 5.0, score_fn: str | None = None):
        from trace_rl.rewards.pool import DEFAULT_SCORE_FN, VerifierPool

        self.tok = _tokenizer(tokenizer_path, trust_remote_code)
        self.verifier = VerifierPool(workers, timeout_s, score_fn=score_fn or DEFAULT_SCORE_FN)

    def score(self, batch: Batch) -> tuple[Batch, dict[str, float]]:
        from trace_rl.rewards.math_reward import extract_boxed
        from trace_rl.routing import responses

        t_wall, t0 = time.time(), time.perf_counter()
        texts = self.tok.batch_decode(responses(batch), skip_special_tokens=True)
        scores, vstats = self.verifier.score(list(zip(texts, batch.meta["answer"])))
        batch = batch.replace(rewards=torch.tensor(scores, dtype=torch.float32))
        return batch, self._stats(t_wall, t0, rows=float(len(batch)), timeouts=float(vstats["timeouts"]),
                                  errors=float(vstats["errors"]),
                                  no_answer=float(sum(extract_boxed(t) is None for t in texts)))

    def score_texts(self, items: list[tuple[str, str]]) -> tuple[list[float], dict[str, float]]:
        """Score ``(response text, gold)`` pairs (evaluation uses the same verifier pool)."""
        return self.verifier.score(items)

    def verifier_stats(self) -> dict[str, float]:
        return dict(self.verifier.stats)

    def shutdown(self) -> None:
        self.verifier.close()


class AnnotateStage(_Timed):
    """Mark key / error spans with the configured annotator (``annotator.kind``) and align them to tokens.
    ``self`` generates through the rollout engines (their actor handles); ``api`` / ``model`` run here or,
    with ``annotator.num_actors > 0``, in their own AnnotatorService actors."""

    def __init__(self, annotator_cfg: Any, *, seed: int, tokenizer_path: str, trust_remote_code: bool,
                 problems: dict[str, Any], span_cap: float, engines: list | None = None, pad_token_id: int = 0,
                 max_model_len: int | None = None, placement: Any = None):
        from trace_rl.annotate.service import make_annotator

        self.tok = _tokenizer(tokenizer_path, trust_remote_code)
        self.problems, self.span_cap, self.kind = problems, float(span_cap), annotator_cfg.kind
        generate = None
        if annotator_cfg.kind == "self":
            from trace_rl.annotate.llm import pool_text_generate
            from trace_rl.rollout.pool import EngineClient

            generate = pool_text_generate(EngineClient(engines or []), self.tok,
                                          max_new_tokens=annotator_cfg.max_new_tokens, max_model_len=max_model_len)
        self.annotator = make_annotator(annotator_cfg, seed=seed, generate=generate, tokenizer=self.tok,
                                        placement=placement)
        self.counts: Counter = Counter()

    def annotate(self, batch: Batch) -> tuple[Batch, dict[str, float]]:
        from trace_rl.routing import annotate_batch

        t_wall, t0 = time.time(), time.perf_counter()
        key, err, labels, metrics = annotate_batch(self.annotator, batch, self.tok, self.problems, self.span_cap,
                                                   self.counts)
        stats = getattr(self.annotator, "stats", None)
        if callable(stats):  # LLM annotators: cumulative request / parse counters
            try:
                metrics.update({f"cum:{k}": float(v) for k, v in stats().items()})
            except Exception as e:  # counters must not stop training
                log.warning("annotator stats failed: %s", e)
        out = batch.replace(key_mask=key, error_mask=err, meta={**batch.meta, "label": labels})
        return out, self._stats(t_wall, t0, **metrics)

    def info(self) -> dict[str, Any]:
        """The annotator's kind and, for an LLM annotator, where its reply cache lives."""
        backend = getattr(self.annotator, "backend", None)
        cache = getattr(backend, "cache_dir", None)
        return {"kind": self.kind, "cache_dir": str(cache) if cache is not None else None}

    def annotate_counts(self) -> dict[str, int]:
        return dict(self.counts)

    def probe(self, problems: list, prompt_ids: list[list[int]]) -> Any:
        """The key-token probe (:func:`trace_rl.routing.key_token_probe`) of a held-out set."""
        from trace_rl.routing import key_token_probe

        return key_token_probe(problems, prompt_ids, self.tok, self.annotator, self.span_cap)

    def shutdown(self) -> None:
        close = getattr(self.annotator, "shutdown", None)
        if callable(close):
            close()


class TeacherStage(_Timed):
    """Score each response under its privileged prompt with a :class:`~trace_rl.teacher.service.TeacherService`
    (whose engine actors this stage starts); re-sync or EMA-blend its weights on request."""

    def __init__(self, teacher_kwargs: dict[str, Any], *, tokenizer_path: str, trust_remote_code: bool,
                 problems: dict[str, Any], privileged: tuple[str, ...], instruction: str,
                 chat_template_kwargs: tuple, teacher_rows: str, placement: Any = None):
        from trace_rl.routing import TeacherScorer
        from trace_rl.teacher import PrivilegedPromptBuilder
        from trace_rl.teacher.service import TeacherService

        self.tok = _tokenizer(tokenizer_path, trust_remote_code)
        self.teacher = TeacherService(**teacher_kwargs, placement=placement)
        self.scorer = TeacherScorer(self.teacher, self.tok, problems, PrivilegedPromptBuilder(
            fields=tuple(privileged), instruction=instruction, chat_template_kwargs=chat_template_kwargs))
        self.teacher_rows = teacher_rows

    def score(self, batch: Batch) -> tuple[Batch, dict[str, float]]:
        t_wall, t0 = time.time(), time.perf_counter()
        rows = None
        if self.teacher_rows == "annotated" and batch.key_mask is not None:
            rows = (batch.key_mask | batch.error_mask).any(dim=1)
        out, metrics = self.scorer.score(batch, rows)
        metrics.update({f"cum:{k}": v for k, v in self.teacher.stats().items()})  # calls, tokens, syncs, version
        return out, self._stats(t_wall, t0, **metrics)

    def sync(self, state_ref: list, version: int) -> float:
        """Load the learner's weights (``state_ref``: a one-element list holding the object ref of the full
        state dict, so that Ray hands the ref on instead of resolving it here)."""
        return self.teacher.sync(state_ref[0], version=version)

    def wants_sync(self, step: int) -> bool:
        return self.teacher.wants_sync(step)

    def stats(self) -> dict[str, float]:
        return self.teacher.stats()

    def shutdown(self) -> None:
        self.teacher.shutdown()


@dataclass
class Stages:
    """The driver's handle on the stage actors of a training job (None where the job has no such stage)."""
    reward: Any
    route: Any = None
    annotate: Any = None
    teacher: Any = None
    teacher_rows: str = "all"
    resync_every: int = 0
    teacher_kind: str = "self"
    _closers: list = field(default_factory=list, repr=False)

    @classmethod
    def start(cls, cfg: Any, files: Any, services: Any, run_dir: Any, *, pool: Any, learners: Any = None,
              placement: Any = None, closers: list) -> "Stages":
        """Start the reward and routing stages, and the annotate / teacher stages when ``services`` (decided
        once by the start-up from the method's needs) asks for them; wait until all are up; register their
        closers. ``pool`` / ``learners`` may be callables that return them once they are up (the stages start
        beside them; only ``annotator=self`` needs the engines, only an EMA teacher the learners)."""
        get_pool = pool if callable(pool) else (lambda: pool)
        get_learners = learners if callable(learners) else (lambda: learners)
        import ray

        from trace_rl.algo import get_method
        from trace_rl.cluster import actor_env
        from trace_rl.tasks import instruction_for

        from trace_rl.pipeline.route import _reward_route_stage

        env = {"env_vars": {**actor_env(), "OMP_NUM_THREADS": "1"}}
        tok_path = cfg.model.tokenizer_path or files.model_path
        trust = cfg.model.trust_remote_code
        opts = dict(num_cpus=0, runtime_env=env)  # they mostly wait: no CPU reservation that could starve a plan
        # reward and routing share one actor process (route.py, _reward_route_stage)
        reward = ray.remote(_reward_route_stage()).options(**opts).remote(
            tok_path, trust_remote_code=trust, workers=cfg.trainer.verifier_workers,
            timeout_s=cfg.trainer.verifier_timeout_s)
        stages = cls(reward=reward, route=reward)
        closers.append(("reward and routing stage", lambda: _close_actor(reward)))
        problems_ref = ray.put({p.uid: p for p in files.train_problems})
        if services.annotator is not None:
            an = cfg.annotator
            if an.kind == "api" and an.cache_dir is None:
                an = replace(an, cache_dir=str(run_dir / "annotator_cache"))
            stages.annotate = ray.remote(AnnotateStage).options(**opts).remote(
                an, seed=cfg.trainer.seed, tokenizer_path=tok_path, trust_remote_code=trust, problems=problems_ref,
                span_cap=cfg.annotator.span_cap, engines=list(get_pool().actors) if an.kind == "self" else [],
                pad_token_id=files.pad_id,
                max_model_len=files.max_model_len, placement=placement)
            closers.append(("annotator", lambda: _close_actor(stages.annotate)))
        if services.teacher:
            tc = cfg.teacher
            method = get_method(cfg.algorithm.name)
            kwargs = dict(model_path=tc.model_path or files.model_path, kind=tc.kind, engine=tc.engine,
                          num_actors=tc.num_actors, top_k=tc.top_k, resync_every=tc.resync_every,
                          dtype=cfg.model.dtype, max_model_len=files.teacher_max_model_len,
                          cpus_per_actor=tc.cpus_per_actor, gpus_per_actor=tc.gpus_per_actor,
                          gpu_memory_utilization=tc.gpu_memory_utilization,
                          trust_remote_code=trust, seed=cfg.trainer.seed, ema_decay=tc.ema_decay)
            stages.teacher = ray.remote(TeacherStage).options(**opts).remote(
                kwargs, tokenizer_path=tok_path, trust_remote_code=trust, problems=problems_ref,
                privileged=tuple(tc.privileged), instruction=instruction_for(cfg.data.task),
                chat_template_kwargs=tuple(cfg.model.chat_template_kwargs.items()),
                teacher_rows=method.teacher_rows, placement=placement)
            stages.teacher_rows, stages.resync_every, stages.teacher_kind = \
                method.teacher_rows, int(tc.resync_every), tc.kind
            closers.append(("teacher", lambda: _close_actor(stages.teacher)))
        ray.get([a.ready.remote() for a in (stages.reward, stages.annotate, stages.teacher)
                 if a is not None], timeout=cfg.cluster.placement_timeout_s + 600)
        if services.teacher and cfg.teacher.ema_decay:  # seed the EMA with the initial policy
            ray.get(stages.teacher.sync.remote([get_learners().state_dict_ref()], 0))
        return stages

    def wants_teacher_sync(self, step: int) -> bool:
        """Whether a ``self`` teacher takes the learner's weights before scoring the batch of ``step``
        (every ``teacher.resync_every`` steps, counted from 0)."""
        return (self.teacher is not None and self.teacher_kind == "self" and self.resync_every > 0 and step > 0
                and step % self.resync_every == 0)


def _close_actor(actor: Any, timeout_s: float = 60.0) -> None:
    import ray

    if actor is None:
        return
    try:
        ray.get(actor.shutdown.remote(), timeout=timeout_s)
    except Exception as e:  # already dead, or stuck: kill it anyway
        log.warning("stage shutdown: %s", e)
    try:
        ray.kill(actor)
    except Exception:
        pass
