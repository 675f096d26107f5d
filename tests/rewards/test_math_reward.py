"""Tests of trace_rl/rewards/math_reward.py: boxed extraction and math-verify scoring."""
from __future__ import annotations

import threading

import pytest

from trace_rl.rewards.math_reward import MAX_ANSWER_CHARS, boxed_span, extract_boxed, math_verify_score


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{ 42 }", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("x = \\boxed{\\sqrt{\\frac{a^{2}}{b_{1}}}} done", "\\sqrt{\\frac{a^{2}}{b_{1}}}"),
    ("first \\boxed{1} then \\boxed{2} finally \\boxed{3}", "3"),
    ("\\fbox{7}", "7"),
    ("\\boxed{1} and \\fbox{9}", "9"),
    ("\\boxed {5}", "5"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),          # escaped braces do not close the box
    ("\\boxed{\\left\\{ x \\right\\}}", "\\left\\{ x \\right\\}"),
    ("no box here", None),
    ("", None),
    ("\\boxed{3} and then \\boxed{4", None),        # the last box is unclosed (truncated)
    ("\\boxed{}", ""),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_boxed_span_slices_the_content():
    text = "a \\boxed{ {x} } b"
    s, e = boxed_span(text)
    assert text[s:e] == " {x} "
    with pytest.raises(TypeError, match="text"):
        extract_boxed(None)


@pytest.mark.parametrize("response, gold, score", [
    ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("so \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{ 42 }", "42", 1.0),
    ("\\boxed{42}", "43", 0.0),
    ("the answer is 42", "42", 0.0),                     # no box
    ("\\boxed{42} wait, no: \\boxed{41}", "42", 0.0),   # the last box counts
    ("\\boxed{41} wait, no: \\boxed{42}", "42", 1.0),
    ("\\boxed{3}", "$\\boxed{3}$", 1.0),                 # gold already boxed
    ("\\boxed{3}", "$3$", 1.0),                          # gold in $...$
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", 1.0),
    ("\\boxed{}", "0", 0.0),
    ("\\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}", "1" * (MAX_ANSWER_CHARS + 1), 0.0),
])
def test_math_verify_score(response, gold, score):
    assert math_verify_score(response, gold) == score


def test_math_verify_score_in_a_thread():
    """math-verify's alarm-based timeout raises off the main thread; the scorer disables it there."""
    out = {}

    def run():
        out["right"] = math_verify_score("\\boxed{\\frac{3}{4}}", "0.75")
        out["wrong"] = math_verify_score("\\boxed{\\frac{3}{5}}", "0.75")

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert out == {"right": 1.0, "wrong": 0.0}


def test_math_verify_score_rejects_non_strings():
    with pytest.raises(TypeError, match="response, gold"):
        math_verify_score("\\boxed{1}", 1)
