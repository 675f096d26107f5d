"""Divergence-weighted GRPO advantage ("Sparse but Critical", arXiv 2603.22446).

RLVR changes the policy on a sparse set of tokens; weighting the advantage by a per-token
divergence focuses the update there. The paper measures the divergence between the base and RL
policies; here it is measured against the teacher, from the sampled token only (no vocabulary
needed): ``d_t = |teacher_logprob_t - behaviour_logprob_t| ** p``. Per response i (n_i tokens):

  w_it = (1 - beta) + beta * d_it / mean_t(d_i)      (w_it = 1 when mean_t(d_i) = 0)
  A_it = A_i^GRPO * w_it

so ``w`` has mean exactly 1 over each response (the sequence's total advantage is unchanged) and
``beta`` (``div_weight_mix``) mixes it with the uniform weight. One ``pg`` channel of weight 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..channels import Channel
from .base import MethodInputs, MethodOutput, param_float, register_method
from .grpo import GRPOParams, grpo_seq_advantages, outcome_metrics

__all__ = ["divergence_weights", "div_weighted_method"]


def divergence_weights(teacher_logprobs, behaviour_logprobs, mask, power: float = 1.0, mix: float = 1.0):
    """[B, R] float64 weights ``w`` of the module docstring (0 on padding)."""
    m = mask.bool()
    d = torch.where(m, (teacher_logprobs.double() - behaviour_logprobs.double()).abs() ** power,
                    torch.zeros((), dtype=torch.float64))
    mean = d.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
    rel = torch.where(mean > 0, d / mean.clamp(min=1e-300), torch.ones_like(d))
    return torch.where(m, (1 - mix) + mix * rel, torch.zeros_like(d))


@dataclass
class DivWeightedParams(GRPOParams):
    div_weight_power: float = 1.0
    """div_weighted: exponent of the per-token divergence weight."""
    div_weight_mix: float = 1.0
    """div_weighted: mix between uniform (0) and divergence (1) weights."""


@register_method(
    "div_weighted", needs=("teacher_logprobs",), gated_needs=(),
    params=DivWeightedParams,
    description=("Divergence-weighted GRPO: the GRPO advantage scaled per token by |teacher - behaviour "
                 "log-prob|^p normalised to mean 1 over the response (mixed with 1 by div_weight_mix)."))
def div_weighted_method(inputs: MethodInputs, params: dict) -> MethodOutput:
    """Sparse but Critical (arXiv 2603.22446): ``A_it = A_i * w_it`` with divergence weights ``w``."""
    power = param_float(params, "div_weight_power", lo=1e-6)
    mix = param_float(params, "div_weight_mix", lo=0.0, hi=1.0)
    seq_adv = grpo_seq_advantages(inputs, params)
    w = divergence_weights(inputs.extra["teacher_logprobs"], inputs.require_behaviour_logprobs("div_weighted"),
                           inputs.response_mask, power, mix)
    metrics = {**outcome_metrics(inputs, seq_adv), "div/weight_max": float(w.max()) if w.numel() else 0.0}
    return MethodOutput.from_channels(inputs, [Channel("pg", inputs.response_mask.float())],
                                      advantages=(seq_adv.double()[:, None] * w).float(), metrics=metrics)
