"""Annotators (oracle, random, none) and response token offsets."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from trace_rl.annotate import get_annotator, response_token_offsets
from trace_rl.tasks.arith import check_steps, generate
from trace_rl.tasks.base import Problem


def test_oracle_marks_key_steps_of_correct_and_first_error_of_incorrect():
    annotate = get_annotator("oracle")
    for p in generate("test", 20, seed=2):
        ann = annotate(p, p.solution, True)
        assert ann.key_spans == check_steps(p, p.solution).key_step_spans and not ann.error_spans
        lines = p.solution.splitlines()
        first = lines[0]
        head, _, rhs = first.rpartition("= ")
        bad = "\n".join([f"{head}= {int(rhs.rstrip('.')) + 1}."] + lines[1:])
        ann = annotate(p, bad, False)
        assert ann.error_spans == [(0, len(f"{head}= {int(rhs.rstrip('.')) + 1}."))], (bad, ann)
        assert ann.label == "arithmetic" and not ann.key_spans


def test_oracle_skips_problems_it_cannot_check():
    p = Problem(uid="m1", question="What is 1+1?", answer="2", solution="1+1=2, \\boxed{2}")
    ann = get_annotator("oracle")(p, "\\boxed{2}", True)
    assert ann.skipped == "unsupported_task" and not ann.key_spans


def test_random_annotator_has_the_requested_coverage_and_is_seeded():
    p = generate("test", 1, seed=0)[0]
    a = get_annotator("random", coverage=0.25, seed=1)
    r = p.solution
    ann = a(p, r, True)
    (s, e), = ann.key_spans
    assert e - s == round(0.25 * len(r)) and 0 <= s < e <= len(r)
    assert a(p, r, True).key_spans == ann.key_spans
    assert a(p, r, False).error_spans == ann.key_spans and not a(p, r, False).key_spans
    with pytest.raises(ValueError, match="random_coverage"):
        get_annotator("random", coverage=0)


def test_unknown_annotator_names_the_known_ones():
    with pytest.raises(ValueError, match="annotator.kind='x'.*oracle"):
        get_annotator("x")


def test_token_offsets_tile_the_decoded_text(tiny_random_model):
    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    text = "Step 1: 12 + 7 = 19.\nThe answer is \\boxed{19}."
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    decoded, offsets = response_token_offsets(tok, ids)
    assert decoded == text and len(offsets) == len(ids)
    assert offsets[0][0] == 0 and offsets[-2][1] == len(text) and offsets[-1] == (len(text), len(text))
    for (s0, e0), (s1, e1) in zip(offsets, offsets[1:]):
        assert e0 == s1 and s0 <= e0
    # each token's span is exactly its own decoded text
    for t, (s, e) in enumerate(offsets[:-1]):
        assert decoded[s:e] == tok.decode([ids[t]])
