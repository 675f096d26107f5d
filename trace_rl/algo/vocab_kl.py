"""Per-token divergences between a student and a teacher on the vocabulary (on-policy distillation).

With ``pT`` / ``pS`` the teacher's / student's next-token distributions at one response position:

- ``forward`` = KL(teacher || student) = ``sum_v pT_v (log pT_v - log pS_v)`` (mode covering);
- ``reverse`` = KL(student || teacher) = ``sum_v pS_v (log pS_v - log pT_v)`` (mode seeking);
- ``jsd`` = generalized JSD-beta (GKD, arXiv 2306.13649, Eq. 3 convention):
  ``M = beta pT + (1 - beta) pS``, ``beta KL(pT || M) + (1 - beta) KL(pS || M)``. Both endpoints
  give 0 (beta = 0: M = pS; beta = 1: M = pT); use ``forward`` / ``reverse`` for those.

Each is a sum over vocabulary entries ``v`` of a term ``d_v``. ``entry_clip = c`` clamps every term
to at most ``c`` before the sum (TRACE, arXiv 2605.10194, clips each entry at 0.05): a clipped entry
contributes ``c`` and NO gradient, so one token the teacher is sure of and the student is not
cannot dominate the update. Terms of zero probability are 0 (``0 log 0 = 0``); teacher log-probs
are floored at ``log(tiny)`` (a teacher ``-inf`` gives a large finite reverse KL, never NaN).

Two ways to get the distributions:

- :func:`full_vocab_divergence` takes both models' logits ``[..., V]`` and works on blocks of rows,
  so at most one block of fp32 ``[chunk, V]`` tensors exists at a time, in forward and backward
  (the gradient is computed in closed form from recomputed softmaxes: ``dL/dz = g - pS sum_v g_v``
  with ``g_v = d d_v / d log pS_v``).
- :func:`topk_divergence` takes the student's and the teacher's log-probs at the teacher's top-k
  ids ``[..., K]``, both normalised over the full vocabulary (as vLLM returns the teacher's), so
  the mass outside the top-k is ``1 - sum_k exp(.)``. ``tail`` says what to do with it:
  ``"bucket"`` adds one entry holding each side's tail mass (exact when K = V; verl's optional
  tail bucket); ``"renorm"`` renormalises both over the top-k (SCOPE, arXiv 2604.10688);
  ``"ignore"`` sums over the top-k only (verl's default).

Both are differentiable in the STUDENT only: the teacher is a constant (detached).
:func:`sampled_kl` is the sampled-token estimator (k1/k2/k3) of :mod:`trace_rl.algo.kl`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .kl import KL_ESTIMATORS, kl_estimate
from .logprobs import _block, _check_chunk, _check_temperature, _compute_dtype, _row_blocks

__all__ = ["DIVERGENCES", "TAIL_MODES", "KL_ESTIMATORS", "topk_divergence", "full_vocab_divergence", "sampled_kl"]

DIVERGENCES = ("forward", "reverse", "jsd")
TAIL_MODES = ("bucket", "renorm", "ignore")


def _check_options(kind: str, beta: float, entry_clip: float | None) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence kind {kind!r}; use one of {', '.join(DIVERGENCES)}")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1] (the teacher's share of the JSD mixture), got {beta!r}")
    if entry_clip is not None and not (isinstance(entry_clip, (int, float)) and 0 < entry_clip < math.inf):
        raise ValueError(f"entry_clip must be a positive finite number (TRACE uses 0.05) or None, got {entry_clip!r}")


def _check_pair(student: Tensor, teacher: Tensor, s_name: str, t_name: str) -> None:
    for name, t in ((s_name, student), (t_name, teacher)):
        if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[-1] < 1:
            raise ValueError(f"{name} must be a tensor of shape [..., K] with K >= 1")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(f"{s_name} {tuple(student.shape)} and {t_name} {tuple(teacher.shape)} must have the same "
                         f"shape (the same ids, in the same order, on both sides)")


def _xlogy_diff(logp: Tensor, a: Tensor) -> Tensor:
    """``p (logp - a)`` with ``p = exp(logp)``, and 0 where ``p = 0``."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - a), torch.zeros_like(p))


