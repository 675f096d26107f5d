"""The learner's loss on one micro-batch: a sum of per-channel losses, plus the KL and entropy terms.

A batch carries ``channel_names`` (C names) and ``channel_weights`` ``[C, B, R]`` (DESIGN.md, "The
methods, in one place"). Each channel is handled by the loss registered for its *kind*: the part of
its name before the first ``":"`` (``"pg"``, ``"pg:key"`` -> kind ``pg``), so a new objective is one
function registered with :func:`register_channel_loss`, not an edit of the learner.

Every term is normalised by counts taken over the WHOLE mini-batch (all micro-batches, all ranks;
see :func:`global_counts`), so the micro-batch losses of all ranks add up to the mini-batch loss
(NeMo-RL's "global valid tokens"; DESIGN.md, Conventions). The learner only has to sum them.

Only torch, the standard library and ``trace_rl.algo`` are imported: the loss runs and is tested
without Ray or DeepSpeed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from trace_rl.algo.aggregation import aggregate, loss_counts
from trace_rl.algo.kl import kl_estimate
from trace_rl.algo.policy_loss import get_policy_loss
from trace_rl.algo.registry import decorator_into, lookup
from trace_rl.batch import Batch

__all__ = [
    "Counts", "ChannelInputs", "ChannelLoss", "CHANNEL_LOSSES", "register_channel_loss", "channel_kind",
    "channel_weights", "global_counts", "check_channels", "LossTerms", "micro_batch_loss", "RESPONSE",
]

# Key of the counts over every response token (the KL and entropy terms use them).
RESPONSE = "_response"


@dataclass(frozen=True)
class Counts:
    """Global normalisers of one mask over a mini-batch (all micro-batches, all ranks)."""
    num_tokens: float
    """Tokens whose weight is non-zero."""
    num_seqs: float
    """Sequences with at least one such token."""
    max_len: int
    """Response length used by the constant-normaliser mode (seq-mean-token-sum-norm)."""


def channel_kind(name: str) -> str:
    """The loss kind of a channel: its name up to the first ``":"`` (``"pg:key"`` -> ``"pg"``)."""
    return name.split(":", 1)[0]


def channel_weights(batch: Batch) -> dict[str, Tensor]:
    """``{channel name: weight [B, R] float32}``, zero outside ``response_mask``.

    A batch without channels (``channel_weights is None``) is one ``"pg"`` channel of weight 1 on
    every response token: what the GRPO family produces.
    """
    mask = batch.response_mask.to(torch.float32)
    if batch.channel_weights is None or not batch.channel_names:
        return {"pg": mask}
    return {name: batch.channel_weights[c].to(torch.float32) * mask for c, name in enumerate(batch.channel_names)}


def global_counts(batch: Batch, max_len: int | None = None) -> dict[str, Counts]:
    """Counts of every channel (and of all response tokens, key :data:`RESPONSE`) over ``batch``.

    Call it on the whole mini-batch (before sharding it across ranks) and give the result to every
    rank: the losses are then normalised globally. ``max_len`` defaults to the batch's padded
    response length; pass the generation budget for Dr. GRPO's constant normaliser.
    """
    L = int(batch.response_len if max_len is None else max_len)
    out: dict[str, Counts] = {}
    for name, w in {**channel_weights(batch), RESPONSE: batch.response_mask}.items():
        c = loss_counts(w)
        out[name] = Counts(float(c["num_tokens"]), float(c["num_seqs"]), L)
    return out


# ------------------------------------------------------------------------------------ channel registry
@dataclass
class ChannelInputs:
    """What a channel loss receives for one micro-batch on one rank."""
    name: str
    """The channel's full name (e.g. ``"pg"`` or ``"pg:key"``)."""
    weight: Tensor
    """[b, R] float32 channel weight, 0 off the channel and on padding."""
    counts: Counts
    """Global normalisers of this channel over the mini-batch."""
    logprobs: Tensor
    """[b, R] current log-probs at the rollout temperature (differentiable; 0 on padding)."""
    old_logprobs: Tensor
    """[b, R] the ratio's denominator (recomputed or behaviour log-probs), detached."""
    batch: Batch
    """The micro-batch (advantages, teacher top-k, ... live here)."""
    algo: Any
    """The AlgorithmConfig (clip range, aggregation mode, ...)."""
    entropy: Tensor | None = None
    """[b, R] per-token entropy (differentiable only when the entropy bonus is on)."""


ChannelFn = Callable[[ChannelInputs], "tuple[Tensor, dict[str, Tensor]]"]


@dataclass(frozen=True)
class ChannelLoss:
    """A registered channel kind: ``fn(inputs) -> (scalar loss, metrics)`` and the batch fields it needs."""
    kind: str
    fn: ChannelFn
    needs: tuple[str, ...] = field(default=())


CHANNEL_LOSSES: dict[str, ChannelLoss] = {}


def register_channel_loss(kind: str, needs: tuple[str, ...] = ()) -> Callable[[ChannelFn], ChannelFn]:
    """Decorator: register ``fn(ChannelInputs) -> (loss, metrics)`` for channels of ``kind``.

    ``needs`` names the Batch fields the loss reads (checked before training starts, so a batch
    missing one fails with a clear error instead of deep inside a rank). The loss must already be
    normalised by ``inputs.counts`` (global counts), so that the learner can simply sum it.
    """
    def deco(fn: ChannelFn) -> ChannelFn:
        decorator_into(CHANNEL_LOSSES, "channel loss", kind)(ChannelLoss(kind, fn, tuple(needs)))
        return fn

    return deco


