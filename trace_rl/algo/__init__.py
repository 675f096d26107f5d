"""The algorithm core: pure torch (and the standard library), every formula unit-tested on the CPU.

``python -m trace_rl.algo`` lists the registered methods, advantage estimators and policy losses.
"""
from __future__ import annotations

from .advantages import (ADVANTAGE_ESTIMATORS, dr_grpo_advantages, get_advantage_estimator, group_stats,
                         grpo_advantages, register_advantage_estimator, zero_variance_mask)
from .aggregation import AGG_MODES, aggregate, loss_counts
from .kl import KL_ESTIMATORS, kl_estimate
from .logprobs import entropy_from_logits, selective_log_softmax, token_logprobs_from_hidden
from .methods import (KNOWN_NEEDS, METHODS, MethodInputs, MethodOutput, MethodSpec, compute_method,
                      get_method, outcome_advantage_output, register_method, registry_names)
from .policy_loss import POLICY_LOSSES, get_policy_loss, masked_mean, ppo_clip_loss, register_policy_loss
from .registry import UnknownNameError

__all__ = [
    # logprobs
    "selective_log_softmax", "entropy_from_logits", "token_logprobs_from_hidden",
    # advantages
    "grpo_advantages", "dr_grpo_advantages", "zero_variance_mask", "group_stats",
    "register_advantage_estimator", "get_advantage_estimator", "ADVANTAGE_ESTIMATORS",
    # policy loss
    "ppo_clip_loss", "masked_mean", "register_policy_loss", "get_policy_loss", "POLICY_LOSSES",
    # kl / aggregation
    "kl_estimate", "KL_ESTIMATORS", "aggregate", "loss_counts", "AGG_MODES",
    # methods
    "MethodSpec", "MethodInputs", "MethodOutput", "METHODS", "KNOWN_NEEDS", "register_method", "get_method",
    "compute_method", "outcome_advantage_output", "registry_names",
    "UnknownNameError",
]