def _mixture_log(ls: Tensor, lt: Tensor, beta: float) -> Tensor:
    """``log M = log(beta pT + (1 - beta) pS)``."""
    if beta == 0.0:
        return ls
    if beta == 1.0:
        return lt
    return torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))


def _floor(lt: Tensor) -> Tensor:
    """Teacher log-probs floored at ``log(tiny)`` (about -87 in fp32): a teacher ``-inf`` (vLLM may return
    one) gives a large finite reverse KL instead of inf, and no ``0 * inf`` NaN in any gradient."""
    return lt.clamp_min(math.log(torch.finfo(lt.dtype).tiny))


def _entry_terms(ls: Tensor, lt: Tensor, kind: str, beta: float) -> Tensor:
    """The per-entry terms ``d_v`` of the divergence, from log-probs ``ls`` (student), ``lt`` (teacher)."""
    lt = _floor(lt)
    if kind == "forward":
        return _xlogy_diff(lt, ls)
    if kind == "reverse":
        return _xlogy_diff(ls, lt)
    lm = _mixture_log(ls, lt, beta)
    return beta * _xlogy_diff(lt, lm) + (1.0 - beta) * _xlogy_diff(ls, lm)


def _entry_grads(ls: Tensor, lt: Tensor, kind: str, beta: float) -> Tensor:
    """``g_v = d d_v / d log pS_v`` (teacher fixed). For jsd: ``d log M_v / d ls_v = (1 - beta) pS_v / M_v``,
    and the ``M`` terms cancel to ``(1 - beta) pS_v (ls_v - log M_v)``."""
    lt = _floor(lt)
    if kind == "forward":
        return -lt.exp()
    ps = ls.exp()
    if kind == "reverse":
        return torch.where(ps > 0, ps * (ls - lt + 1.0), torch.zeros_like(ps))
    return (1.0 - beta) * torch.where(ps > 0, ps * (ls - _mixture_log(ls, lt, beta)), torch.zeros_like(ps))


def _log_tail(logp: Tensor) -> Tensor:
    """``log(1 - sum_k exp(logp_k))`` per row, ``[..., K] -> [..., 1]``; a tail that rounds to <= 0 is
    clamped to the smallest positive number (and then carries no gradient)."""
    tail = -torch.expm1(torch.logsumexp(logp, dim=-1, keepdim=True))
    return tail.clamp_min(torch.finfo(logp.dtype).tiny).log()


def topk_divergence(student_logprobs: Tensor, teacher_logprobs: Tensor, kind: str = "forward", *,
                    beta: float = 0.5, tail: str = "bucket", entry_clip: float | None = None) -> Tensor:
    """Per-token divergence from log-probs at the teacher's top-k ids: ``[..., K], [..., K] -> [...]``.

    ``student_logprobs`` (differentiable) and ``teacher_logprobs`` are log-probabilities of the
    same K token ids, each normalised over its model's full vocabulary. ``kind`` in
    :data:`DIVERGENCES`, ``tail`` in :data:`TAIL_MODES` (module docstring); ``entry_clip`` clamps
    each entry's term, the tail bucket included. With ``K = V`` and ``tail="bucket"`` (tail masses
    0) the result equals :func:`full_vocab_divergence`. Computed in float32 (float64 for float64).
    """
    _check_pair(student_logprobs, teacher_logprobs, "student_logprobs", "teacher_logprobs")
    _check_options(kind, beta, entry_clip)
    if tail not in TAIL_MODES:
        raise ValueError(f"unknown tail mode {tail!r}; use one of {', '.join(TAIL_MODES)}")
    cdt = _compute_dtype(torch.promote_types(student_logprobs.dtype, teacher_logprobs.dtype))
    ls, lt = student_logprobs.to(cdt), teacher_logprobs.detach().to(cdt)
    if tail == "bucket":
        ls = torch.cat([ls, _log_tail(ls)], dim=-1)
        lt = torch.cat([lt, _log_tail(lt)], dim=-1)
    elif tail == "renorm":
        ls = ls - torch.logsumexp(ls, dim=-1, keepdim=True)
        lt = lt - torch.logsumexp(lt, dim=-1, keepdim=True)
    terms = _entry_terms(ls, lt, kind, float(beta))
    if entry_clip is not None:
        terms = terms.clamp(max=float(entry_clip))
    return terms.sum(-1)


