"""Per-token KL estimators from sampled-token log-probabilities.

With tokens sampled from ``p`` (the policy) and ``log q`` from a reference, each estimator is a
per-token quantity whose mean over samples approximates ``KL(p || q)`` (Schulman, "Approximating
KL divergence", 2020, http://joschu.net/blog/kl-approx.html):

=====  ==========================================  =========================================
kind   per token (lp = log p, lq = log q)          property
=====  ==========================================  =========================================
k1     lp - lq                                     unbiased, high variance, can be negative
k2     0.5 (lp - lq)^2                             biased (low for close p, q), >= 0
k3     exp(lq - lp) - (lq - lp) - 1                unbiased, low variance, >= 0
abs    |lp - lq|                                   biased, >= 0
=====  ==========================================  =========================================
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KL_ESTIMATORS", "kl_estimate"]

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3", *,
                log_ratio_clamp: float | None = 20.0) -> Tensor:
    """Per-token estimate of ``KL(p || q)`` from ``logprobs = log p(x)`` and ``ref_logprobs = log q(x)``
    of tokens ``x`` sampled from ``p``; same shape as the inputs (no masking, no reduction).

    ``kind`` is one of k1, k2, k3, abs (see the module docstring). For k3, ``lq - lp`` is clamped
    to ``[-log_ratio_clamp, log_ratio_clamp]`` before ``exp`` (as verl does with 20) so a token the
    reference finds extremely unlikely cannot overflow to inf; ``None`` disables the clamp.
    Differentiable w.r.t. both inputs (detach ``ref_logprobs`` yourself when it is a constant).
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator kind {kind!r}; use one of {', '.join(KL_ESTIMATORS)}")
    if not isinstance(logprobs, Tensor) or not isinstance(ref_logprobs, Tensor):
        raise TypeError("logprobs and ref_logprobs must be torch tensors")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} "
                         f"must have the same shape")
    if log_ratio_clamp is not None and not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0 or None, got {log_ratio_clamp!r}")
    diff = logprobs - ref_logprobs  # log p - log q
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff.square()
    if kind == "abs":
        return diff.abs()
    neg = -diff  # log(q/p)
    if log_ratio_clamp is not None:
        neg = neg.clamp(-log_ratio_clamp, log_ratio_clamp)
    # expm1(x) - x is exp(x) - x - 1 without cancellation for small x
    return torch.expm1(neg) - neg
