"""Tests of trace_rl/tasks/base.py: Problem and prompt rendering with a chat template."""
from __future__ import annotations

import pytest

from trace_rl.tasks.base import DEFAULT_INSTRUCTION, Problem, build_messages, render_prompt


def _problem(**kw):
    base = dict(uid="u1", question="What is 2 + 3?", answer="5", solution="2 + 3 = 5, so \\boxed{5}.")
    base.update(kw)
    return Problem(**base)


def test_privileged_holds_exactly_the_privileged_fields():
    p = _problem(hint="addition")
    assert p.privileged() == {"answer": "5", "solution": "2 + 3 = 5, so \\boxed{5}.", "hint": "addition"}
    q = _problem(solution=None)
    assert q.privileged() == {"answer": "5"}
    # the question is never part of the privileged context (the teacher gets it through the prompt)
    assert "question" not in p.privileged()


def test_render_prompt_chatml_exact(chat_tokenizer):
    p = _problem()
    text = render_prompt(p, chat_tokenizer)
    assert text == ("<|im_start|>user\nWhat is 2 + 3?\n" + DEFAULT_INSTRUCTION + "<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # encodes and decodes back to the same string (special tokens are single ids)
    ids = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chat_tokenizer.decode(ids) == text
    assert ids[0] == chat_tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_render_prompt_without_instruction_and_with_system(chat_tokenizer):
    p = _problem()
    assert render_prompt(p, chat_tokenizer, instruction="") == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    text = render_prompt(p, chat_tokenizer, instruction="Box it.", system_prompt="Be brief.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?\nBox it.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert build_messages(p, instruction="") == [{"role": "user", "content": "What is 2 + 3?"}]


def test_render_prompt_needs_a_chat_template(make_chat_tokenizer):
    tok = make_chat_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt(_problem(), tok)
