"""The learner's loss on one micro-batch: a sum of per-channel losses, plus the KL and entropy terms.

A batch carries ``channel_names`` (C names) and ``channel_weights`` ``[C, B, R]`` (DESIGN.md, "The
methods, in one place"). Each channel is handled by the loss registered for its *kind*: the part of
its name before the first ``":"`` (``"pg"``, ``"pg:key"`` -> kind ``pg``), so a new objective is one
function registered with :func:`register_channel_loss`, not an edit of the learner.

Every term is normalised by counts taken over the WHOLE mini-batch (all micro-batches, all ranks;
see :func:`global_counts`), so the micro-batch losses of all ranks add up to the mini-batch loss
(NeMo-RL's "global valid tokens"; DESIGN.md, Conventions). The learner only has to sum them.
A channel's normaliser is ``Batch.channel_norms[c]`` (:func:`reduce_channel`): ``"agg"`` (default)
aggregates with ``algo.loss_agg_mode``; ``"token"`` divides ``sum(w * x)`` by the channel's global
token count; ``"seq"`` by its global sequence count.

Channel kinds registered here (``trace_rl/algo/channels.py`` lists them): ``pg`` (clipped policy
gradient with ``Batch.advantages``), ``fkl`` / ``rkl`` / ``jsd`` (divergence on the vocabulary from
the teacher's top-k, :func:`trace_rl.algo.vocab_kl.topk_divergence`), ``mle`` (``-log p`` of the
sampled token), ``logratio`` (clipped policy gradient with the dense advantage ``teacher_lp -
old_lp``) and ``skl`` (sampled-token KL estimator of the student vs ``Batch.teacher_logprobs``).

Only torch, the standard library and ``trace_rl.algo`` are imported: the loss runs and is tested
without Ray or DeepSpeed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from trace_rl.algo.aggregation import BALANCED_COUNTS, aggregate, loss_counts
from trace_rl.algo.kl import kl_estimate
from trace_rl.algo.policy_loss import get_policy_loss, masked_mean, truncated_is_weights
from trace_rl.algo.registry import decorator_into, lookup
from trace_rl.algo.vocab_kl import sampled_kl, topk_divergence
from trace_rl.batch import CHANNEL_NORMS, Batch

__all__ = [
    "Counts", "ChannelInputs", "ChannelLoss", "CHANNEL_LOSSES", "register_channel_loss", "channel_kind",
    "channel_weights", "channel_norms", "global_counts", "check_channels", "needs_topk", "reduce_channel", "LossTerms",
    "micro_batch_loss", "RESPONSE",
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
    num_pos_tokens: float = 0.0
    """``balanced`` mode: tokens of sequences with a positive advantage."""
    num_pos_seqs: float = 0.0
    """``balanced`` mode: sequences with a positive advantage."""
    num_neg_tokens: float = 0.0
    """``balanced`` mode: tokens of sequences with a negative advantage."""
    num_neg_seqs: float = 0.0
    """``balanced`` mode: sequences with a negative advantage."""


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


def channel_norms(batch: Batch) -> dict[str, str]:
    """``{channel name: norm}``; an empty ``Batch.channel_norms`` means ``"agg"`` for every channel."""
    names = tuple(channel_weights(batch))
    norms = tuple(batch.channel_norms) if batch.channel_weights is not None and batch.channel_names else ()
    if not norms:
        return {n: "agg" for n in names}
    if len(norms) != len(names) or any(n not in CHANNEL_NORMS for n in norms):
        raise ValueError(f"Batch.channel_norms={norms} must give one of {CHANNEL_NORMS} per channel {names}, "
                         f"or be () for all 'agg'")
    return dict(zip(names, norms))


def global_counts(batch: Batch, max_len: int | None = None) -> dict[str, Counts]:
    """Counts of every channel (and of all response tokens, key :data:`RESPONSE`) over ``batch``.

    Call it on the whole mini-batch (before sharding it across ranks) and give the result to every
    rank: the losses are then normalised globally. ``max_len`` defaults to the batch's padded
    response length; pass the generation budget for Dr. GRPO's constant normaliser.
    """
    L = int(batch.response_len if max_len is None else max_len)
    out: dict[str, Counts] = {}
    for name, w in {**channel_weights(batch), RESPONSE: batch.response_mask}.items():
        c = loss_counts(w, advantages=batch.advantages)
        out[name] = Counts(float(c["num_tokens"]), float(c["num_seqs"]), L,
                           **{k: float(c[k]) for k in BALANCED_COUNTS if k in c})
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
    topk_logprobs: Tensor | None = None
    """[b, R, K] student log-probs at ``batch.teacher_topk_ids`` (differentiable; 0 on padding)."""
    norm: str = "agg"
    """How the loss is normalised (:func:`reduce_channel`)."""


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
    channel_norms(batch)
    names = batch.channel_names if batch.channel_weights is not None and batch.channel_names else ("pg",)
    for name in names:
        spec = lookup(CHANNEL_LOSSES, "channel loss kind", channel_kind(name))
        for f in spec.needs:
            if getattr(batch, f, None) is None:
                raise ValueError(f"channel {name!r} needs Batch.{f}, which is None; fill it before the learner "
                                 f"step (kind {spec.kind!r} reads it)")


def needs_topk(batch: Batch) -> bool:
    """Whether a channel of ``batch`` reads the student's log-probs at the teacher's top-k ids (then the
    learner's forward gathers them)."""
    if batch.teacher_topk_ids is None or batch.channel_weights is None:
        return False
    return any("teacher_topk_ids" in lookup(CHANNEL_LOSSES, "channel loss kind", channel_kind(n)).needs
               for n in batch.channel_names)


def reduce_channel(per_token: Tensor, x: ChannelInputs) -> Tensor:
    """``per_token`` [b, R] weighted by the channel and normalised by ``x.norm`` with the global counts:
    ``"agg"``: :func:`aggregate` with ``algo.loss_agg_mode``; ``"token"``: ``sum(w x) / num_tokens``;
    ``"seq"``: ``sum(w x) / num_seqs`` (a span mean scaled by span / response length is weight
    ``1 / n_i`` with norm ``"seq"``). Padding and tokens with ``w = 0`` never leak in (even as NaN)."""
    c = x.counts
    mode = {"agg": x.algo.loss_agg_mode, "token": "token-mean", "seq": "seq-mean-token-sum"}[x.norm]
    if mode == "balanced":  # token means over positive / negative-advantage sequences, by sequence counts
        return aggregate(per_token, x.weight, mode, num_tokens=c.num_tokens, num_seqs=c.num_seqs,
                         max_len=c.max_len, advantages=x.batch.advantages,
                         **{k: getattr(c, k) for k in BALANCED_COUNTS})
    return aggregate(per_token, x.weight, mode, num_tokens=c.num_tokens, num_seqs=c.num_seqs, max_len=c.max_len)


def _clipped_pg(x: ChannelInputs, advantages: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped policy-gradient term; with ``algo.behaviour_is == "on"`` (asynchronous training) each
    token is also weighted by the truncated importance weight between the proximal policy
    (``x.old_logprobs``) and the behaviour policy that sampled it (:func:`truncated_is_weights`)."""
    a = x.algo
    mask = x.weight != 0
    per_token, metrics = get_policy_loss(getattr(a, "policy_loss", "ppo_clip"))(
        x.logprobs, x.old_logprobs, advantages, mask, eps_low=a.clip_eps_low, eps_high=a.clip_eps_high,
        dual_clip=a.dual_clip, log_ratio_clamp=a.log_ratio_clamp)
    if getattr(a, "behaviour_is", "off") == "on":
        w, is_metrics = truncated_is_weights(x.old_logprobs, x.batch.behaviour_logprobs.to(x.old_logprobs.device),
                                             mask, float(a.behaviour_is_cap), log_ratio_clamp=a.log_ratio_clamp)
        per_token = per_token * w
        metrics = {**metrics, **is_metrics}
    return reduce_channel(per_token, x), metrics


def _token_mean(v: Tensor, x: ChannelInputs) -> Tensor:
    """Unweighted mean of ``v`` over the channel's tokens of this micro-batch (a detached metric)."""
    return masked_mean(v.detach(), x.weight != 0)


@register_channel_loss("pg", needs=("advantages",))
def pg_channel_loss(x: ChannelInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy gradient with ``batch.advantages``, weighted by the channel and normalised by its
    norm (``"agg"``: ``algo.loss_agg_mode`` over the channel's tokens, global counts)."""
    return _clipped_pg(x, x.batch.advantages)


_TOPK = ("teacher_topk_ids", "teacher_topk_logprobs")


def _vocab_divergence_channel(kind: str):
    def loss(x: ChannelInputs) -> tuple[Tensor, dict[str, Tensor]]:
        if x.topk_logprobs is None:
            raise ValueError(f"channel {x.name!r} needs the student's log-probs at the teacher's top-k ids "
                             f"(ChannelInputs.topk_logprobs); pass topk_logprobs= to micro_batch_loss")
        a = x.algo
        div = topk_divergence(x.topk_logprobs, x.batch.teacher_topk_logprobs.to(x.topk_logprobs.device), kind,
                              beta=getattr(a, "jsd_beta", 0.5), tail=getattr(a, "vocab_kl_tail", "bucket"),
                              entry_clip=getattr(a, "vocab_kl_entry_clip", None))
        return reduce_channel(div, x), {f"kl/{x.name}": _token_mean(div, x)}

    loss.__name__ = loss.__qualname__ = f"{kind}_channel_loss"
    loss.__doc__ = (f"{kind} divergence on the vocabulary from the teacher's top-k (``algo.vocab_kl_tail``, "
                    f"``algo.vocab_kl_entry_clip``, ``algo.jsd_beta``); logs ``kl/<channel>``, its token mean.")
    return loss


fkl_channel_loss = register_channel_loss("fkl", needs=_TOPK)(_vocab_divergence_channel("forward"))
rkl_channel_loss = register_channel_loss("rkl", needs=_TOPK)(_vocab_divergence_channel("reverse"))
jsd_channel_loss = register_channel_loss("jsd", needs=_TOPK)(_vocab_divergence_channel("jsd"))


@register_channel_loss("mle")
def mle_channel_loss(x: ChannelInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy of the sampled tokens, ``-log p(y_t)``, weighted and normalised by the channel."""
    nll = -x.logprobs
    return reduce_channel(nll, x), {"nll": _token_mean(nll, x)}


@register_channel_loss("logratio", needs=("teacher_logprobs",))
def logratio_channel_loss(x: ChannelInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy gradient whose per-token advantage is ``teacher_lp - old_lp`` (detached): the
    sampled-token reverse-KL reward of on-policy distillation. Logs ``kl/<channel>``, the token mean
    of ``old_lp - teacher_lp`` (the k1 estimate of KL(student || teacher))."""
    adv = (x.batch.teacher_logprobs.to(x.old_logprobs.device) - x.old_logprobs).detach()
    loss, metrics = _clipped_pg(x, adv)
    return loss, {**metrics, f"kl/{x.name}": _token_mean(-adv, x)}


@register_channel_loss("skl", needs=("teacher_logprobs",))
def skl_channel_loss(x: ChannelInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """Sampled-token estimator (``algo.kl_estimator``: k1/k2/k3) of KL(student || teacher), differentiable
    in the student; logs ``kl/<channel>``, its token mean."""
    kl = sampled_kl(x.logprobs, x.batch.teacher_logprobs.to(x.logprobs.device), x.algo.kl_estimator,
                    log_ratio_clamp=x.algo.log_ratio_clamp)
    return reduce_channel(kl, x), {f"kl/{x.name}": _token_mean(kl, x)}


# ------------------------------------------------------------------------------------ the whole loss
@dataclass
class LossTerms:
    """The micro-batch loss and its parts (each already globally normalised, so they add up)."""
    loss: Tensor
    """Scalar to back-propagate: sum of channel losses + kl_coef * kl - entropy_coef * entropy."""
    parts: dict[str, Tensor]
    """Detached scalars: ``pg_loss`` (channels of kind pg), ``loss/<channel>``, ``kl``, ``entropy``."""
    token_metrics: dict[str, tuple[float, float]]
    """``name -> (value, local token count)`` of per-token means, to be token-weighted across micro-batches.
    A channel's metric ``k`` is named ``<channel>/k`` (plain ``k`` for the channel ``"pg"``), unless
    ``k`` already has a ``"/"`` (``kl/<channel>``): then it is kept as is."""


def micro_batch_loss(batch: Batch, logprobs: Tensor, old_logprobs: Tensor, counts: dict[str, Counts], algo: Any,
                     *, entropy: Tensor | None = None, ref_logprobs: Tensor | None = None,
                     topk_logprobs: Tensor | None = None) -> LossTerms:
    """The loss of one micro-batch (``batch`` holds its rows; ``counts`` are the mini-batch's global counts).

    ``logprobs`` / ``old_logprobs`` / ``entropy`` / ``ref_logprobs`` are ``[b, R]`` over the
    micro-batch's responses; ``topk_logprobs`` ``[b, R, K]`` the student's log-probs at
    ``batch.teacher_topk_ids`` (needed by the fkl / rkl / jsd channels). KL (``algo.kl_coef > 0``,
    needs ``ref_logprobs``) and entropy (``algo.entropy_coef > 0``, needs a differentiable
    ``entropy``) are aggregated over all response tokens with ``algo.loss_agg_mode`` and the global
    response counts.
    """
    resp = counts[RESPONSE]
    mask = batch.response_mask
    total = logprobs.new_zeros(())
    parts: dict[str, Tensor] = {}
    token_metrics: dict[str, tuple[float, float]] = {}
    pg_total = logprobs.new_zeros(())
    norms = channel_norms(batch)
    for name, w in channel_weights(batch).items():
        if name not in counts:
            raise ValueError(f"no global counts for channel {name!r} (have {sorted(counts)}); "
                             f"compute them with global_counts() on the whole mini-batch")
        spec = lookup(CHANNEL_LOSSES, "channel loss kind", channel_kind(name))
        inputs = ChannelInputs(name=name, weight=w.to(logprobs.device), counts=counts[name], logprobs=logprobs,
                               old_logprobs=old_logprobs.detach(), batch=batch, algo=algo, entropy=entropy,
                               topk_logprobs=topk_logprobs, norm=norms[name])
        loss_c, metrics = spec.fn(inputs)
        total = total + loss_c
        parts[f"loss/{name}"] = loss_c.detach()
        if spec.kind == "pg":
            pg_total = pg_total + loss_c.detach()
        n_local = float((w != 0).sum())
        prefix = "" if name == "pg" else f"{name}/"
        for k, v in metrics.items():
            token_metrics[k if "/" in k else prefix + k] = (float(v), n_local)
    parts["pg_loss"] = pg_total

    n_resp = float(mask.sum())
    # the KL / entropy terms cover every response token; "balanced" is a policy-gradient mode: token-mean here
    resp_mode = "token-mean" if algo.loss_agg_mode == "balanced" else algo.loss_agg_mode
    if algo.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("algo.kl_coef > 0 needs ref_logprobs (the frozen reference model's log-probs)")
        kl = kl_estimate(logprobs, ref_logprobs.detach(), algo.kl_estimator,
                         log_ratio_clamp=algo.log_ratio_clamp)
        kl_term = aggregate(kl, mask, resp_mode, num_tokens=resp.num_tokens, num_seqs=resp.num_seqs,
                            max_len=resp.max_len)
        total = total + algo.kl_coef * kl_term
        parts["kl"] = kl_term.detach()
    if entropy is not None:
        ent_term = aggregate(entropy, mask, resp_mode, num_tokens=resp.num_tokens,
                             num_seqs=resp.num_seqs, max_len=resp.max_len)
        if algo.entropy_coef > 0:
            total = total - algo.entropy_coef * ent_term
        # reported as a token mean whatever the aggregation mode (DESIGN.md metric train/entropy)
        token_metrics["entropy"] = (float(_masked_mean(entropy.detach(), mask)), n_resp)
    return LossTerms(loss=total, parts=parts, token_metrics=token_metrics)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.bool()
    return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1)
