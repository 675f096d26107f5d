"""The ``advantage`` stage: one step's finished chunks -> the learners' shards.

:func:`route_batch` is a pure function (torch and the algorithm core only, tested without Ray); the
pipeline runs it in the reward stage's actor (the :class:`RouteStage` methods, mixed in by
``_reward_route_stage``) with the chunks' object refs as arguments, so the batch goes from the stage
actors to that actor and from it to the learner ranks without passing through the driver. What it does, in order:

1. concatenate the step's chunks and order the rows by group (the order of the lockstep loop);
2. run the method (``algorithm.name``) on rewards and whatever the method needs at the learner's step
   (annotation masks, teacher fields, entropy, response ids) -> advantages and channels;
3. drop zero-variance groups that carry no other channel (``algorithm.filter_zero_variance``);
4. pad to a multiple of ``num_ranks x num_mini_batches`` with zero-weight rows, compute every
   mini-batch's global token counts, and cut the rank shards (:func:`trace_rl.learner.group.shard_rows`).

It returns the shards plus a :class:`RouteInfo`: the small summary the driver fetches (metrics, counts,
versions), a few hundred bytes whatever the batch size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from trace_rl.batch import Batch
from trace_rl.learner.group import check_token_ids, shard_rows

__all__ = ["RouteSpec", "RouteInfo", "RouteStage", "route_batch", "concat_chunks", "pad_rows_to_multiple",
           "shard_rows"]


@dataclass(frozen=True)
class RouteSpec:
    """Everything the routing of one step needs besides the batch (small, built by the driver)."""
    method: str
    params: dict[str, Any]             # asdict(algorithm) + {"step": learner step}
    needs: frozenset[str]              # the method's needs at that step
    filter_zero_variance: bool
    num_ranks: int
    num_mini_batches: int
    max_len: int                       # rollout.max_new_tokens (the seq-mean-token-sum-norm budget)
    pad_token_id: int
    vocab_size: int | None = None
    sort_by_length: bool = False       # learner.sort_by_length: similar lengths share micro-batches


@dataclass
class RouteInfo:
    """What the driver learns about a routed step (no tensors)."""
    step: int
    rows: int                          # rollout rows of the step
    learn_rows: int                    # rows kept for learning (before padding)
    padded_rows: int                   # rows in the shards (learn_rows + zero-weight padding)
    tokens: int                        # response tokens of the step
    counts: list = field(default_factory=list)     # per mini-batch {channel: Counts} (global normalisers)
    metrics: dict[str, float] = field(default_factory=dict)
    exposure: tuple[int, int, int, float] = (0, 0, 0, 0.0)  # response tokens, teacher tokens, grad tokens, lambda
    versions: dict[int, int] = field(default_factory=dict)  # policy version -> rows (of the learned rows)
    seconds: float = 0.0

    @property
    def skipped(self) -> bool:
        return self.learn_rows == 0


def pad_rows_to_multiple(batch: Batch, multiple: int) -> Batch:
    """Append copies of the first rows with zero channel weight so that len(batch) % multiple == 0.
    They take part in the forward pass but in no loss term and no normaliser."""
    extra = (-len(batch)) % multiple
    if extra == 0:
        return batch
    idx = torch.arange(extra) % len(batch)
    pad = batch.select(idx)
    pad.channel_weights = torch.zeros_like(pad.channel_weights)
    pad.advantages = torch.zeros_like(pad.advantages)
    pad.meta = {k: [None] * extra for k in batch.meta}
    return Batch.concat([batch, pad], pad_token_id=0)


def length_order(batch: Batch, num_mini_batches: int, num_ranks: int) -> torch.Tensor:
    """A row order that puts rows of similar length into the same micro-batches without changing what any
    mini-batch or rank trains on in total: within each mini-batch, rows sorted by length (longest first) are
    dealt to the ranks in turn, so every rank gets a balanced, sorted share (its micro-batches, cut in
    order, then need little padding; ``trace_rl.learner.policy.model_inputs`` trims the rest)."""
    n = len(batch) // num_mini_batches
    lengths = batch.response_mask.sum(1) + batch.prompt_mask.sum(1)
    order = []
    for m in range(num_mini_batches):
        block = torch.arange(m * n, (m + 1) * n)
        ranked = block[torch.sort(lengths[block], descending=True, stable=True).indices]
        order.extend(ranked[r::num_ranks] for r in range(num_ranks))
    return torch.cat(order)


def concat_chunks(chunks: list[Batch], pad_token_id: int) -> Batch:
    """One batch of a step's chunks, rows ordered by group id (stable: the samples of a group keep their
    order), i.e. exactly the batch the lockstep loop built from one ``generate`` call."""
    batch = chunks[0] if len(chunks) == 1 else Batch.concat(list(chunks), pad_token_id=pad_token_id)
    order = torch.sort(batch.group_ids, stable=True).indices
    if bool((order != torch.arange(len(batch))).any()):
        batch = batch.select(order)
    return batch


def route_batch(spec: RouteSpec, batch: Batch, entropy: torch.Tensor | None = None
                ) -> tuple[list[Batch | None], RouteInfo]:
    """Shards (one per rank; all None when nothing is learnable) and the :class:`RouteInfo` of one step."""
    from trace_rl.algo import MethodInputs, compute_method, get_method
    from trace_rl.algo.advantages import zero_variance_mask
    from trace_rl.algo.channels import channel_kind
    from trace_rl.algo.exposure import exposure_counts, teacher_coef
    from trace_rl.algo.methods.base import KNOWN_NEEDS, TEACHER_NEEDS
    from trace_rl.learner.loss import check_channels, global_counts

    t0 = time.perf_counter()
    step = int(spec.params["step"])
    method = get_method(spec.method)
    needs = spec.needs
    extra: dict[str, torch.Tensor] = {}
    if "annotations" in needs:
        extra.update(key_mask=batch.key_mask, error_mask=batch.error_mask)
    if needs & TEACHER_NEEDS:
        extra.update(teacher_logprobs=batch.teacher_logprobs, teacher_topk_ids=batch.teacher_topk_ids,
                     teacher_topk_logprobs=batch.teacher_topk_logprobs)
    if "entropy" in needs:
        if entropy is None:
            raise ValueError(f"method {spec.method!r} needs the policy's entropy; none was computed")
        extra["entropy"] = entropy.float()
    if "prefix_tree" in needs:
        extra["response_ids"] = batch.response_ids
    if "reference" in needs:
        raise ValueError("no method shipped with trace_rl needs reference log-probs yet; the driver has no "
                         "reference model (use algorithm.kl_coef for a KL penalty to the initial policy)")
    missing = [k for need in needs for k in KNOWN_NEEDS[need] if extra.get(k) is None]
    if missing:
        raise ValueError(f"method {spec.method!r} needs {missing} at step {step}; the stage that fills them "
                         f"did not run (check the annotator / teacher configuration)")
    metrics: dict[str, float] = {}
    # rows whose privileged prompt + response did not fit the teacher's context (TeacherScorer): a method that
    # routes annotated spans to the teacher sees them unannotated; one that reads the teacher on every row
    # does not learn from them
    skipped = torch.tensor([bool(x) for x in batch.meta.get("teacher_skipped") or []] or [False] * len(batch))
    if needs & TEACHER_NEEDS and bool(skipped.any()) and method.teacher_rows == "annotated" \
            and batch.key_mask is not None:
        extra["key_mask"] = batch.key_mask = batch.key_mask & ~skipped[:, None]
        extra["error_mask"] = batch.error_mask = batch.error_mask & ~skipped[:, None]
    if needs & TEACHER_NEEDS:
        metrics["teacher/too_long_rows"] = float(skipped.sum())
        rows = None
        if method.teacher_rows == "annotated" and batch.key_mask is not None:
            rows = (batch.key_mask | batch.error_mask).any(dim=1)
        mask = batch.response_mask if rows is None else batch.response_mask & rows[:, None]
        gap = (batch.behaviour_logprobs - batch.teacher_logprobs)[mask]
        metrics["teacher/student_minus_teacher_logprob"] = float(gap.mean()) if gap.numel() else 0.0
        metrics["teacher/scored_frac"] = (float(rows.sum()) if rows is not None else len(batch)) / max(len(batch), 1)

    out = compute_method(method, MethodInputs(batch.rewards, batch.group_ids, batch.response_mask, extra=extra,
                                              behaviour_logprobs=batch.behaviour_logprobs), spec.params)
    batch.advantages, batch.channel_names, batch.channel_weights, batch.channel_norms = (
        out.advantages, out.channel_names, out.channel_weights, out.channel_norms)
    if not needs & TEACHER_NEEDS:  # nothing reads teacher fields this step: do not ship them
        batch.teacher_logprobs = batch.teacher_topk_ids = batch.teacher_topk_logprobs = None
    batch.key_mask = batch.error_mask = None  # the learner never reads them
    metrics.update(out.metrics)  # already namespaced: adv/..., route/..., coef/...
    zero_var = zero_variance_mask(batch.rewards, batch.group_ids)
    keep = torch.ones(len(batch), dtype=torch.bool)
    if spec.filter_zero_variance:
        # a zero-variance group has no GRPO signal, but its rows may still carry another channel
        # (TRACE's KL on key spans of an all-correct group): keep those rows
        other = [c for c, name in enumerate(batch.channel_names) if channel_kind(name) != "pg"]
        routed = (batch.channel_weights[other] != 0).any(dim=0).any(dim=1) if other else torch.zeros_like(keep)
        keep = ~zero_var | routed
    if needs & TEACHER_NEEDS and method.teacher_rows != "annotated":
        keep = keep & ~skipped
    exposure = exposure_counts(batch.channel_names, batch.channel_weights, batch.response_mask, learned_rows=keep)
    lengths = batch.response_mask.sum(1).float()
    metrics.update({
        "train/reward_mean": batch.rewards.mean().item(),
        "train/accuracy": (batch.rewards > 0.5).float().mean().item(),
        "train/response_length": lengths.mean().item(),
        "train/truncated_frac": sum(r == "length" for r in batch.meta["finish_reason"]) / len(batch),
        "train/zero_variance_frac": zero_var.float().mean().item(),
        "train/learn_sequences": float(int(keep.sum())),
        # what the lockstep driver used to hold (and fetch / put again) each step; now it stays out of it
        "pipeline/batch_bytes": float(batch.nbytes()),
    })
    info = RouteInfo(step=step, rows=len(batch), learn_rows=int(keep.sum()), padded_rows=0,
                     tokens=batch.num_response_tokens(), metrics=metrics,
                     exposure=(*exposure, teacher_coef(out.metrics)))
    W, M = int(spec.num_ranks), int(spec.num_mini_batches)
    if info.learn_rows == 0:
        info.seconds = time.perf_counter() - t0
        return [None] * W, info
    learn = batch.select(keep)
    info.versions = {int(v): int(c) for v, c in zip(*torch.unique(learn.policy_version, return_counts=True))}
    learn = pad_rows_to_multiple(learn, W * M)
    if spec.sort_by_length:  # the loss is a sum with global normalisers: row order changes only float rounding
        learn = learn.select(length_order(learn, M, W))
    learn.meta = {}  # never needed by the learner's math; not shipped to the ranks
    learn.validate()
    check_channels(learn)
    check_token_ids(learn, spec.vocab_size)
    info.padded_rows = len(learn)
    info.counts = [global_counts(mini, max_len=spec.max_len) for mini in learn.split(M)]
    shards = [learn.select(shard_rows(len(learn), M, W, r)) for r in range(W)]
    info.seconds = time.perf_counter() - t0
    return shards, info


class RouteStage:
    """The routing stage as a Ray actor: one warm process (torch and the algorithm core imported once, at
    start-up) that routes each step (:meth:`route`) and, for methods that need the learners to read the
    whole batch first (entropy), concatenates the step's chunks (:meth:`concat`)."""

    def ready(self) -> int:
        import os

        from trace_rl.algo import compute_method  # noqa: F401 - import now, not in the first step
        return os.getpid()

    def route(self, spec: RouteSpec, n_chunks: int, *parts: Any) -> tuple:
        """``parts`` = the step's ``n_chunks`` chunks (or one concatenated batch) followed, when the method
        needs it, by the learner ranks' entropy pieces. Returns ``(*shards, info)`` (call it with
        ``num_returns = num_ranks + 1``)."""
        chunks, ent = list(parts[:n_chunks]), list(parts[n_chunks:])
        batch = concat_chunks(chunks, spec.pad_token_id)
        entropy = torch.cat(ent)[:len(batch)] if ent else None
        shards, info = route_batch(spec, batch, entropy)
        return (*shards, info)

    def concat(self, pad_token_id: int, *chunks: Batch) -> Batch:
        return concat_chunks(list(chunks), pad_token_id)


def _reward_route_stage():
    from trace_rl.pipeline.stages import RewardStage

    class RewardRouteStage(RewardStage, RouteStage):
        """The reward and the routing stage in one actor process: one Python process, torch and the algorithm
        core fewer to start (about 5 CPU-seconds of a 2-core machine's start-up). Safe to share: the producer
        submits a step's routing after every reward call of that step and before any of the next step's, so a
        routing call never queues behind a chunk that is still being generated."""

        def ready(self) -> int:
            return RouteStage.ready(self)

    return RewardRouteStage

