"""All-token self on-policy distillation: every response token is pulled towards the *same* policy
conditioned on privileged context (reference solution / hint), alone or added to GRPO.

  loss = c(step) * sum_{i,t} D_t / N_tokens   [+ GRPO's pg channel when opd_with_grpo]

with ``D_t`` the divergence named by ``opd_divergence`` (forward KL(teacher||student), reverse KL,
JSD-beta on the teacher's top-k; or the sampled-token ``skl`` / ``logratio`` variants) and
``c`` the ``opd_coef`` schedule. OPSD arXiv 2601.18734; the baseline TRACE (arXiv 2605.10194)
argues against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..channels import DIVERGENCE_KINDS, Channel
from ..schedules import Schedule
from .base import MethodInputs, MethodOutput, param_bool, param_choice, param_schedule, param_step, register_method
from .grpo import GRPOParams, grpo_seq_advantages, outcome_metrics

__all__ = ["SelfOPDParams", "self_opd_method"]


@dataclass
class SelfOPDParams(GRPOParams):
    opd_divergence: str = "forward"
    """self_opd: forward | reverse | jsd KL to the privileged teacher on every token."""
    opd_coef: Schedule = field(default_factory=Schedule)
    """self_opd: coefficient of the all-token KL over steps."""
    opd_with_grpo: bool = False
    """self_opd: add the GRPO channel (False = pure on-policy distillation)."""


def _active(step: int, params: Mapping[str, Any]) -> bool:
    return param_schedule(params, "opd_coef").value(step) != 0


@register_method(
    "self_opd", needs=("teacher_topk", "teacher_logprobs"), teacher_active=_active,
    params=SelfOPDParams,
    overrides={"filter_zero_variance": False},
    description=("All-token self-OPD: divergence to the privileged-context teacher on every response token "
                 "(channel '<kind>:opd', token mean), alone or added to GRPO (opd_with_grpo)."))
def self_opd_method(inputs: MethodInputs, params: dict) -> MethodOutput:
    """Self-OPD (OPSD, arXiv 2601.18734): ``opd_coef(step) * D`` on every token, optionally + GRPO."""
    step = param_step(params, "self_opd")
    kind = DIVERGENCE_KINDS[param_choice(params, "opd_divergence", DIVERGENCE_KINDS)]
    coef = param_schedule(params, "opd_coef").value(step)
    weights = inputs.response_mask.float()
    channels = [Channel(f"{kind}:opd", weights, norm="token", coef=coef)]
    if not param_bool(params, "opd_with_grpo"):
        return MethodOutput.from_channels(inputs, channels)
    seq_adv = grpo_seq_advantages(inputs, params)
    return MethodOutput.from_channels(inputs, [Channel("pg", weights), *channels], advantages=seq_adv,
                                      metrics=outcome_metrics(inputs, seq_adv))
