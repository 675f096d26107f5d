"""Accounting of privileged exposure: how much of the training signal came from the teacher that
sees privileged context (TRACE, arXiv 2605.10194, argues that less exposure, routed to the right
tokens, beats all-token self-distillation).

A token is *under a teacher channel* when its folded weight is nonzero in a channel whose kind is
in :data:`~trace_rl.algo.channels.TEACHER_KINDS` (``fkl, rkl, jsd, skl, logratio``: their
gradient carries the teacher's distribution or log-probs). ``mle`` is not one (SCOPE's MLE fits
the student's own correct tokens; the teacher only weighs which), nor is ``pg``.

Per step and cumulative (:class:`ExposureTracker`, metrics under ``exposure/``):
  - ``teacher_token_frac``: response tokens under a teacher channel / response tokens (rollout batch);
  - ``privileged_grad``: tokens that received teacher gradient: under a teacher channel *and* in a
    row the learner trained on (``learned_rows``, e.g. after zero-variance filtering);
  - ``lambda``, ``lambda_sum``, ``lambda_sq_sum``: the teacher coefficient and its running sums
    (sum of lambda and of lambda^2 over steps: the total and "energy" of the teacher signal);
  - ``key_logprob_lift``: the mean change of the policy's log-prob of annotated key tokens between
    two consecutive evaluations (:func:`logprob_lift`), and its running sum.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .channels import TEACHER_KINDS, channel_kind

__all__ = ["exposure_counts", "teacher_token_mask", "teacher_coef", "logprob_lift", "ExposureTracker"]


def teacher_token_mask(channel_names: Sequence[str], channel_weights: Tensor, response_mask: Tensor) -> Tensor:
    """[B, R] bool: response tokens with a nonzero weight in at least one teacher channel."""
    if channel_weights is None or len(channel_names) == 0:
        return torch.zeros_like(response_mask, dtype=torch.bool)
    if channel_weights.dim() != 3 or channel_weights.shape[0] != len(channel_names) \
            or channel_weights.shape[1:] != response_mask.shape:
        raise ValueError(f"channel_weights must be [C, B, R] = [{len(channel_names)}, "
                         f"{', '.join(map(str, response_mask.shape))}], got {tuple(channel_weights.shape)}")
    idx = [c for c, name in enumerate(channel_names) if channel_kind(name) in TEACHER_KINDS]
    if not idx:
        return torch.zeros_like(response_mask, dtype=torch.bool)
    return (channel_weights[idx] != 0).any(dim=0) & response_mask.bool()


def exposure_counts(channel_names: Sequence[str], channel_weights: Tensor, response_mask: Tensor, *,
                    learned_rows: Tensor | None = None) -> tuple[int, int, int]:
    """``(response tokens, tokens under a teacher channel, such tokens in learned rows)`` of one batch: what
    :meth:`ExposureTracker.add` accumulates (computed where the batch is, e.g. the routing stage)."""
    mask = response_mask.bool()
    under = teacher_token_mask(channel_names, channel_weights, mask)
    rows = torch.ones(mask.shape[0], dtype=torch.bool) if learned_rows is None else learned_rows.bool().cpu()
    if rows.shape != (mask.shape[0],):
        raise ValueError(f"learned_rows must be [B] = [{mask.shape[0]}] bool, got {tuple(rows.shape)}")
    return int(mask.sum()), int(under.sum()), int(under[rows.to(under.device)].sum())


def teacher_coef(metrics: Mapping[str, float]) -> float:
    """The largest ``coef/<channel>`` of a teacher channel in a method's metrics (0 if none): the
    step's lambda."""
    vals = [float(v) for k, v in metrics.items()
            if k.startswith("coef/") and channel_kind(k[len("coef/"):]) in TEACHER_KINDS]
    return max(vals, default=0.0)


def logprob_lift(before: Tensor, after: Tensor, mask: Tensor | None = None) -> float:
    """Mean of ``after - before`` over the tokens in ``mask`` (all if None): how much the policy's
    log-prob of the same (key) tokens rose between two evaluations. NaN if there are none."""
    if before.shape != after.shape or (mask is not None and mask.shape != before.shape):
        raise ValueError(f"before {tuple(before.shape)}, after {tuple(after.shape)} and mask "
                         f"{None if mask is None else tuple(mask.shape)} must have the same shape "
                         f"(the same key tokens, evaluated twice)")
    d = (after.double() - before.double())
    d = d[mask.bool()] if mask is not None else d.flatten()
    return float(d.mean()) if d.numel() else float("nan")


