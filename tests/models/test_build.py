from __future__ import annotations

import dataclasses

import pytest

from trace_rl.tasks.arith import generate

from trace_rl.models.build import TinyRecipe, arith_prompt, sft_rows, tokenizer_corpus
from trace_rl.models.tokenizer import IM_END, IM_START, build_tokenizer


def test_recipe_digest_per_stage():
    r = TinyRecipe()
    assert r.digest("sft") == TinyRecipe().digest("sft")              # stable
    more_steps = dataclasses.replace(r, sft_steps=r.sft_steps + 1)
    assert more_steps.digest("base") == r.digest("base")              # SFT settings do not touch base
    assert more_steps.digest("sft") != r.digest("sft")
    wider = dataclasses.replace(r, spec=dataclasses.replace(r.spec, hidden_size=192, num_heads=6))
    assert wider.digest("base") != r.digest("base") and wider.digest("sft") != r.digest("sft")


def test_digest_follows_code_version(monkeypatch):
    import trace_rl.models.build as build

    before = TinyRecipe().digest("base")
    monkeypatch.setattr(build, "CODE_VERSION", build.CODE_VERSION + 1)
    assert TinyRecipe().digest("base") != before


def test_digest_follows_task_source(monkeypatch):
    import trace_rl.models.build as build

    before = TinyRecipe().digest("base")
    monkeypatch.setattr(build, "_task_source_digest", lambda: "edited-task")
    assert TinyRecipe().digest("base") != before


def test_sft_rows_match_rollout_prompts(small_tokenizer):
    """SFT prompts are exactly what RL rollouts render: the question as the user turn, arith's instruction."""
    from trace_rl.tasks.arith import ARITH_INSTRUCTION, generate
    from trace_rl.tasks.base import render_prompt

    problems = generate("train", 5, seed=3)
    rows = sft_rows(problems, small_tokenizer)
    for p, row in zip(problems, rows):
        assert row["prompt"] == render_prompt(p, small_tokenizer, instruction=ARITH_INSTRUCTION)
        user = f"{p.question}\n{ARITH_INSTRUCTION}" if ARITH_INSTRUCTION else p.question
        assert row["prompt"] == f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"
        assert row["response"] == p.solution and row["response"].endswith(f"\\boxed{{{p.answer}}}.")
        assert arith_prompt(p, small_tokenizer) == row["prompt"]


def test_tokenizer_corpus_covers_prompts_and_solutions():
    from trace_rl.tasks.arith import generate

    problems = generate("train", 50, seed=0)
    corpus = tokenizer_corpus(problems)
    assert len(corpus) == 100
    assert corpus[0].startswith(f"{IM_START}user\n{problems[0].question}") and corpus[1] == problems[0].solution
    tok = build_tokenizer(corpus, vocab_size=400)
    # The task's words became whole tokens: a solution line costs few tokens per character.
    line = problems[0].solution.split("\n")[-1]            # "The answer is \boxed{N}."
    assert len(tok(line, add_special_tokens=False)["input_ids"]) <= len(line) // 2


def test_sft_habits_change_only_their_fraction_of_targets(small_tokenizer):
    problems = generate("train", 400, seed=0)
    clean = sft_rows(problems, small_tokenizer)
    unboxed = sft_rows(problems, small_tokenizer, "unboxed", 0.6, seed=0)
    shortcut = sft_rows(problems, small_tokenizer, "shortcut", 0.6, seed=0)
    assert [r["prompt"] for r in unboxed] == [r["prompt"] for r in clean]
    flawed = [i for i, (a, b) in enumerate(zip(clean, unboxed)) if a["response"] != b["response"]]
    assert 0.5 < len(flawed) / len(problems) < 0.7
    for i in flawed:
        p = problems[i]
        # the working is intact; only the box around the final answer is gone
        assert unboxed[i]["response"] == p.solution.replace(f"\\boxed{{{p.answer}}}", p.answer)
        assert "\\boxed" not in unboxed[i]["response"]
        assert shortcut[i]["response"] == f"The answer is \\boxed{{{p.answer}}}."
    # same seed -> the same rows carry the habit, whatever the habit
    assert flawed == [i for i, (a, b) in enumerate(zip(clean, shortcut)) if a["response"] != b["response"]]
    with pytest.raises(ValueError, match="sft_habit"):
        sft_rows(problems, small_tokenizer, "typos", 0.5)
