"""TRACE: token-routed self on-policy alignment (arXiv 2605.10194).

An annotator marks *key* spans in correct rollouts and *error* spans in incorrect ones (token masks,
already aligned and capped by the driver). With ``lam = trace_lambda(step)``, ``lam0`` the schedule's
peak, ``rho = lam / lam0`` (0 if ``lam0 = 0``), ``n_i`` the response length, ``c_i = r_i > correct_threshold``:

  K_it = key_mask_it and c_i          (if trace_key_kl)      S = K or E
  E_it = error_mask_it and not c_i    (if trace_error_kl)

  channel    weight w_it                        norm    coef   learner loss
  pg         1 - rho * S_it                     agg     1      GRPO (clipped PG, loss_agg_mode)
  fkl:key    K_it / n_i                         seq     lam    KL(teacher || student) per token
  rkl:error  E_it / n_i                         seq     lam    KL(student || teacher) per token

So the key branch's loss is ``lam * (1/N_K) * sum_i (|K_i| / n_i) * mean_{t in K_i} FKL_it`` with
``N_K`` the number of sequences that have key tokens (global over the mini-batch): each span
branch is averaged over its span and scaled by span length / response length, then averaged over
the sequences that have such a span. Span tokens keep a GRPO share ``1 - lam / lam0`` that grows
back to 1 as ``lam`` anneals; at ``lam = 0`` (or with no spans) the method is exactly GRPO.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..channels import Channel
from ..schedules import Schedule
from .base import MethodInputs, MethodOutput, param_bool, param_float, param_schedule, param_step, register_method
from .grpo import GRPOParams, grpo_seq_advantages, outcome_metrics

__all__ = ["TraceParams", "trace_method"]


@dataclass
class TraceParams(GRPOParams):
    trace_lambda: Schedule = field(default_factory=lambda: Schedule(
        "hold_linear", start=0.5, end=0.0, hold_steps=10, decay_steps=30))
    """TRACE KL coefficient over steps (default 0.5 for 10 steps, then linearly to 0 over 30); the
    teacher and the annotator are not called once it reaches 0."""
    trace_key_kl: bool = True
    """TRACE: forward KL(teacher || student) on key spans of correct rollouts."""
    trace_error_kl: bool = True
    """TRACE: reverse KL(student || teacher) on error spans of incorrect rollouts."""
    correct_threshold: float = 0.5
    """A rollout counts as correct when its reward is above this (trace, scope)."""


def _active(step: int, params: Mapping[str, Any]) -> bool:
    return (param_bool(params, "trace_key_kl") or param_bool(params, "trace_error_kl")) \
        and param_schedule(params, "trace_lambda").value(step) != 0


@register_method(
    "trace", needs=("teacher_topk", "annotations"), gated_needs=("teacher_topk", "annotations"),
    teacher_active=_active, teacher_rows="annotated",
    params=TraceParams,
    description=("TRACE: forward KL on key spans of correct rollouts ('fkl:key'), reverse KL on error spans of "
                 "incorrect rollouts ('rkl:error'), GRPO ('pg') elsewhere; span tokens keep a GRPO share "
                 "1 - lam/lam0; lam annealed (default 0.5 for 10 steps, then linearly to 0 over 30)."))
def trace_method(inputs: MethodInputs, params: dict) -> MethodOutput:
    """TRACE (arXiv 2605.10194): span-routed KL plus GRPO; see the module docstring for the formula."""
    step = param_step(params, "trace")
    sched = param_schedule(params, "trace_lambda")
    lam = sched.value(step)
    use_key, use_err = param_bool(params, "trace_key_kl"), param_bool(params, "trace_error_kl")
    threshold = param_float(params, "correct_threshold")
    mask = inputs.response_mask
    seq_adv = grpo_seq_advantages(inputs, params)
    if _active(step, params):
        correct = (inputs.rewards > threshold)[:, None]
        key = inputs.extra["key_mask"].bool() & correct & mask & use_key
        err = inputs.extra["error_mask"].bool() & ~correct & mask & use_err
    else:  # lam = 0 or both branches off: exactly GRPO, and the (gated) annotations may be absent
        key = err = torch.zeros_like(mask)
    rho = min(max(lam / sched.peak, 0.0), 1.0) if sched.peak > 0 else 0.0
    inv_len = 1.0 / mask.sum(dim=1, keepdim=True).clamp(min=1).float()
    pg_w = mask.float() * (1.0 - rho * (key | err).float())
    channels = [Channel("pg", pg_w),
                Channel("fkl:key", key.float() * inv_len, norm="seq", coef=lam if use_key else 0.0),
                Channel("rkl:error", err.float() * inv_len, norm="seq", coef=lam if use_err else 0.0)]
    n_resp = max(int(mask.sum()), 1)
    metrics = {**outcome_metrics(inputs, seq_adv), "trace/lambda": lam, "trace/pg_span_share": 1.0 - rho,
               "trace/key_token_frac": float(key.sum()) / n_resp, "trace/error_token_frac": float(err.sum()) / n_resp}
    return MethodOutput.from_channels(inputs, channels, advantages=seq_adv, metrics=metrics)
