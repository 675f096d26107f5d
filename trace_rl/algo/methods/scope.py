"""SCOPE: signal-calibrated on-policy distillation with dual-path weighting (arXiv 2604.10688).

Rollouts are routed by correctness (``c_i = r_i > correct_threshold``); within each group:

  correct path   (channel ``mle:correct``):      weight w_i on every token of response i, loss -log p
  incorrect path (channel ``<kind>:incorrect``): weight v_i on every token, loss = KL (default reverse)

with ``l_i = mean_t logp_i`` (student: behaviour log-probs; teacher: ``teacher_logprobs``) and
``PPL_i = exp(-l_i)``. ``scope_weighting`` picks between the paper and the released code, which
disagree (DESIGN.md):

  paper (default):  w_i = PPL_S,i^(+1/tau) / sum_{j in C_g} PPL_S,j^(+1/tau)      (sums to 1 per group)
                    v_i = PPL_T,i^(-1/tau) / sum_{j in W_g} PPL_T,j^(-1/tau)
  code:             w_i = |C_g| * softmax_{C_g}(+l_S / tau)  =  |C_g| * PPL_S^(-1/tau) normalised
                    v_i = |W_g| * softmax_{W_g}(-l_T / tau)  =  |W_g| * PPL_T^(+1/tau) normalised

(the released scripts multiply the *log-prob* by the sign meant for the perplexity, so both paths
come out inverted, and scale the weights to sum to the path's size). ``C_g`` / ``W_g``: the correct
/ incorrect responses of group g with at least one token; a group without any gets no weight on
that path. Both channels aggregate with ``loss_agg_mode`` over their own tokens (norm ``agg``), as
the released code does; coefficients ``scope_mle_coef`` and ``scope_kl_coef`` (schedules).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from ..channels import DIVERGENCE_KINDS, Channel
from ..schedules import Schedule
from .base import (MethodInputs, MethodOutput, param_choice, param_float, param_schedule, param_step,
                   register_method)

__all__ = ["SCOPE_WEIGHTINGS", "group_softmax", "scope_weights", "scope_method"]

SCOPE_WEIGHTINGS = ("paper", "code")


@dataclass
class ScopeParams:
    scope_tau: float = 1.0
    """SCOPE: temperature of the in-group softmax of perplexity weights."""
    scope_weighting: str = "paper"
    """SCOPE: paper (student PPL^(+1/tau), weights sum to 1) or code (the released scripts' inversion)."""
    scope_divergence: str = "reverse"
    """SCOPE: KL direction on incorrect rollouts: forward | reverse."""
    scope_mle_coef: Schedule = field(default_factory=Schedule)
    """SCOPE: coefficient of the MLE path (correct rollouts)."""
    scope_kl_coef: Schedule = field(default_factory=Schedule)
    """SCOPE: coefficient of the KL path (incorrect rollouts)."""
    correct_threshold: float = 0.5
    """A rollout counts as correct when its reward is above this (trace, scope)."""


def group_softmax(logits: Tensor, group_ids: Tensor, eligible: Tensor) -> Tensor:
    """Softmax of ``logits`` [B] over the eligible members of each group; 0 for the others.
    Vectorised with scatter/index_add (a group with no eligible member gets all zeros)."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    G = int(inv.max()) + 1 if inv.numel() else 0
    x = logits.double()
    neg_inf = torch.full((G,), float("-inf"), dtype=x.dtype, device=x.device)
    gmax = neg_inf.scatter_reduce(0, inv[eligible], x[eligible], reduce="amax", include_self=True)
    e = torch.where(eligible, torch.exp(torch.where(eligible, x - gmax[inv], torch.zeros_like(x))),
                    torch.zeros_like(x))
    denom = torch.zeros(G, dtype=x.dtype, device=x.device).index_add_(0, inv, e)
    return torch.where(eligible, e / denom[inv].clamp(min=1e-300), torch.zeros_like(x))


def group_count(group_ids: Tensor, eligible: Tensor) -> Tensor:
    """[B]: the number of eligible members in each sequence's group."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    G = int(inv.max()) + 1 if inv.numel() else 0
    n = torch.zeros(G, dtype=torch.float64, device=group_ids.device).index_add_(0, inv, eligible.double())
    return n[inv]


def scope_weights(mean_logp: Tensor, group_ids: Tensor, eligible: Tensor, tau: float, *, ppl_power: float,
                  weighting: str) -> Tensor:
    """Per-sequence path weights [B] float64. ``ppl_power`` is +1 (student path: high perplexity
    weighs more) or -1 (teacher path: low teacher perplexity weighs more) *in the paper's formula*
    ``PPL^(ppl_power / tau)`` normalised per group; ``weighting="code"`` flips the sign and scales
    by the number of eligible members (see the module docstring)."""
    if weighting == "paper":
        return group_softmax(-ppl_power * mean_logp / tau, group_ids, eligible)  # PPL^(p/tau) = exp(-p l / tau)
    return group_softmax(ppl_power * mean_logp / tau, group_ids, eligible) * group_count(group_ids, eligible)


def _active(step: int, params: Mapping[str, Any]) -> bool:
    return param_schedule(params, "scope_kl_coef").value(step) != 0


@register_method(
    "scope", needs=("teacher_topk", "teacher_logprobs"), teacher_active=_active,
    params=ScopeParams,
    overrides={"filter_zero_variance": False},
    description=("SCOPE: correct rollouts -> student-perplexity-weighted MLE ('mle:correct'); incorrect -> "
                 "teacher-perplexity-weighted KL ('rkl:incorrect' by default); weights softmax-normalised in "
                 "the group with temperature scope_tau (scope_weighting: paper | code)."))
def scope_method(inputs: MethodInputs, params: dict) -> MethodOutput:
    """SCOPE (arXiv 2604.10688): dual-path perplexity-weighted MLE / KL; see the module docstring."""
    step = param_step(params, "scope")
    tau = param_float(params, "scope_tau", lo=1e-6)
    weighting = param_choice(params, "scope_weighting", SCOPE_WEIGHTINGS)
    kind = DIVERGENCE_KINDS[param_choice(params, "scope_divergence", DIVERGENCE_KINDS)]
    threshold = param_float(params, "correct_threshold")
    mle_coef = param_schedule(params, "scope_mle_coef").value(step)
    kl_coef = param_schedule(params, "scope_kl_coef").value(step)
    mask = inputs.response_mask
    n = mask.sum(dim=1)
    correct = inputs.rewards > threshold
    ok, bad = correct & (n > 0), ~correct & (n > 0)

    def mean_logp(lp: Tensor) -> Tensor:
        return torch.where(mask, lp.double(), torch.zeros((), dtype=torch.float64)).sum(1) / n.clamp(min=1)

    w = torch.zeros(len(n), dtype=torch.float64, device=mask.device)
    if mle_coef != 0:
        student = mean_logp(inputs.require_behaviour_logprobs("scope"))
        w = scope_weights(student, inputs.group_ids, ok, tau, ppl_power=1.0, weighting=weighting)
    v = torch.zeros_like(w)
    if kl_coef != 0:  # teacher inputs are gated: only read while the KL path is on
        v = scope_weights(mean_logp(inputs.extra["teacher_logprobs"]), inputs.group_ids, bad, tau,
                          ppl_power=-1.0, weighting=weighting)
    fmask = mask.float()
    channels = [Channel("mle:correct", fmask * w.float()[:, None], coef=mle_coef),
                Channel(f"{kind}:incorrect", fmask * v.float()[:, None], coef=kl_coef)]
    metrics = {"scope/correct_frac": float(correct.float().mean()) if len(n) else 0.0,
               "scope/mle_weight_max": float(w.max()) if len(n) else 0.0,
               "scope/kl_weight_max": float(v.max()) if len(n) else 0.0}
    return MethodOutput.from_channels(inputs, channels, metrics=metrics)