def _block_logprobs(s_logits: Tensor, t_logits: Tensor, idx: tuple, cdt: torch.dtype, T: float):
    """Student and teacher log-softmax of one block of rows, ``[n, V]`` each."""
    V = s_logits.shape[-1]
    return (torch.log_softmax(_block(s_logits, idx, V, cdt, T), dim=-1),
            torch.log_softmax(_block(t_logits, idx, V, cdt, T), dim=-1))


class _FullVocabDivergence(torch.autograd.Function):
    """sum_v clip(d_v) per row of [..., V] logits, in blocks; backward recomputes the block's softmaxes."""

    @staticmethod
    def forward(ctx, s_logits: Tensor, t_logits: Tensor, kind: str, beta: float, clip: float | None,
                chunk_size: int, temperature: float) -> Tensor:
        lead = tuple(s_logits.shape[:-1])
        cdt = _compute_dtype(torch.promote_types(s_logits.dtype, t_logits.dtype))
        out = torch.empty(lead, dtype=cdt, device=s_logits.device)
        for idx in _row_blocks(lead, chunk_size):
            ls, lt = _block_logprobs(s_logits, t_logits, idx, cdt, temperature)
            terms = _entry_terms(ls, lt, kind, beta)
            if clip is not None:
                terms.clamp_(max=clip)
            out[idx] = terms.sum(-1).view(out[idx].shape)
        ctx.save_for_backward(s_logits, t_logits)
        ctx.opts = (kind, beta, clip, chunk_size, temperature, cdt)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        s_logits, t_logits = ctx.saved_tensors
        kind, beta, clip, chunk_size, temperature, cdt = ctx.opts
        lead = tuple(s_logits.shape[:-1])
        grad = torch.empty(s_logits.shape, dtype=s_logits.dtype, device=s_logits.device)
        for idx in _row_blocks(lead, chunk_size):
            ls, lt = _block_logprobs(s_logits, t_logits, idx, cdt, temperature)
            g = _entry_grads(ls, lt, kind, beta)
            if clip is not None:  # clamp(max=c) passes the gradient where d_v <= c
                g = torch.where(_entry_terms(ls, lt, kind, beta) <= clip, g, torch.zeros_like(g))
            # d ls_v / d z_u = 1[u = v] - pS_u  ->  dL/dz = g - pS * sum_v g_v
            gz = g - ls.exp() * g.sum(-1, keepdim=True)
            gz.mul_(grad_out[idx].reshape(-1, 1).to(cdt) / temperature)
            grad[idx] = gz.to(s_logits.dtype).view(grad[idx].shape)
        return grad, None, None, None, None, None, None


def full_vocab_divergence(student_logits: Tensor, teacher_logits: Tensor, kind: str = "forward", *,
                          beta: float = 0.5, entry_clip: float | None = None, chunk_size: int = 4096,
                          temperature: float = 1.0) -> Tensor:
    """Per-token divergence from both models' logits on the full vocabulary: ``[..., V], [..., V] -> [...]``.

    Both sides are ``softmax(logits / temperature)``. Rows are processed in blocks of at most
    ``chunk_size``; backward saves only the two inputs and recomputes each block, so no full
    ``[..., V]`` fp32 copy is ever made (besides the gradient, in the student logits' dtype).
    Differentiable w.r.t. ``student_logits`` only. Returns float32 (float64 for float64 logits).
    """
    _check_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    _check_options(kind, beta, entry_clip)
    _check_chunk(chunk_size)
    _check_temperature(temperature)
    return _FullVocabDivergence.apply(student_logits, teacher_logits, kind, float(beta),
                                      None if entry_clip is None else float(entry_clip), chunk_size,
                                      float(temperature))


def sampled_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, estimator: str = "k3", *,
               log_ratio_clamp: float | None = 20.0) -> Tensor:
    """Sampled-token estimate of KL(student || teacher) per token, for tokens sampled from the student:
    :func:`trace_rl.algo.kl.kl_estimate` (k1/k2/k3/abs) with the teacher's log-probs detached."""
    if not isinstance(teacher_logprobs, Tensor):
        raise TypeError("teacher_logprobs must be a torch tensor")
    return kl_estimate(student_logprobs, teacher_logprobs.detach(), estimator, log_ratio_clamp=log_ratio_clamp)
