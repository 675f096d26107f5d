"""TeacherService: engine actors that score the student's responses under privileged prompts.

For each response it returns, per response token, the teacher's log-prob of the sampled token and
its top-k (ids, log-probs), as the batch fields ``teacher_logprobs [B, R]``,
``teacher_topk_ids [B, R, K]`` and ``teacher_topk_logprobs [B, R, K]`` (zero / pad outside the
response). Kinds:

* ``self``: the policy itself, started from the same checkpoint; its weights are re-synced from the
  learner every ``resync_every`` steps (TRACE: 10), so the teacher is a slightly stale copy of the
  student that sees the privileged context. With ``ema_decay = d > 0`` a sync blends instead:
  ``teacher <- d * teacher + (1 - d) * learner`` (the blended weights are kept by the service).
* ``frozen``: any local HF checkpoint (the initial policy by default, or a larger model), never synced.

The engine is the rollout engine class (vLLM ``prompt_logprobs`` or HF forward), so the same
``engine=vllm|hf`` choice applies. Calls and scored tokens are counted (``teacher/calls``,
``teacher/tokens``) so tests and dashboards can see when the teacher is really used.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

TEACHER_KINDS = ("self", "frozen")


def check_config(cfg: Any, err) -> None:
    """The ``teacher`` section (``trace_rl.config.validate``'s ``err(field, problem, fix)`` per problem)."""
    import os

    from trace_rl.teacher.prompts import PRIVILEGED_FIELDS

    tc = cfg.teacher
    if tc.kind not in TEACHER_KINDS:
        err("teacher.kind", f"unknown value {tc.kind!r}", f"use one of {', '.join(TEACHER_KINDS)}")
    if tc.engine not in ("hf", "vllm"):
        err("teacher.engine", f"unknown value {tc.engine!r}", "use one of hf, vllm")
    if tc.top_k < 1:
        err("teacher.top_k", f"{tc.top_k} < 1", "use e.g. 32 (TRACE-style vocabulary KL on the teacher's top-k)")
    if not 0 <= tc.ema_decay < 1:
        err("teacher.ema_decay", f"{tc.ema_decay} is outside [0, 1)", "use 0 (plain re-sync) or e.g. 0.9")
    elif tc.ema_decay and tc.kind != "self":
        err("teacher.ema_decay", "an EMA teacher must be teacher.kind=self", "set teacher.kind=self or ema_decay=0")
    if tc.resync_every < 0:
        err("teacher.resync_every", f"{tc.resync_every} < 0", "use 10 (TRACE) or 0 to never re-sync")
    if tc.num_actors < 1:
        err("teacher.num_actors", f"{tc.num_actors} < 1", "use 1 or more")
    bad = [f for f in tc.privileged if f not in PRIVILEGED_FIELDS]
    if bad:
        err("teacher.privileged", f"unknown fields {bad}", f"use a subset of {list(PRIVILEGED_FIELDS)}")
    if tc.model_path is not None and not os.path.exists(os.path.join(tc.model_path, "config.json")):
        err("teacher.model_path", f"{tc.model_path!r} is not a Hugging Face checkpoint directory",
            "give a local checkpoint, or null for the initial policy")


class TeacherService:
    def __init__(self, model_path: str, *, kind: str = "self", engine: str = "hf", num_actors: int = 1,
                 top_k: int = 32, resync_every: int = 10, dtype: str = "float32", max_model_len: int | None = None,
                 cpus_per_actor: int = 1, gpus_per_actor: float = 0.0, gpu_memory_utilization: float = 0.2,
                 trust_remote_code: bool = False, seed: int = 0, ema_decay: float = 0.0, placement: Any = None):
        """``placement``: a :class:`trace_rl.placement.Placement` whose ``teacher`` slots pin the actors to
        their bundles (None: plain CPU / GPU requests anywhere on the cluster)."""
        from trace_rl.rollout.pool import RolloutPool

        if kind not in TEACHER_KINDS:
            raise ValueError(f"teacher.kind={kind!r} is unknown; use one of {', '.join(TEACHER_KINDS)}")
        if top_k < 1:
            raise ValueError(f"teacher.top_k={top_k} must be >= 1")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"teacher.ema_decay={ema_decay} must be in [0, 1) (0 = plain re-sync)")
        if ema_decay and kind != "self":
            raise ValueError("teacher.ema_decay applies to teacher.kind=self only")
        self.kind, self.top_k, self.resync_every = kind, int(top_k), int(resync_every)
        self.max_model_len = int(max_model_len) if max_model_len else None  # longer rows: TeacherScorer skips them
        self.ema_decay = float(ema_decay)
        self._ema_state: dict[str, torch.Tensor] | None = None
        self.calls, self.tokens, self.syncs = 0, 0, 0
        self.version = 0
        extra = {"max_logprobs": self.top_k} if engine == "vllm" else {}
        self.pool = RolloutPool(model_path, engine=engine, num_engines=num_actors, dtype=dtype, seed=seed,
                                max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                                cpus_per_engine=cpus_per_actor, gpus_per_engine=gpus_per_actor,
                                trust_remote_code=trust_remote_code, engine_kwargs=extra, placement=placement,
                                role="teacher")

    # ------------------------------------------------------------------ scoring
    def score(self, prompts: list[list[int]], responses: list[list[int]], response_len: int) -> dict[str, torch.Tensor]:
        """Score ``responses[i]`` after ``prompts[i]`` (teacher prompt token ids); tensors padded to
        ``response_len``. One call scores the whole batch, split across the actors."""
        import ray

        if len(prompts) != len(responses):
            raise ValueError(f"TeacherService.score: {len(prompts)} prompts for {len(responses)} responses")
        B, R, K = len(responses), int(response_len), self.top_k
        out = self.empty(B, R)
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        starts = [len(p) for p in prompts]
        actors = self.pool.actors
        n = len(actors)
        bounds = [(i * B // n, (i + 1) * B // n) for i in range(n)]
        refs = [(s, actors[i].score_topk.remote(seqs[s:e], starts[s:e], K)) for i, (s, e) in enumerate(bounds) if e > s]
        for s, ref in refs:
            for j, res in enumerate(ray.get(ref)):
                i = s + j
                L = min(len(responses[i]), R)
                if len(res["logprobs"]) != len(responses[i]):
                    raise RuntimeError(f"teacher returned {len(res['logprobs'])} log-probs for a response of "
                                       f"{len(responses[i])} tokens")
                out["teacher_logprobs"][i, :L] = torch.as_tensor(res["logprobs"][:L])
                out["teacher_topk_ids"][i, :L] = torch.as_tensor(res["topk_ids"][:L], dtype=torch.long)
                out["teacher_topk_logprobs"][i, :L] = torch.as_tensor(res["topk_logprobs"][:L])
        self.calls += 1
        self.tokens += sum(len(r) for r in responses)
        return out

    def empty(self, batch_size: int, response_len: int) -> dict[str, torch.Tensor]:
        """Teacher fields of ``batch_size`` unscored rows (what padding and skipped rows carry)."""
        B, R, K = batch_size, response_len, self.top_k
        return {"teacher_logprobs": torch.zeros(B, R), "teacher_topk_ids": torch.zeros(B, R, K, dtype=torch.long),
                "teacher_topk_logprobs": torch.full((B, R, K), -1e4)}  # a finite, negligible log-prob

    # ------------------------------------------------------------------ weights
    def wants_sync(self, step: int) -> bool:
        """Whether a ``self`` teacher takes the learner's weights before scoring at ``step``
        (every ``resync_every`` steps, counted from 0; step 0 uses the initial checkpoint)."""
        return self.kind == "self" and self.resync_every > 0 and step > 0 and step % self.resync_every == 0

    def sync(self, state_ref, version: int) -> float:
        """Load the learner's weights (``state_ref``: an object ref to the full state dict), or blend them
        into the EMA when ``ema_decay > 0`` (the first sync seeds the EMA with them)."""
        import ray

        t0 = time.perf_counter()
        if self.ema_decay:
            new = ray.get(state_ref)
            if self._ema_state is None:
                self._ema_state = {k: v.detach().float().clone() for k, v in new.items()}
            else:
                d = self.ema_decay
                for k, v in new.items():
                    self._ema_state[k].mul_(d).add_(v.float(), alpha=1.0 - d)
            state_ref = ray.put(self._ema_state)
        self.pool.update_weights(state_ref, version=version)
        self.version, self.syncs = int(version), self.syncs + 1
        return time.perf_counter() - t0

    def stats(self) -> dict[str, float]:
        return {"teacher/calls": float(self.calls), "teacher/tokens": float(self.tokens),
                "teacher/syncs": float(self.syncs), "teacher/version": float(self.version)}

    def shutdown(self) -> None:
        self.pool.shutdown()
