"""The privileged prompt builder: what the teacher sees, and the firewall (no span text, ever)."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from trace_rl.annotate import get_annotator
from trace_rl.tasks.arith import ARITH_INSTRUCTION, generate
from trace_rl.teacher import PrivilegedPromptBuilder


@pytest.fixture(scope="module")
def tok(tiny_random_model):
    return AutoTokenizer.from_pretrained(tiny_random_model)


def test_fields_are_shown_in_order_and_student_prompt_is_a_prefix_of_the_question_part(tok):
    p = generate("test", 1, seed=3)[0]
    b = PrivilegedPromptBuilder(fields=("answer", "solution"), instruction=ARITH_INSTRUCTION)
    content = b.messages(p)[0]["content"]
    assert content.startswith(f"{p.question}\n{ARITH_INSTRUCTION}")
    assert content.index(p.answer, len(p.question)) < content.index(p.solution)
    text = b.render(p, tok)
    assert p.solution in text and text.endswith(tok.apply_chat_template([{"role": "user", "content": "x"}],
                                                                       add_generation_prompt=True,
                                                                       tokenize=False).split("x")[-1])


def test_unknown_field_is_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match="teacher.privileged.*unknown fields.*solution"):
        PrivilegedPromptBuilder(fields=("solution", "spans"))


def test_firewall_span_text_never_reaches_the_teacher():
    """Annotate wrong and right responses with the oracle; whatever label comes out, the teacher
    prompt contains no span text beyond what the privileged fields themselves contain."""
    problems = generate("test", 30, seed=5)
    annotate = get_annotator("oracle")
    b = PrivilegedPromptBuilder(fields=("hint", "label"), instruction=ARITH_INSTRUCTION)
    checked = 0
    for p in problems:
        lines = p.solution.splitlines()
        wrong = "\n".join(lines[:-2] + ["Step 9: 1 + 1 = 3", lines[-1]])
        for response, correct in ((p.solution, True), (wrong, False)):
            ann = annotate(p, response, correct)
            content = b.messages(p, label=ann.label, response=response)[0]["content"]
            for s, e in ann.key_spans + ann.error_spans:
                span_text = response[s:e]
                assert span_text not in content.replace(p.question, ""), (span_text, content)
                checked += 1
    assert checked >= 40


@pytest.mark.parametrize("label", ["Step 2: 14 + 7 = 21 is wrong because", "multi\nline"])
def test_a_label_that_looks_like_span_text_is_refused(label):
    p = generate("test", 1, seed=1)[0]
    with pytest.raises(ValueError, match="span text must never reach the teacher"):
        PrivilegedPromptBuilder(fields=("label",)).messages(p, label=label)


def test_a_label_copied_from_the_response_is_refused():
    p = generate("test", 1, seed=1)[0]
    with pytest.raises(ValueError, match="substring of the response"):
        PrivilegedPromptBuilder(fields=("label",)).messages(p, label="carry the tens", response="so we carry the tens digit")
