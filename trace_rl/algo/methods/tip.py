"""TIP: on-policy distillation restricted to informative tokens (arXiv 2604.14084).

Informative tokens come from two regions of the (student entropy H, teacher-student divergence)
plane: high student entropy (the student is unsure), and low entropy with high divergence (the
student is confident and wrong). Over the batch's N response tokens, with budget ``b``
(``tip_budget``), share ``s`` (``tip_overconfident_share``) and quantile ``q``
(``tip_low_entropy_quantile``):

  k = floor(b N),  k_o = floor(s k),  k_h = k - k_o
  high-entropy set:  the k_h tokens of largest H
  overconfident set: among the floor(q N) tokens of smallest H that are not already chosen, the
                     (at most) k_o of largest |teacher_logprob - behaviour_logprob| (sampled token)

Ties go to the earlier token (row-major). The selected tokens get weight 1 in one KL channel
``<kind>:tip`` (``tip_divergence``, default reverse KL as in on-policy distillation), normalised by
its own token count (norm ``token``), coefficient ``tip_coef`` (a schedule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from ..channels import DIVERGENCE_KINDS, Channel
from ..schedules import Schedule
from .base import (MethodInputs, MethodOutput, param_choice, param_float, param_schedule, param_step,
                   register_method)

__all__ = ["tip_select", "tip_method"]


def _top(score: Tensor, k: int, eligible: Tensor | None = None) -> Tensor:
    """Bool mask of the (at most) k eligible entries of largest score; ties to the lower index."""
    out = torch.zeros_like(score, dtype=torch.bool)
    if eligible is not None:
        k = min(k, int(eligible.sum()))
        score = torch.where(eligible, score, torch.full_like(score, float("-inf")))
    if k > 0:
        out[torch.sort(score, descending=True, stable=True).indices[:k]] = True
    return out


def tip_select(entropy: Tensor, divergence: Tensor, mask: Tensor, budget: float, overconfident_share: float,
               low_entropy_quantile: float) -> tuple[Tensor, Tensor]:
    """``(high_entropy, overconfident)`` bool [B, R] masks chosen as in the module docstring."""
    m = mask.bool()
    ent, div = entropy[m].double(), divergence[m].double()
    N = ent.numel()
    k = math.floor(budget * N)
    k_o = math.floor(overconfident_share * k)
    high = _top(ent, k - k_o)
    low = _top(-ent, math.floor(low_entropy_quantile * N))
    over = _top(div, k_o, eligible=low & ~high)
    hi_m, ov_m = torch.zeros_like(m), torch.zeros_like(m)
    hi_m[m], ov_m[m] = high, over
    return hi_m, ov_m


@dataclass
class TIPParams:
    tip_budget: float = 0.5
    """TIP: fraction of response tokens that receive the distillation loss."""
    tip_overconfident_share: float = 0.5
    """TIP: share of the budget for low-entropy tokens with high teacher-student divergence."""
    tip_low_entropy_quantile: float = 0.5
    """TIP: entropy quantile below which a token counts as low-entropy."""
    tip_divergence: str = "reverse"
    """TIP: forward | reverse | jsd on the selected tokens."""
    tip_coef: Schedule = field(default_factory=Schedule)
    """TIP: coefficient of the distillation channel."""


def _active(step: int, params: Mapping[str, Any]) -> bool:
    return param_schedule(params, "tip_coef").value(step) != 0


@register_method(
    "tip", needs=("entropy", "teacher_logprobs", "teacher_topk"),
    gated_needs=("entropy", "teacher_logprobs", "teacher_topk"), teacher_active=_active,
    params=TIPParams,
    overrides={"filter_zero_variance": False},
    description=("TIP: OPD on informative tokens only: the highest-entropy tokens plus low-entropy tokens with "
                 "the largest teacher-student |log-ratio|, within a budget fraction of the tokens ('<kind>:tip')."))
def tip_method(inputs: MethodInputs, params: dict) -> MethodOutput:
    """TIP (arXiv 2604.14084): a KL channel on the tokens :func:`tip_select` picks."""
    step = param_step(params, "tip")
    coef = param_schedule(params, "tip_coef").value(step)
    kind = DIVERGENCE_KINDS[param_choice(params, "tip_divergence", DIVERGENCE_KINDS)]
    budget = param_float(params, "tip_budget", lo=0.0, hi=1.0)
    share = param_float(params, "tip_overconfident_share", lo=0.0, hi=1.0)
    quantile = param_float(params, "tip_low_entropy_quantile", lo=0.0, hi=1.0)
    mask = inputs.response_mask
    high = over = torch.zeros_like(mask)
    if coef != 0:  # the selection inputs are gated: only read while the channel is on
        div = (inputs.extra["teacher_logprobs"].double() - inputs.require_behaviour_logprobs("tip").double()).abs()
        high, over = tip_select(inputs.extra["entropy"], div, mask, budget, share, quantile)
    n_resp = max(int(mask.sum()), 1)
    metrics = {"tip/high_entropy_frac": float(high.sum()) / n_resp,
               "tip/overconfident_frac": float(over.sum()) / n_resp}
    return MethodOutput.from_channels(inputs, [Channel(f"{kind}:tip", (high | over).float(), norm="token", coef=coef)],
                                      metrics=metrics)