class ExposureTracker:
    """Per-step and cumulative exposure counters; ``state_dict`` is plain JSON (for checkpoints)."""

    def __init__(self) -> None:
        self.steps = 0
        self.response_tokens = 0
        self.teacher_tokens = 0
        self.privileged_grad_tokens = 0
        self.lambda_sum = 0.0
        self.lambda_sq_sum = 0.0
        self.lift_sum = 0.0
        self.key_logprobs: list[float] | None = None  # flattened key-token log-probs at the last evaluation
        self._last: dict[str, float] = {}

    def update(self, channel_names: Sequence[str], channel_weights: Tensor, response_mask: Tensor, *,
               lam: float = 0.0, learned_rows: Tensor | None = None) -> dict[str, float]:
        """Count one training step: the batch's channels (names, folded weights [C, B, R]) and mask
        [B, R]; ``lam`` is the step's teacher coefficient (:func:`teacher_coef`); ``learned_rows``
        [B] bool marks the rows the learner trained on (default: all). Returns this step's metrics."""
        n_resp, n_teacher, n_grad = exposure_counts(channel_names, channel_weights, response_mask,
                                                    learned_rows=learned_rows)
        return self.add(n_resp, n_teacher, n_grad, lam)

    def add(self, n_resp: int, n_teacher: int, n_grad: int, lam: float) -> dict[str, float]:
        """Count one training step from its :func:`exposure_counts` and teacher coefficient ``lam``."""
        lam = float(lam)
        if not math.isfinite(lam):
            raise ValueError(f"lam must be finite, got {lam}")
        self.steps += 1
        self.response_tokens += int(n_resp)
        self.teacher_tokens += int(n_teacher)
        self.privileged_grad_tokens += int(n_grad)
        self.lambda_sum += lam
        self.lambda_sq_sum += lam * lam
        self._last = {"exposure/teacher_token_frac": n_teacher / max(n_resp, 1),
                      "exposure/privileged_grad": float(n_grad), "exposure/lambda": lam}
        return self.metrics()

    def record_key_logprobs(self, logprobs: Tensor, key_mask: Tensor | None = None) -> float:
        """Record the policy's log-probs of the annotated key tokens of a fixed probe set at an
        evaluation; returns the lift since the previous evaluation (NaN at the first one)."""
        flat = (logprobs[key_mask.bool()] if key_mask is not None else logprobs.flatten()).double().cpu()
        lift = float("nan")
        if self.key_logprobs is not None:
            if len(self.key_logprobs) != flat.numel():
                raise ValueError(f"the key tokens changed between evaluations ({len(self.key_logprobs)} then "
                                 f"{flat.numel()}); evaluate the same probe set every time")
            lift = logprob_lift(torch.tensor(self.key_logprobs, dtype=torch.float64), flat)
            if math.isfinite(lift):
                self.lift_sum += lift
        self.key_logprobs = flat.tolist()
        self._last["exposure/key_logprob_lift"] = lift
        return lift

    def metrics(self) -> dict[str, float]:
        """The last step's values and the cumulative ones, all under ``exposure/``."""
        return {**self._last,
                "exposure/teacher_token_frac_cum": self.teacher_tokens / max(self.response_tokens, 1),
                "exposure/privileged_grad_cum": float(self.privileged_grad_tokens),
                "exposure/lambda_sum": self.lambda_sum, "exposure/lambda_sq_sum": self.lambda_sq_sum,
                "exposure/key_logprob_lift_cum": self.lift_sum}

    _STATE = ("steps", "response_tokens", "teacher_tokens", "privileged_grad_tokens", "lambda_sum",
              "lambda_sq_sum", "lift_sum", "key_logprobs")

    def state_dict(self) -> dict[str, Any]:
        """The cumulative state as JSON-serialisable values."""
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing or unknown keys raise)."""
        if set(state) != set(self._STATE):
            raise ValueError(f"exposure state keys {sorted(state)} differ from {sorted(self._STATE)}")
        for k in self._STATE:
            setattr(self, k, state[k] if k != "key_logprobs" or state[k] is None else list(state[k]))
        self._last = {}
