"""Character spans (from an annotator) -> token masks of a response, and the coverage cap.

An annotator marks spans of the response TEXT (``[start, end)`` character offsets); the losses need
token positions. The tokenizer's offset mapping gives every response token its character interval
``[s, e)`` in the same text. Rules (TRACE, arXiv 2605.10194, routes KL to these tokens):

- **match**: a token is in a span when its interval overlaps the span: ``s < span_end`` and
  ``e > span_start``. A token with an empty interval (``s >= e``: special tokens, a byte-level piece
  that ends mid-character, offsets ``(0, 0)``) never matches.
- **empty** spans (``end <= start``) are dropped and counted.
- **out of range**: the text is ``[0, text_len)`` (``text_len`` defaults to the largest token end
  offset). A span reaching outside it is clipped to it and counted; if nothing is left it is
  dropped (counted once, as out of range).
- **overlap**: spans that overlap (share at least one character) are merged into one; each span
  absorbed into another counts as ``merged``. Touching spans (``end == next start``) stay separate.
- **unmatched**: a (merged) span that covers no token, e.g. only whitespace a tokenizer trimmed.

**Coverage cap** (:func:`cap_span_mask`): at most ``floor(max_frac * n)`` span tokens per response of
``n`` tokens (TRACE uses 25%). The rule is deterministic and positional: span tokens are kept from
the start of the response on, i.e. whole spans in order of start position, and the span that
crosses the budget is truncated (its later tokens dropped), later spans dropped. Earlier tokens
condition everything after them, and an error annotation marks the first error, so the start of
the response is what the teacher signal should keep.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["SpanStats", "spans_to_token_mask", "cap_span_mask", "batch_span_masks"]

Span = tuple[int, int]


@dataclass
class SpanStats:
    """Counts of what happened to the spans of one or more responses (summable with ``+``)."""
    spans_total: int = 0
    """Spans given."""
    spans_empty: int = 0
    """Spans with ``end <= start``: dropped."""
    spans_out_of_range: int = 0
    """Spans reaching outside ``[0, text_len)``: clipped, or dropped when nothing was left."""
    spans_unmatched: int = 0
    """Spans (after merging) that cover no token."""
    spans_merged: int = 0
    """Spans absorbed into an overlapping one."""
    tokens_dropped_by_cap: int = 0
    """Span tokens removed by the coverage cap."""

    def __add__(self, other: "SpanStats") -> "SpanStats":
        return SpanStats(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _as_pairs(x, name: str) -> list[Span]:
    if isinstance(x, Tensor):
        if x.dim() != 2 or x.shape[1] != 2 or x.dtype.is_floating_point:
            raise ValueError(f"{name} must be an integer tensor of shape [n, 2], got {tuple(x.shape)} {x.dtype}")
        return [(int(a), int(b)) for a, b in x.tolist()]
    out = []
    for i, p in enumerate(x):
        try:
            a, b = p
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{i}] = {p!r} is not a (start, end) pair of character offsets") from None
        if not all(isinstance(v, int) or (isinstance(v, Tensor) and v.dim() == 0 and not v.is_floating_point())
                   for v in (a, b)):
            raise TypeError(f"{name}[{i}] = {p!r}: character offsets must be ints")
        out.append((int(a), int(b)))
    return out


def spans_to_token_mask(spans: Sequence[Span], offsets: Sequence[Span] | Tensor, response_len: int, *,
                        text_len: int | None = None) -> tuple[Tensor, SpanStats]:
    """Token mask ``[response_len]`` bool of the tokens covered by character ``spans`` (rules: module doc).

    ``offsets``: the ``(start, end)`` character interval of each response token, in order, as the
    tokenizer's ``offset_mapping`` (or :func:`trace_rl.annotate.response_token_offsets`) gives it;
    a list or an ``[n, 2]`` integer tensor with ``n <= response_len`` (positions past ``n`` are
    padding and never match). Returns ``(mask, stats)``.
    """
    if not isinstance(response_len, int) or response_len < 0:
        raise ValueError(f"response_len must be a non-negative int, got {response_len!r}")
    offs = _as_pairs(offsets, "offsets")
    if len(offs) > response_len:
        raise ValueError(f"offsets has {len(offs)} tokens but response_len is {response_len}: give the offsets "
                         f"of the response tokens only")
    pairs = _as_pairs(spans, "spans")
    if text_len is None:
        text_len = max((e for s, e in offs if e > s), default=0)
    elif not isinstance(text_len, int) or text_len < 0:
        raise ValueError(f"text_len must be a non-negative int (the response text's length), got {text_len!r}")
    stats = SpanStats(spans_total=len(pairs))
    kept: list[Span] = []
    for s, e in pairs:
        if e <= s:
            stats.spans_empty += 1
            continue
        if s < 0 or e > text_len:
            stats.spans_out_of_range += 1
            s, e = max(s, 0), min(e, text_len)
            if e <= s:
                continue
        kept.append((s, e))
    merged: list[list[int]] = []
    for s, e in sorted(kept):
        if merged and s < merged[-1][1]:  # overlaps the previous one (touching spans stay apart)
            merged[-1][1] = max(merged[-1][1], e)
            stats.spans_merged += 1
        else:
            merged.append([s, e])
    mask = torch.zeros(response_len, dtype=torch.bool)
    ts, te = torch.tensor(offs, dtype=torch.long).view(-1, 2).unbind(1)
    for s, e in merged:
        hit = (ts < te) & (ts < e) & (te > s)
        if hit.any():
            mask[: len(offs)] |= hit
        else:
            stats.spans_unmatched += 1
    return mask, stats


def cap_span_mask(mask: Tensor, n_response_tokens: int, max_frac: float | None = 0.25) -> tuple[Tensor, int]:
    """Keep at most ``floor(max_frac * n_response_tokens)`` of the True entries of ``mask`` (``[R]`` bool),
    the earliest ones (module docstring). Returns ``(capped mask, number of tokens dropped)``;
    ``max_frac=None`` keeps everything."""
    if not isinstance(mask, Tensor) or mask.dim() != 1:
        raise ValueError("mask must be a [R] tensor (one response)")
    if not isinstance(n_response_tokens, int) or n_response_tokens < 0:
        raise ValueError(f"n_response_tokens must be a non-negative int, got {n_response_tokens!r}")
    m = mask.bool()
    if max_frac is None:
        return m.clone(), 0
    if not (isinstance(max_frac, (int, float)) and 0 <= max_frac <= 1):
        raise ValueError(f"max_frac must be in [0, 1] (TRACE uses 0.25) or None, got {max_frac!r}")
    budget = math.floor(max_frac * n_response_tokens + 1e-9)  # 0.29 * 100 = 28.999... counts as 29
    rank = m.long().cumsum(0)  # 1-based position of each span token among the span tokens
    capped = m & (rank <= budget)
    return capped, int(m.sum()) - int(capped.sum())


def batch_span_masks(spans: Sequence[Sequence[Span]], offsets: Sequence[Sequence[Span] | Tensor],
                     response_mask: Tensor, *, max_frac: float | None = 0.25,
                     text_lens: Sequence[int | None] | None = None) -> tuple[Tensor, dict[str, int]]:
    """Span masks of a batch: ``spans[i]`` and ``offsets[i]`` of response ``i`` -> ``[B, R]`` bool, capped
    per response at ``max_frac`` of its ``response_mask`` tokens (never outside ``response_mask``),
    and the summed :class:`SpanStats` as a dict of ints (for metrics)."""
    if not isinstance(response_mask, Tensor) or response_mask.dim() != 2:
        raise ValueError("response_mask must be a [B, R] tensor")
    B, R = response_mask.shape
    if len(spans) != B or len(offsets) != B:
        raise ValueError(f"got spans for {len(spans)} and offsets for {len(offsets)} responses; the batch has {B}")
    if text_lens is not None and len(text_lens) != B:
        raise ValueError(f"text_lens has {len(text_lens)} entries; the batch has {B}")
    rm = response_mask.bool().cpu()
    out = torch.zeros(B, R, dtype=torch.bool)
    total = SpanStats()
    for i in range(B):
        m, st = spans_to_token_mask(spans[i], offsets[i], R, text_len=None if text_lens is None else text_lens[i])
        m &= rm[i]
        out[i], st.tokens_dropped_by_cap = cap_span_mask(m, int(rm[i].sum()), max_frac)
        total = total + st
    return out.to(response_mask.device), total.as_dict()
