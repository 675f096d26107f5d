"""Numbered segments of a response, and the annotator-reply parser on a corpus of odd replies."""
from __future__ import annotations

import random

import pytest

from trace_rl.annotate.parser import MAX_LABEL_CHARS, parse_reply, sanitize_label
from trace_rl.annotate.segments import render_segments, segment_spans, split_segments
from trace_rl.tasks.base import Problem
from trace_rl.teacher.prompts import PrivilegedPromptBuilder

RESPONSE = ("Step 1: 19 - 3 = 16.\nStep 2: 16 - 4 = 12.\n\n  Step 3: 12 - 7 = 5.\n"
            "Step 4: 5 * 3 = 15.\nThe answer is \\boxed{15}.")
N = 5  # segments of RESPONSE


# ----------------------------------------------------------------------------------------- segments
def test_segments_are_the_stripped_non_empty_lines_with_exact_spans():
    segs = split_segments(RESPONSE)
    assert [s.index for s in segs] == [1, 2, 3, 4, 5]
    assert [s.text for s in segs] == ["Step 1: 19 - 3 = 16.", "Step 2: 16 - 4 = 12.", "Step 3: 12 - 7 = 5.",
                                      "Step 4: 5 * 3 = 15.", "The answer is \\boxed{15}."]
    for s in segs:
        assert RESPONSE[s.start:s.end] == s.text
    assert render_segments(segs).splitlines()[2] == "[3] Step 3: 12 - 7 = 5."


def test_long_lines_split_at_sentence_ends_but_not_inside_numbers():
    text = "First we add 2.5 and 3. Then we double it! Is it 11? Yes. " * 3
    segs = split_segments(text, sentence_split_chars=40)
    assert all(text[s.start:s.end] == s.text for s in segs)
    assert segs[0].text == "First we add 2.5 and 3." and segs[1].text == "Then we double it!"
    assert len(segs) == 12
    assert len(split_segments(text, sentence_split_chars=10_000)) == 1


def test_many_segments_are_merged_into_at_most_max_segments_runs():
    text = "\n".join(f"line {i}" for i in range(100))
    segs = split_segments(text, max_segments=8)
    assert len(segs) == 8 and segs[0].start == 0 and segs[-1].end == len(text)
    assert all(text[s.start:s.end] == s.text for s in segs)
    assert all(a.end < b.start for a, b in zip(segs, segs[1:]))  # ordered, disjoint
    with pytest.raises(ValueError, match="max_segments"):
        split_segments(text, max_segments=0)


def test_blank_response_has_no_segments_and_rendering_is_bounded():
    assert split_segments("") == [] and split_segments(" \n\n\t ") == []
    seg = split_segments("x" * 1000, sentence_split_chars=5000)
    line = render_segments(seg, max_render_chars=50)
    assert line.startswith("[1] xxx") and " ... " in line and len(line) < 70


def test_segment_ids_map_to_spans_joining_consecutive_segments():
    segs = split_segments(RESPONSE)
    assert segment_spans(segs, [2, 3, 5]) == [(segs[1].start, segs[2].end), segs[4].span]
    assert segment_spans(segs, [3, 3, 99]) == [segs[2].span]
    assert segment_spans(segs, []) == []


# ----------------------------------------------------------------------------------------- corpus
# (reply, correct, key, error, label, failure, unknown_ids)
CORPUS = [
    # well-formed
    ('{"key": [2, 3], "error": [], "label": "subtraction"}', True, [2, 3], [], "subtraction", None, 0),
    ('{"key": [], "error": [4], "label": "multiplication"}', False, [], [4], "multiplication", None, 0),
    # fences and prose
    ('```json\n{"key": [1], "label": "carry"}\n```', True, [1], [], "carry", None, 0),
    ('Here is my answer:\n```\n{"error": [3]}\n```\nHope it helps!', False, [], [3], None, None, 0),
    ('The first error is in segment 3. {"error": [3], "label": "arithmetic"} That is all.', False, [], [3],
     "arithmetic", None, 0),
    # the example restated, then the answer: the last object wins
    ('Format: {"key": [segment ids]}. Answer: {"key": [4]}', True, [4], [], None, None, 0),
    # ranges and strings
    ('{"key": "2-4"}', True, [2, 3, 4], [], None, None, 0),
    ('{"key": ["1", "3..4"]}', True, [1, 3, 4], [], None, None, 0),
    ('{"error": "step 2 to step 3"}', False, [], [2, 3], None, None, 0),
    ('{"key": [[2, 4]]}', True, [2, 3, 4], [], None, None, 0),
    ('{"key": "1, 3 and 5"}', True, [1, 3, 5], [], None, None, 0),
    ('{"key": [2.0, "[3]"]}', True, [2, 3], [], None, None, 0),
    # unknown / junk ids: dropped and counted
    ('{"key": [0, 2, 6, 99, -1]}', True, [2], [], None, None, 4),
    ('{"key": [true, 2, 2.5, "two", null]}', True, [2], [], None, None, 3),
    ('{"key": "1-1000"}', True, [], [], None, None, 1),
    # near-JSON
    ("{'key': [1, 2], 'label': 'carry'}", True, [1, 2], [], "carry", None, 0),
    ('{key: [1, 2,], label: "borrow",}', True, [1, 2], [], "borrow", None, 0),
    ('{"key": [3], "error": None, "label": None}', True, [3], [], None, None, 0),
    ('{"Key_Steps": [1], "Type": "Key Step"}', True, [1], [], "key step", None, 0),
    ('{"first error": 2}', False, [], [2], None, None, 0),
    # cut off by max_tokens: ids kept, label dropped
    ('{"key": [1, 2], "label": "carr', True, [1, 2], [], None, None, 0),
    # a bare list is the field asked for
    ('[3, 4]', False, [], [3, 4], None, None, 0),
    ('{"segments": [5]}', True, [5], [], None, None, 0),
    # no JSON, but field lines
    ('Key steps: 2, 4\nLabel: carry', True, [2, 4], [], "carry", None, 0),
    ('- error = [1]', False, [], [1], None, None, 0),
    # reasoning blocks
    ('<think>maybe {"key": [1]}?</think>\n{"key": [2]}', True, [2], [], None, None, 0),
    ('hmm, segment 1 or 2...</think>{"error": [2]}', False, [], [2], None, None, 0),
    ('<think>I will answer {"error": [5]}', False, [], [5], None, None, 0),
    # labels the firewall would refuse are dropped, the ids kept
    ('{"key": [1], "label": "step 3: 12 - 7 = 5"}', True, [1], [], None, None, 0),
    ('{"key": [1], "label": "a very long label that goes on and on and on"}', True, [1], [], None, None, 0),
    ('{"key": [1], "label": "the answer is"}', True, [1], [], None, None, 0),  # copied from the response
    ('{"key": [1], "label": ["carry"]}', True, [1], [], None, None, 0),
    ('{"key": [1], "label": "  Carry.  "}', True, [1], [], "carry", None, 0),
    # valid but nothing marked: not a failure
    ('{"key": [], "error": []}', True, [], [], None, None, 0),
    # failures
    ("", True, [], [], None, "empty", 0),
    ("   \n ", False, [], [], None, "empty", 0),
    ("<think>just thinking</think>", True, [], [], None, "empty", 0),
    ("assistantassistantassistant", True, [], [], None, "no_json", 0),
    ("Step 1: 19 - 3 = 16. The answer is \\boxed{15}.", True, [], [], None, "no_json", 0),
    ('{"verdict": "fine", "score": 9}', True, [], [], None, "no_fields", 0),
    ('{"key": [1,, 2}}}', True, [], [], None, "bad_json", 0),
    ("{{{{", True, [], [], None, "bad_json", 0),
    ('{"label": "carry"', True, [], [], None, "no_fields", 0),
]


