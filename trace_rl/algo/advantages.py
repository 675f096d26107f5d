"""Group-relative outcome advantages (GRPO family), vectorised over groups.

A *group* is the set of responses sampled for one prompt; ``group_ids[i]`` names the group of
sequence ``i`` (any integers, not necessarily contiguous or sorted). Every estimator has the
signature ``fn(rewards [B], group_ids [B], **kwargs) -> advantages [B] float32`` and is
registered by name (``get_advantage_estimator("grpo")``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .registry import decorator_into, lookup

__all__ = [
    "ADVANTAGE_ESTIMATORS", "register_advantage_estimator", "get_advantage_estimator",
    "grpo_advantages", "dr_grpo_advantages", "zero_variance_mask", "group_stats",
]

AdvantageEstimator = Callable[..., Tensor]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}
SINGLETON_MODES = ("unit", "zero")


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn(rewards, group_ids, **kwargs) -> Tensor [B]`` under ``name``."""
    return decorator_into(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered as ``name``; unknown names raise an error (KeyError and ValueError)
    listing the registered ones."""
    return lookup(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


# --------------------------------------------------------------------------------------- group sums
def _check(rewards: Tensor, group_ids: Tensor) -> None:
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got "
                         f"{tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__}")
    if not isinstance(group_ids, Tensor) or tuple(group_ids.shape) != tuple(rewards.shape):
        got = tuple(group_ids.shape) if isinstance(group_ids, Tensor) else type(group_ids).__name__
        raise ValueError(f"group_ids must be a tensor shaped like rewards {tuple(rewards.shape)}, got {got}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be integers (one id per prompt), got {group_ids.dtype}; use .long()")
    if group_ids.device != rewards.device:
        raise ValueError(f"rewards ({rewards.device}) and group_ids ({group_ids.device}) are on different devices")
    if rewards.numel() and not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf; fix the reward function (or map failures to a number)")


def _dense_groups(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids to 0..G-1: (inverse [B], G)."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sequence statistics of its group: ``(mean, std, size)``, each ``[B]``.

    ``std`` is the unbiased (Bessel-corrected) standard deviation, as in verl and TRL; it is
    defined as 0 for a group of one (the unbiased estimate would be 0/0). ``size`` is long.
    Computed with ``index_add`` over dense group indices: no Python loop over groups.
    """
    _check(rewards, group_ids)
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    inv, G = _dense_groups(group_ids)
    count = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / count
    dev2 = (r - mean[inv]) ** 2  # two-pass variance: no cancellation for large rewards
    ss = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, dev2)
    var = torch.where(count > 1, ss / (count - 1).clamp(min=1), torch.zeros_like(ss))
    return mean[inv], var.sqrt()[inv], count.long()[inv]


# --------------------------------------------------------------------------------------- estimators
@register_advantage_estimator("grpo")
def grpo_advantages(rewards: Tensor, group_ids: Tensor, *, scale_by_std: bool = True, eps: float = 1e-6,
                    singleton: str = "unit") -> Tensor:
    """GRPO outcome advantage ``(r - mean_g) / (std_g + eps)`` (DeepSeekMath, arXiv 2402.03300, Sec. 4.1.2).

    ``std_g`` is the group's unbiased std. ``scale_by_std=False`` gives ``r - mean_g`` only.
    ``eps`` defaults to verl's 1e-6 (TRL uses 1e-4).

    ``singleton`` decides a group of one response, where peers disagree (DESIGN.md):
      - ``"unit"`` (default, verl): the group mean is taken as 0 and the std as 1, so the
        advantage is ``r / (1 + eps)`` (``r`` without std scaling). A lone sample still pushes
        towards rewarded behaviour.
      - ``"zero"`` (TRL): advantage 0; a lone sample has no baseline, so it teaches nothing.
    All-equal groups of two or more get advantage 0 either way. Returns float32 ``[B]``.
    """
    if singleton not in SINGLETON_MODES:
        raise ValueError(f"singleton must be one of {SINGLETON_MODES}, got {singleton!r}")
    if not (eps >= 0):
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    mean, std, size = group_stats(rewards, group_ids)
    r = rewards.to(mean.dtype)
    alone = size == 1
    if singleton == "unit":
        mean = torch.where(alone, torch.zeros_like(mean), mean)
        std = torch.where(alone, torch.ones_like(std), std)
    adv = r - mean
    # All-equal groups (of two or more) get exactly 0, not rounding noise / eps, and no 0/0 at eps=0.
    flat = zero_variance_mask(rewards, group_ids) & ~alone
    if scale_by_std:
        adv = adv / torch.where(flat, torch.ones_like(std), std + eps)
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    if singleton == "zero":
        adv = torch.where(alone, torch.zeros_like(adv), adv)
    return adv.float()


@register_advantage_estimator("dr_grpo")
def dr_grpo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dr. GRPO advantage ``r - mean_g``: no std division (Liu et al., arXiv 2503.20783, Sec. 3.2).

    Dividing by the group std up-weights prompts that are nearly always solved or nearly always
    failed (a question-difficulty bias); Dr. GRPO drops it. A group of one gets 0. float32 ``[B]``.
    """
    mean, _, _ = group_stats(rewards, group_ids)
    adv = rewards.to(mean.dtype) - mean
    # exact 0 for all-equal groups (the mean of equal floats can differ from them in the last bit)
    return torch.where(zero_variance_mask(rewards, group_ids), torch.zeros_like(adv), adv).float()


def zero_variance_mask(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Bool ``[B]``: True for every sequence whose group's rewards are all equal.

    DAPO's dynamic sampling (arXiv 2503.14476, Sec. 3.2) drops these groups: their GRPO advantage
    is 0, so they only dilute the batch. A group of one counts as all-equal (True). Exact equality
    is used (max == min), so rewards 1.0 and 1.0001 are different.
    """
    _check(rewards, group_ids)
    inv, G = _dense_groups(group_ids)
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    hi = torch.full((G,), float("-inf"), dtype=r.dtype, device=r.device)
    lo = torch.full((G,), float("inf"), dtype=r.dtype, device=r.device)
    hi = hi.scatter_reduce(0, inv, r, reduce="amax", include_self=True)
    lo = lo.scatter_reduce(0, inv, r, reduce="amin", include_self=True)
    return (hi == lo)[inv]
