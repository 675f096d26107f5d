"""The algorithm core: pure torch (and the standard library), every formula unit-tested on the CPU.

``python -m trace_rl.algo`` lists the registered methods (inputs and parameters), schedules,
advantage estimators and policy losses.
"""
from __future__ import annotations

from .advantages import (ADVANTAGE_ESTIMATORS, dr_grpo_advantages, get_advantage_estimator, group_stats,
                         grpo_advantages, register_advantage_estimator, zero_variance_mask)
from .aggregation import AGG_MODES, BALANCED_COUNTS, advantage_sign, aggregate, loss_counts
from .channels import CHANNEL_KINDS, CHANNEL_NORMS, DIVERGENCE_KINDS, TEACHER_KINDS, Channel, channel_kind
from .exposure import ExposureTracker, logprob_lift, teacher_coef, teacher_token_mask
from .kl import KL_ESTIMATORS, kl_estimate
from .logprobs import (entropy_from_logits, gather_log_softmax, gather_logprobs_from_hidden, selective_log_softmax,
                       token_logprobs_from_hidden)
from .methods import (KNOWN_NEEDS, METHODS, TEACHER_NEEDS, MethodInputs, MethodOutput, MethodSpec, compute_method,
                      get_method, outcome_advantage_output, register_method, registry_names)
from .policy_loss import POLICY_LOSSES, get_policy_loss, masked_mean, ppo_clip_loss, register_policy_loss
from .registry import UnknownNameError
from .schedules import SCHEDULES, Schedule, register_schedule, schedule_defaults
from .spans import SpanStats, batch_span_masks, cap_span_mask, spans_to_token_mask
from .vocab_kl import DIVERGENCES, TAIL_MODES, full_vocab_divergence, sampled_kl, topk_divergence

__all__ = [
    # logprobs
    "selective_log_softmax", "entropy_from_logits", "token_logprobs_from_hidden", "gather_log_softmax",
    "gather_logprobs_from_hidden",
    # vocabulary KL / spans
    "DIVERGENCES", "TAIL_MODES", "topk_divergence", "full_vocab_divergence", "sampled_kl",
    "SpanStats", "spans_to_token_mask", "cap_span_mask", "batch_span_masks",
    # advantages
    "grpo_advantages", "dr_grpo_advantages", "zero_variance_mask", "group_stats",
    "register_advantage_estimator", "get_advantage_estimator", "ADVANTAGE_ESTIMATORS",
    # policy loss
    "ppo_clip_loss", "masked_mean", "register_policy_loss", "get_policy_loss", "POLICY_LOSSES",
    # kl / aggregation
    "kl_estimate", "KL_ESTIMATORS", "aggregate", "loss_counts", "advantage_sign", "AGG_MODES", "BALANCED_COUNTS",
    # channels / schedules / exposure
    "Channel", "channel_kind", "CHANNEL_NORMS", "CHANNEL_KINDS", "TEACHER_KINDS", "DIVERGENCE_KINDS",
    "Schedule", "SCHEDULES", "register_schedule", "schedule_defaults",
    "ExposureTracker", "logprob_lift", "teacher_coef", "teacher_token_mask",
    # methods
    "MethodSpec", "MethodInputs", "MethodOutput", "METHODS", "KNOWN_NEEDS", "TEACHER_NEEDS", "register_method",
    "get_method", "compute_method", "outcome_advantage_output", "registry_names",
    "UnknownNameError",
]
