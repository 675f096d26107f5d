"""A response as numbered segments: what an LLM annotator sees and answers about.

An LLM annotator cannot point at character offsets reliably, but it can name a step: the response
is split into segments (its non-empty lines; a long line is split further at sentence ends), each
keeps its exact character span in the response, and the prompt shows them as ``[1] ...``,
``[2] ...``. The annotator answers with segment ids; :func:`segment_spans` maps them back to the
character spans the driver aligns to tokens (``trace_rl.algo.spans``).

Rules:

- a segment is stripped of surrounding whitespace; its span covers exactly the stripped text, so
  ``response[s.start:s.end] == s.text``;
- a line longer than ``sentence_split_chars`` is split after ``.``, ``!`` or ``?`` followed by
  whitespace (so ``3.5`` or ``e.g.x`` stay whole);
- more than ``max_segments`` pieces are merged into ``max_segments`` runs of consecutive pieces (a
  merged segment's span runs from its first piece's start to its last piece's end), so the prompt
  of a very long response stays bounded;
- the rendered prompt shows each segment on one line (inner newlines become spaces) and cuts a
  segment longer than ``max_render_chars`` in the middle (`` ... ``): the ids stay exact.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

Span = tuple[int, int]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Segment:
    """One numbered piece of a response."""

    index: int
    """1-based id, as shown to the annotator."""
    start: int
    """First character of the segment in the response."""
    end: int
    """One past its last character: ``response[start:end] == text``."""
    text: str
    """The segment's text."""

    @property
    def span(self) -> Span:
        return (self.start, self.end)


def _stripped(text: str, start: int, end: int) -> Span | None:
    """``[start, end)`` shrunk to exclude surrounding whitespace; None when nothing is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def _pieces(text: str, sentence_split_chars: int) -> list[Span]:
    pieces: list[Span] = []
    pos = 0
    for line in text.splitlines(keepends=True):
        line_span = _stripped(text, pos, pos + len(line))
        pos += len(line)
        if line_span is None:
            continue
        s, e = line_span
        if e - s <= sentence_split_chars:
            pieces.append(line_span)
            continue
        cut = s
        for m in _SENTENCE_END.finditer(text, s, e):
            piece = _stripped(text, cut, m.start())
            if piece is not None:
                pieces.append(piece)
            cut = m.end()
        piece = _stripped(text, cut, e)
        if piece is not None:
            pieces.append(piece)
    return pieces


def split_segments(text: str, *, max_segments: int = 64, sentence_split_chars: int = 200) -> list[Segment]:
    """The numbered segments of ``text`` (see the module doc); ``[]`` for an empty or blank text."""
    if max_segments < 1:
        raise ValueError(f"annotator max_segments={max_segments} must be >= 1")
    if sentence_split_chars < 1:
        raise ValueError(f"annotator sentence_split_chars={sentence_split_chars} must be >= 1")
    pieces = _pieces(text, sentence_split_chars)
    if len(pieces) > max_segments:
        n = len(pieces)
        bounds = [(k * n // max_segments, (k + 1) * n // max_segments) for k in range(max_segments)]
        pieces = [(pieces[a][0], pieces[b - 1][1]) for a, b in bounds if b > a]
    return [Segment(i + 1, s, e, text[s:e]) for i, (s, e) in enumerate(pieces)]


def render_segments(segments: Sequence[Segment], *, max_render_chars: int = 400) -> str:
    """``"[1] first\\n[2] second..."``: one line per segment, as the annotator prompt shows them."""
    lines = []
    for seg in segments:
        body = " ".join(seg.text.split())
        if len(body) > max_render_chars:
            half = max(1, (max_render_chars - 5) // 2)
            body = f"{body[:half]} ... {body[-half:]}"
        lines.append(f"[{seg.index}] {body}")
    return "\n".join(lines)


def segment_spans(segments: Sequence[Segment], ids: Iterable[int]) -> list[Span]:
    """Character spans of the segments ``ids`` (1-based), in response order; consecutive segments are
    joined into one span (covering the whitespace between them). Unknown ids are ignored (the parser
    has already dropped and counted them)."""
    by_id = {s.index: s for s in segments}
    chosen = sorted({i for i in ids if i in by_id})
    spans: list[Span] = []
    prev = None
    for i in chosen:
        seg = by_id[i]
        if prev is not None and i == prev + 1:
            spans[-1] = (spans[-1][0], seg.end)
        else:
            spans.append(seg.span)
        prev = i
    return spans
