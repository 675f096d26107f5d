"""Outcome reward for math answers: the last ``\\boxed{}`` of a response, checked with math-verify.

``math_verify_score`` is the default score function of the :class:`~trace_rl.rewards.pool.VerifierPool`.
math-verify arms ``signal.alarm`` for its own timeouts, which only works in the main thread of a
process, and pathological answers can still hang sympy (STACK_NOTES.md): call this function through
the pool (killable worker processes) whenever the input comes from a model.
"""
from __future__ import annotations

import re
import threading

# Boxed answers longer than this score 0 without being parsed. A real final answer is a number, an
# expression or a small matrix; thousands of characters inside a box are a degenerate sample
# (a repetition loop), and parsing them only burns the verifier's timeout.
MAX_ANSWER_CHARS = 1000

# math-verify's own per-call timeouts (seconds, whole numbers: they arm signal.alarm). The pool's
# hard timeout is the real guard; these are a second line when the function runs in a main thread.
MATH_VERIFY_TIMEOUT_S = 5

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _closing_brace(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` matching the ``{`` at ``open_pos``; escaped braces (``\\{``, ``\\}``) do not count."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character: \{ and \} are literal braces in LaTeX
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def boxed_span(text: str) -> tuple[int, int] | None:
    """Character span ``(start, end)`` of the CONTENT of the last ``\\boxed{...}``/``\\fbox{...}``.

    ``None`` when there is no box, or when the last box is never closed (a truncated response:
    an earlier, complete box is an intermediate result, not the final answer).
    """
    last = None
    for m in _BOX_RE.finditer(text):
        last = m
    if last is None:
        return None
    open_pos = last.end() - 1
    close = _closing_brace(text, open_pos)
    if close is None:
        return None
    return open_pos + 1, close


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` (nested braces handled), stripped.

    Returns ``None`` when there is no box or the last box is unclosed.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_boxed(text=...) expects a str, got {type(text).__name__}")
    span = boxed_span(text)
    if span is None:
        return None
    return text[span[0]:span[1]].strip()


def _gold_latex(gold: str) -> str:
    """The gold answer as a LaTeX string math-verify extracts: wrapped as ``$\\boxed{gold}$`` unless boxed."""
    g = gold.strip()
    if "\\boxed" in g or "\\fbox" in g:
        return g
    if len(g) >= 2 and g.startswith("$") and g.endswith("$"):
        g = g.strip("$").strip()
    return f"$\\boxed{{{g}}}$"


def math_verify_score(response: str, gold: str) -> float:
    """1.0 if the last boxed answer of ``response`` equals ``gold`` under math-verify, else 0.0.

    The gold is parsed as given when it already holds a ``\\boxed{}``, otherwise as ``$\\boxed{gold}$``.
    No boxed answer (or one longer than ``MAX_ANSWER_CHARS``) scores 0.0. When math-verify cannot
    parse either side, the two strings are compared after removing whitespace (so textual answers
    such as a multiple-choice letter still score). Outside the main thread math-verify's alarm-based
    timeouts are disabled (they would raise); the caller must then bound the time itself.
    """
    if not isinstance(response, str) or not isinstance(gold, str):
        raise TypeError("math_verify_score(response, gold) expects two str, got "
                        f"{type(response).__name__} and {type(gold).__name__}")
    pred = extract_boxed(response)
    if pred is None or not pred or len(pred) > MAX_ANSWER_CHARS:
        return 0.0
    from math_verify import parse, verify  # heavy (sympy): imported on first use, in the worker

    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(_gold_latex(gold), parsing_timeout=timeout)
    pred_parsed = parse(f"$\\boxed{{{pred}}}$", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return float(_squash(pred) == _squash(_strip_box(gold)))
    return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=timeout) else 0.0


def _strip_box(gold: str) -> str:
    inner = extract_boxed(gold)
    return inner if inner is not None else gold.strip().strip("$")


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def _warmup() -> None:
    """Import math-verify and run one comparison (its first call costs about 0.1 s more than later ones)."""
    math_verify_score("\\boxed{\\frac{1}{2}}", "0.5")


# Called by VerifierPool workers before they report ready (see trace_rl/rewards/pool.py).
math_verify_score.warmup = _warmup  # type: ignore[attr-defined]
