"""Per-token policy-gradient losses, registered by name.

A policy loss has the signature
``fn(logprobs [B, R], old_logprobs [B, R], advantages [B] | [B, R], mask [B, R], **kwargs)
-> (loss [B, R], metrics: dict[str, 0-dim Tensor])``. It does NOT aggregate: the learner weights
the per-token loss by a channel's weights and reduces it with :func:`trace_rl.algo.aggregate`,
so micro-batching never changes the result.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .kl import kl_estimate
from .registry import decorator_into, lookup

__all__ = ["POLICY_LOSSES", "register_policy_loss", "get_policy_loss", "ppo_clip_loss", "masked_mean",
           "truncated_is_weights"]

PolicyLoss = Callable[..., "tuple[Tensor, dict[str, Tensor]]"]
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator: register ``fn(logprobs, old_logprobs, advantages, mask, **kw) -> (loss, metrics)``."""
    return decorator_into(POLICY_LOSSES, "policy loss", name)


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered as ``name``; unknown names raise an error (KeyError and
    ValueError) listing the registered ones."""
    return lookup(POLICY_LOSSES, "policy loss", name)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is true; 0 (not NaN) when the mask is empty."""
    m = mask.bool()
    # where, not x * m: a NaN/inf in the padding must not leak into the mean
    return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1).to(x.dtype)


def _check_inputs(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> None:
    if not isinstance(logprobs, Tensor) or logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, R], got "
                         f"{tuple(logprobs.shape) if isinstance(logprobs, Tensor) else type(logprobs).__name__}")
    shape = tuple(logprobs.shape)
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask)):
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} has shape {got}, expected {shape} (like logprobs)")
    if not isinstance(advantages, Tensor) or tuple(advantages.shape) not in (shape, shape[:1]):
        got = tuple(advantages.shape) if isinstance(advantages, Tensor) else type(advantages).__name__
        raise ValueError(f"advantages has shape {got}, expected {shape[:1]} (per sequence) or {shape} (per token)")


@register_policy_loss("ppo_clip")
def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                  eps_low: float = 0.2, eps_high: float = 0.28, dual_clip: float | None = None,
                  log_ratio_clamp: float | None = 20.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss per token (PPO, arXiv 1707.06347, Eq. 7, negated for minimisation).

    ``ratio = exp(logprobs - old_logprobs)``;
    ``loss = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))``.
    Defaults are DAPO's decoupled "clip-higher" (eps_low 0.2, eps_high 0.28; arXiv 2503.14476,
    Eq. 10). ``dual_clip=c`` (c > 1, verl uses 3) additionally caps the loss of negative-advantage
    tokens at ``-A * c`` (Ye et al., arXiv 1912.09729, Eq. 5) so a huge ratio on a bad token cannot
    blow up the update; TRL has no dual clip, so the default is off. The log-ratio is clamped to
    ``+-log_ratio_clamp`` before ``exp`` (verl; None disables); it does not change normal ratios.

    Returns ``(loss [B, R], metrics)``: the loss is 0 where ``mask`` is 0 (even if logprobs there
    are inf/NaN) and is NOT aggregated. ``advantages`` may be ``[B]`` (broadcast over tokens) or
    ``[B, R]``; it and ``old_logprobs`` are treated as constants (detached).
    Metrics, masked means as detached 0-dim tensors: ``clipfrac`` (tokens whose gradient the clip
    zeroes), ``clipfrac_low`` (A < 0 and ratio < 1 - eps_low), ``clipfrac_high`` (A > 0 and ratio >
    1 + eps_high), ``approx_kl`` (k3 estimate of KL(old || new)), ``ratio_mean``; with dual clip
    also ``clipfrac_dual`` (A < 0 and ratio > c).
    """
    _check_inputs(logprobs, old_logprobs, advantages, mask)
    if not (0 <= eps_low < 1) or not (eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (verl uses 3.0) or None, got {dual_clip!r}")
    if log_ratio_clamp is not None and not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0 or None, got {log_ratio_clamp!r}")

    m = mask.bool()
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv[:, None]
    adv = adv.to(logprobs.dtype).expand_as(logprobs)
    old = old_logprobs.detach().to(logprobs.dtype)
    # Padding may hold garbage (inf, NaN): zero the log-ratio there *before* exp, so neither the
    # loss nor its gradient (0 * inf) can turn into NaN.
    log_ratio = torch.where(m, logprobs - old, torch.zeros_like(logprobs))
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    loss = torch.where(m, loss, torch.zeros_like(loss))

    with torch.no_grad():
        r, a = ratio.detach(), adv
        low = (a < 0) & (r < 1.0 - eps_low)
        high = (a > 0) & (r > 1.0 + eps_high)
        metrics = {
            "clipfrac": masked_mean((low | high).to(r.dtype), m),
            "clipfrac_low": masked_mean(low.to(r.dtype), m),
            "clipfrac_high": masked_mean(high.to(r.dtype), m),
            # k3 estimate of KL(old || new) on tokens sampled from old: (r - 1) - log r
            "approx_kl": masked_mean(kl_estimate(-log_ratio.detach(), torch.zeros_like(r), "k3",
                                                 log_ratio_clamp=None), m),
            "ratio_mean": masked_mean(r, m),
        }
        if dual_clip is not None:
            metrics["clipfrac_dual"] = masked_mean(((a < 0) & (r > dual_clip)).to(r.dtype), m)
    return loss, metrics


def truncated_is_weights(proximal_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float,
                         log_ratio_clamp: float | None = 20.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance weights between the proximal policy (the learner's weights before the update)
    and the behaviour policy that sampled the tokens (the engines', possibly some versions older):
    ``w_t = min(pi_prox(y_t) / pi_behav(y_t), cap)``, detached, 0 off ``mask``. Decoupled PPO (Hilton et
    al. 2022, arXiv 2110.00641, eq. 7) with the truncation of TIS (Yao et al. 2025; verl's
    ``rollout_is_threshold``): the policy-gradient term of token t is multiplied by ``w_t``.

    Returns ``(w [B, R], metrics)``: ``async/is_weight_mean`` and ``async/is_clipped_frac`` (tokens whose
    raw ratio exceeded ``cap``), token means over ``mask``."""
    if cap < 1:
        raise ValueError(f"the importance-weight cap must be >= 1, got {cap}")
    m = mask.bool()
    log_ratio = (proximal_logprobs.detach() - behaviour_logprobs.detach()).float()
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    raw = torch.exp(log_ratio)
    w = torch.where(m, raw.clamp(max=cap), torch.zeros_like(raw))
    return w, {"async/is_weight_mean": masked_mean(w, m), "async/is_clipped_frac": masked_mean((raw > cap).float(), m),
               "async/is_log_ratio_abs": masked_mean(log_ratio.abs(), m)}