@pytest.mark.parametrize("reply,correct,key,error,label,failure,unknown", CORPUS,
                         ids=[f"{i}:{c[0][:30]!r}" for i, c in enumerate(CORPUS)])
def test_reply_corpus(reply, correct, key, error, label, failure, unknown):
    parsed = parse_reply(reply, N, correct=correct, response=RESPONSE)
    assert (parsed.key, parsed.error, parsed.label, parsed.failure, parsed.unknown_ids) == \
        (key, error, label, failure, unknown), parsed
    if failure is not None:
        assert parsed.ids_for(correct) == [] and parsed.label is None


def test_corpus_is_large_and_mostly_odd():
    assert len(CORPUS) >= 25
    assert sum(1 for c in CORPUS if c[5] is not None) >= 8


def test_dropped_labels_are_flagged():
    assert parse_reply('{"key": [1], "label": "x=3"}', N, correct=True).label_dropped
    assert not parse_reply('{"key": [1], "label": "carry"}', N, correct=True).label_dropped
    assert not parse_reply('{"key": [1]}', N, correct=True).label_dropped


def _firewall_accepts(label: str, response: str) -> bool:
    p = Problem(uid="u", question="q", answer="1", solution="s")
    try:
        PrivilegedPromptBuilder(fields=("label",)).messages(p, label=label, response=response)
        return True
    except ValueError:
        return False


def test_every_label_the_parser_keeps_passes_the_teacher_firewall():
    rng = random.Random(0)
    letters, odd = "abcstepXYZ _-", ".:;'\"0123456789{}[]\n\t=+*/é"

    def fuzz() -> str:  # mostly letters, sometimes a character the firewall refuses
        return "".join(rng.choice(odd if rng.random() < 0.03 else letters) for _ in range(rng.randint(0, 50)))
    labels = [c[0] for c in CORPUS] + [fuzz() for _ in range(3000)]
    labels += ["Step 2", "carry", "addition with carry", "x" * MAX_LABEL_CHARS, "x" * (MAX_LABEL_CHARS + 1),
               "key step", "Step 1: 19", "the answer is", "answer is", "STEP"]
    kept = 0
    for raw in labels:
        label = sanitize_label(raw, RESPONSE)
        if label is not None:
            kept += 1
            assert _firewall_accepts(label, RESPONSE), (raw, label)
            assert label.lower() not in RESPONSE.lower() or len(label) < 8
    assert 300 < kept < len(labels) - 300  # neither refusing everything nor keeping everything


def test_random_garbage_never_raises():
    rng = random.Random(1)
    pieces = ['{', '}', '[', ']', '"key"', '"error"', ':', ',', '1', '2-3', '"label"', '"carry"', "'", "```json",
              "```", "<think>", "</think>", "null", "true", " ", "\n", "key:", "error =", "🙂", "\\", "-", "999"]
    for _ in range(3000):
        reply = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        parsed = parse_reply(reply, N, correct=rng.random() < 0.5, response=RESPONSE)
        assert set(parsed.key) <= set(range(1, N + 1)) and set(parsed.error) <= set(range(1, N + 1))
        assert parsed.failure in (None, "empty", "no_json", "bad_json", "no_fields")
    assert parse_reply(None, N, correct=True).failure == "empty"  # type: ignore[arg-type]
