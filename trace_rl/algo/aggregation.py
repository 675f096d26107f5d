"""Reduce a per-token loss ``[B, R]`` to a scalar, exactly additive over micro-batches.

Every mode is a *sum* over tokens or sequences divided by a normaliser. When the normaliser is
the count over the whole batch (all micro-batches, all data-parallel ranks), the micro-batch
losses add up to the whole-batch loss, so gradient accumulation and data parallelism do not
change the objective (NeMo-RL's "global valid tokens"). Get the counts with
:func:`loss_counts` on every micro-batch, sum them (and all-reduce across ranks), and pass them
as ``num_tokens`` / ``num_seqs``; pass ``max_len`` (the response budget) for the Dr.GRPO mode.

Counting rules: a token counts when its mask entry is nonzero (a float mask's value also
weights the token in the sum); a sequence counts when it has at least one such token, so
all-padding rows (e.g. added to even out ranks) change nothing.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

__all__ = ["AGG_MODES", "aggregate", "loss_counts"]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def loss_counts(mask: Tensor) -> dict[str, Tensor]:
    """``{"num_tokens", "num_seqs"}`` of a ``[B, R]`` mask as 0-dim float64 tensors (all-reducible),
    counted exactly as :func:`aggregate` counts them by default."""
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError("mask must be a [B, R] tensor")
    nz = mask != 0
    return {"num_tokens": nz.sum().to(torch.float64),
            "num_seqs": nz.any(dim=1).sum().to(torch.float64)}


def _as_count(value, name: str, like: Tensor) -> Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() != 0:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(t.shape)}")
    return t


def aggregate(per_token: Tensor, mask: Tensor, mode: str = "token-mean", *, num_tokens=None,
              num_seqs=None, max_len: int | None = None) -> Tensor:
    """Scalar loss from a per-token loss ``[B, R]`` and a mask ``[B, R]`` (bool, or float weights).

    Modes (``x`` = per_token, ``m`` = mask, ``n_i`` = number of tokens of sequence i):
      - ``token-mean``: ``sum(x * m) / num_tokens`` (DAPO, arXiv 2503.14476, Eq. 12: every token
        weighs the same, long responses are not diluted).
      - ``seq-mean-token-mean``: ``sum_i (sum_t x_it m_it / n_i) / num_seqs`` (the original GRPO,
        arXiv 2402.03300, Eq. 3).
      - ``seq-mean-token-sum``: ``sum_i sum_t x_it m_it / num_seqs``.
      - ``seq-mean-token-sum-norm``: ``sum(x * m) / (num_seqs * max_len)`` (Dr. GRPO, arXiv
        2503.20783: a constant normaliser, no length bias).
    ``num_tokens`` / ``num_seqs`` default to this batch's counts (see :func:`loss_counts`); pass
    the global counts when micro-batching. ``max_len`` defaults to ``mask.shape[1]``; pass the
    same value (e.g. the generation budget) for every micro-batch. An empty normaliser gives 0.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; use one of {', '.join(AGG_MODES)}")
    if not isinstance(per_token, Tensor) or per_token.dim() != 2:
        raise ValueError(f"per_token must be a [B, R] tensor, got "
                         f"{tuple(per_token.shape) if isinstance(per_token, Tensor) else type(per_token).__name__}")
    if not isinstance(mask, Tensor) or mask.shape != per_token.shape:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask has shape {got}, expected {tuple(per_token.shape)} (like per_token)")
    nz = mask != 0
    w = mask.to(per_token.dtype)
    # where, not x * w alone: NaN/inf in padding must not leak through 0 * inf
    xw = torch.where(nz, per_token * w, torch.zeros_like(per_token))
    if mode == "token-mean":
        n = nz.sum() if num_tokens is None else num_tokens
        return xw.sum() / _as_count(n, "num_tokens", xw).clamp(min=1)
    n_seqs = nz.any(dim=1).sum() if num_seqs is None else num_seqs
    n_seqs = _as_count(n_seqs, "num_seqs", xw).clamp(min=1)
    if mode == "seq-mean-token-mean":
        per_seq = xw.sum(dim=1) / nz.sum(dim=1).clamp(min=1).to(xw.dtype)
        return per_seq.sum() / n_seqs
    if mode == "seq-mean-token-sum":
        return xw.sum() / n_seqs
    L = mask.shape[1] if max_len is None else max_len
    try:
        L = operator.index(L)
    except TypeError:
        raise ValueError(f"max_len must be a positive int (the response budget), got {L!r}") from None
    if L < 1:
        raise ValueError(f"max_len must be a positive int (the response budget), got {L!r}")
    return xw.sum() / (n_seqs * L)