def check_channels(batch: Batch) -> None:
    """Raise ValueError if a channel has no registered loss or the batch lacks a field it needs."""
    names = batch.channel_names if batch.channel_weights is not None and batch.channel_names else ("pg",)
    for name in names:
        spec = lookup(CHANNEL_LOSSES, "channel loss kind", channel_kind(name))
        for f in spec.needs:
            if getattr(batch, f, None) is None:
                raise ValueError(f"channel {name!r} needs Batch.{f}, which is None; fill it before the learner "
                                 f"step (kind {spec.kind!r} reads it)")


@register_channel_loss("pg", needs=("advantages",))
def pg_channel_loss(x: ChannelInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy gradient with ``batch.advantages``, weighted by the channel and aggregated over
    the channel's tokens with ``algo.loss_agg_mode`` (global counts)."""
    a = x.algo
    mask = x.weight != 0
    per_token, metrics = get_policy_loss(getattr(a, "policy_loss", "ppo_clip"))(
        x.logprobs, x.old_logprobs, x.batch.advantages, mask, eps_low=a.clip_eps_low, eps_high=a.clip_eps_high,
        dual_clip=a.dual_clip, log_ratio_clamp=a.log_ratio_clamp)
    loss = aggregate(per_token, x.weight, a.loss_agg_mode, num_tokens=x.counts.num_tokens,
                     num_seqs=x.counts.num_seqs, max_len=x.counts.max_len)
    return loss, metrics


# ------------------------------------------------------------------------------------ the whole loss
@dataclass
class LossTerms:
    """The micro-batch loss and its parts (each already globally normalised, so they add up)."""
    loss: Tensor
    """Scalar to back-propagate: sum of channel losses + kl_coef * kl - entropy_coef * entropy."""
    parts: dict[str, Tensor]
    """Detached scalars: ``pg_loss`` (channels of kind pg), ``loss/<channel>``, ``kl``, ``entropy``."""
    token_metrics: dict[str, tuple[float, float]]
    """``name -> (value, local token count)`` of per-token means, to be token-weighted across micro-batches."""


def micro_batch_loss(batch: Batch, logprobs: Tensor, old_logprobs: Tensor, counts: dict[str, Counts], algo: Any,
                     *, entropy: Tensor | None = None, ref_logprobs: Tensor | None = None) -> LossTerms:
    """The loss of one micro-batch (``batch`` holds its rows; ``counts`` are the mini-batch's global counts).

    ``logprobs`` / ``old_logprobs`` / ``entropy`` / ``ref_logprobs`` are ``[b, R]`` over the
    micro-batch's responses. KL (``algo.kl_coef > 0``, needs ``ref_logprobs``) and entropy
    (``algo.entropy_coef > 0``, needs a differentiable ``entropy``) are aggregated over all response
    tokens with ``algo.loss_agg_mode`` and the global response counts.
    """
    resp = counts[RESPONSE]
    mask = batch.response_mask
    total = logprobs.new_zeros(())
    parts: dict[str, Tensor] = {}
    token_metrics: dict[str, tuple[float, float]] = {}
    pg_total = logprobs.new_zeros(())
    for name, w in channel_weights(batch).items():
        if name not in counts:
            raise ValueError(f"no global counts for channel {name!r} (have {sorted(counts)}); "
                             f"compute them with global_counts() on the whole mini-batch")
        spec = lookup(CHANNEL_LOSSES, "channel loss kind", channel_kind(name))
        inputs = ChannelInputs(name=name, weight=w.to(logprobs.device), counts=counts[name], logprobs=logprobs,
                               old_logprobs=old_logprobs.detach(), batch=batch, algo=algo, entropy=entropy)
        loss_c, metrics = spec.fn(inputs)
        total = total + loss_c
        parts[f"loss/{name}"] = loss_c.detach()
        if spec.kind == "pg":
            pg_total = pg_total + loss_c.detach()
        n_local = float((w != 0).sum())
        prefix = "" if name == "pg" else f"{name}/"
        for k, v in metrics.items():
            token_metrics[prefix + k] = (float(v), n_local)
    parts["pg_loss"] = pg_total

    n_resp = float(mask.sum())
    if algo.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("algo.kl_coef > 0 needs ref_logprobs (the frozen reference model's log-probs)")
        kl = kl_estimate(logprobs, ref_logprobs.detach(), algo.kl_estimator,
                         log_ratio_clamp=algo.log_ratio_clamp)
        kl_term = aggregate(kl, mask, algo.loss_agg_mode, num_tokens=resp.num_tokens, num_seqs=resp.num_seqs,
                            max_len=resp.max_len)
        total = total + algo.kl_coef * kl_term
        parts["kl"] = kl_term.detach()
    if entropy is not None:
        ent_term = aggregate(entropy, mask, algo.loss_agg_mode, num_tokens=resp.num_tokens,
                             num_seqs=resp.num_seqs, max_len=resp.max_len)
        if algo.entropy_coef > 0:
            total = total - algo.entropy_coef * ent_term
        # reported as a token mean whatever the aggregation mode (DESIGN.md metric train/entropy)
        token_metrics["entropy"] = (float(_masked_mean(entropy.detach(), mask)), n_resp)
    return LossTerms(loss=total, parts=parts, token_metrics=token_metrics)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.bool()
    return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1)
