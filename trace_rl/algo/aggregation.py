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

The ``balanced`` mode also needs each sequence's advantage sign, so it takes ``advantages`` and
four more global counts (``num_pos_tokens``, ``num_pos_seqs``, ``num_neg_tokens``,
``num_neg_seqs``), which :func:`loss_counts` returns when given ``advantages``.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

__all__ = ["AGG_MODES", "AGG_MODE_DOCS", "BALANCED_COUNTS", "aggregate", "loss_counts", "advantage_sign"]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "balanced")
AGG_MODE_DOCS = {
    "token-mean": "sum of token losses / tokens in the batch (DAPO; TRL's dapo loss)",
    "seq-mean-token-mean": "mean over sequences of each sequence's token mean (the original GRPO)",
    "seq-mean-token-sum": "mean over sequences of each sequence's token sum",
    "seq-mean-token-sum-norm": "sum of token losses / (sequences x the response budget) (Dr. GRPO)",
    "balanced": "token means over positive- and negative-advantage sequences, mixed by sequence counts "
                "(Balanced Aggregation; docs/methods/balanced.md)",
}
"""One line per aggregation mode (``algorithm.loss_agg_mode``), listed by ``python -m trace_rl.algo``."""
BALANCED_COUNTS = ("num_pos_tokens", "num_pos_seqs", "num_neg_tokens", "num_neg_seqs")


def advantage_sign(advantages: Tensor, mask: Tensor) -> Tensor:
    """[B] in {-1, 0, 1}: the sign of each sequence's advantage summed over its masked tokens
    (for outcome advantages, simply the sign of the sequence's advantage)."""
    if not isinstance(advantages, Tensor) or advantages.shape != mask.shape:
        got = tuple(advantages.shape) if isinstance(advantages, Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must be a [B, R] tensor like the mask {tuple(mask.shape)}, got {got}")
    nz = mask != 0
    return torch.sign(torch.where(nz, advantages.double(), torch.zeros((), dtype=torch.float64)).sum(dim=1))


def loss_counts(mask: Tensor, advantages: Tensor | None = None) -> dict[str, Tensor]:
    """``{"num_tokens", "num_seqs"}`` of a ``[B, R]`` mask as 0-dim float64 tensors (all-reducible),
    counted exactly as :func:`aggregate` counts them by default; with ``advantages`` [B, R] also the
    :data:`BALANCED_COUNTS` (tokens and sequences of positive / negative advantage) for ``balanced``."""
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError("mask must be a [B, R] tensor")
    nz = mask != 0
    out = {"num_tokens": nz.sum().to(torch.float64), "num_seqs": nz.any(dim=1).sum().to(torch.float64)}
    if advantages is not None:
        sign = advantage_sign(advantages, mask)
        for name, s in (("pos", 1), ("neg", -1)):
            rows = nz & (sign == s)[:, None]
            out[f"num_{name}_tokens"] = rows.sum().to(torch.float64)
            out[f"num_{name}_seqs"] = rows.any(dim=1).sum().to(torch.float64)
    return out


def _as_count(value, name: str, like: Tensor) -> Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() != 0:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(t.shape)}")
    return t


def aggregate(per_token: Tensor, mask: Tensor, mode: str = "token-mean", *, num_tokens=None,
              num_seqs=None, max_len: int | None = None, advantages: Tensor | None = None,
              num_pos_tokens=None, num_pos_seqs=None, num_neg_tokens=None, num_neg_seqs=None) -> Tensor:
    """Scalar loss from a per-token loss ``[B, R]`` and a mask ``[B, R]`` (bool, or float weights).

    Modes (``x`` = per_token, ``m`` = mask, ``n_i`` = number of tokens of sequence i):
      - ``token-mean``: ``sum(x * m) / num_tokens`` (DAPO, arXiv 2503.14476, Eq. 12: every token
        weighs the same, long responses are not diluted).
      - ``seq-mean-token-mean``: ``sum_i (sum_t x_it m_it / n_i) / num_seqs`` (the original GRPO,
        arXiv 2402.03300, Eq. 3).
      - ``seq-mean-token-sum``: ``sum_i sum_t x_it m_it / num_seqs``.
      - ``seq-mean-token-sum-norm``: ``sum(x * m) / (num_seqs * max_len)`` (Dr. GRPO, arXiv
        2503.20783: a constant normaliser, no length bias).
      - ``balanced``: sequences are split by the sign of their advantage (:func:`advantage_sign`:
        ``+``, ``-``, ``0``); each class gets its own token mean, and the class means are combined
        weighted by their sequence counts:
        ``sum_c S_c * (sum_{i in c} sum_t x_it m_it / T_c) / num_seqs`` with ``T_c`` / ``S_c`` the
        class's tokens / sequences (the ``0`` class: ``num_tokens - T_+ - T_-`` and ``num_seqs -
        S_+ - S_-``). Token-mean lets the class with longer responses dominate (wrong answers are
        often long); this keeps each class's weight equal to its share of sequences. Needs
        ``advantages`` [B, R]; with every sequence in one class it equals ``token-mean``.
    ``num_tokens`` / ``num_seqs`` (and the four ``num_pos_* / num_neg_*`` counts) default to this
    batch's counts (see :func:`loss_counts`); pass the global counts when micro-batching. ``max_len``
    defaults to ``mask.shape[1]``; pass the same value (e.g. the generation budget) for every
    micro-batch. An empty normaliser gives 0.
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
    if mode == "balanced":
        return _balanced(xw, mask, nz, advantages, n_seqs, num_tokens, num_seqs,
                         {"num_pos_tokens": num_pos_tokens, "num_pos_seqs": num_pos_seqs,
                          "num_neg_tokens": num_neg_tokens, "num_neg_seqs": num_neg_seqs})
    L = mask.shape[1] if max_len is None else max_len
    try:
        L = operator.index(L)
    except TypeError:
        raise ValueError(f"max_len must be a positive int (the response budget), got {L!r}") from None
    if L < 1:
        raise ValueError(f"max_len must be a positive int (the response budget), got {L!r}")
    return xw.sum() / (n_seqs * L)


def _balanced(xw: Tensor, mask: Tensor, nz: Tensor, advantages: Tensor | None, n_seqs: Tensor, num_tokens,
              num_seqs, counts: dict) -> Tensor:
    if advantages is None:
        raise ValueError("loss_agg_mode 'balanced' needs advantages [B, R] (the sign of each sequence's advantage "
                         "picks its class); pass advantages=batch.advantages")
    local = loss_counts(mask, advantages)
    c = {k: _as_count(local[k] if v is None else v, k, xw) for k, v in counts.items()}
    n_tok = _as_count(local["num_tokens"] if num_tokens is None else num_tokens, "num_tokens", xw)
    n_seq = _as_count(local["num_seqs"] if num_seqs is None else num_seqs, "num_seqs", xw)
    classes = {1: (c["num_pos_tokens"], c["num_pos_seqs"]), -1: (c["num_neg_tokens"], c["num_neg_seqs"]),
               0: (n_tok - c["num_pos_tokens"] - c["num_neg_tokens"], n_seq - c["num_pos_seqs"] - c["num_neg_seqs"])}
    sign = advantage_sign(advantages, mask).to(xw.device)
    row_sums = xw.sum(dim=1)
    total = xw.new_zeros(())
    for s, (t_c, s_c) in classes.items():
        total = total + s_c * torch.where(sign == s, row_sums, torch.zeros_like(row_sums)).sum() / t_c.clamp(min=1)
    return total / n_seqs
