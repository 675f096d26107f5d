"""Benchmark loaders (trace_rl/tasks/benchmarks.py): one fixture file per common format, checked against
hand-written expectations; the multiple-choice order and letter check."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trace_rl.tasks.benchmarks import (CHOICE_INSTRUCTION, CHOICE_SCORE_FN, MATH_SCORE_FN, choice_letter,
                                       choice_letter_score, load_benchmark, parse_spec)

BENCH = Path(__file__).resolve().parent.parent / "fixtures" / "benchmarks"


@pytest.mark.parametrize("file, fmt, uids, answers", [
    ("math500.jsonl", "math", ["test/prealgebra/1.json", "test/prealgebra/2.json", "test/algebra/3.json"],
     ["12", "\\frac{3}{4}", "3"]),
    ("aime24.jsonl", "math", ["2024-I-1", "2024-I-2"], ["32", "77"]),                 # Problem / Answer (int)
    ("aime25.jsonl", "math", ["1", "2"], ["99", "25"]),                                # question / answer, no id
    ("amc23.jsonl", "math", ["0", "1"], ["27", "0.75"]),                               # float answers
    ("olympiadbench.jsonl", "olympiad", ["2001", "2002"], ["\\frac{5}{6}", "-1, 1"]),  # final_answer lists
])
def test_math_formats_load_as_expected(file, fmt, uids, answers):
    b = load_benchmark(str(BENCH / file))
    assert b.name == Path(file).stem and b.format == fmt and b.score_fn == MATH_SCORE_FN
    assert [p.uid for p in b.problems] == [f"{b.name}/{u}" for u in uids]
    assert [p.answer for p in b.problems] == answers
    assert b.stats.skipped == 0 and b.stats.loaded == len(answers)


def test_math500_keeps_question_solution_and_subject():
    p = load_benchmark(str(BENCH / "math500.jsonl")).problems[1]
    assert p.question == "Simplify $\\frac{6}{8}$."
    assert p.solution == "Divide by 2: $\\boxed{\\frac{3}{4}}$."
    assert p.meta["subject"] == "Prealgebra" and p.meta["level"] == 2


def test_aime24_capitalised_columns():
    p = load_benchmark(str(BENCH / "aime24.jsonl")).problems[0]
    assert p.question == "Find $2^{5}$." and p.solution == "$2^5 = 32$."


def test_olympiadbench_joins_solutions():
    p = load_benchmark(str(BENCH / "olympiadbench.jsonl")).problems[0]
    assert p.solution == "Common denominator 6.\n\nSo $\\frac{5}{6}$." and p.meta["answer_type"] == "Numerical"


def test_minerva_answers_come_from_the_last_box_and_bad_rows_are_counted():
    with pytest.warns(UserWarning, match="skipped bad rows"):
        b = load_benchmark(str(BENCH / "minerva.jsonl"))
    assert [p.answer for p in b.problems] == ["30", "4"]
    assert b.stats.answers_from_solution == 2 and b.stats.skipped == 1 and b.stats.reasons == {"no answer": 1}


def test_gpqa_becomes_seeded_lettered_multiple_choice():
    b = load_benchmark(str(BENCH / "gpqa_diamond.jsonl"), seed=0)
    assert b.format == "multiple_choice" and b.score_fn == CHOICE_SCORE_FN
    rows = [json.loads(line) for line in (BENCH / "gpqa_diamond.jsonl").read_text().splitlines()]
    for p, row in zip(b.problems, rows):
        options = p.meta["options"]
        assert sorted(options) == sorted([row["Correct Answer"]] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)])
        assert options["ABCD".index(p.answer)] == row["Correct Answer"]   # the letter points at the right option
        assert p.question == "\n".join([row["Question"], ""] + [f"{L}) {o}" for L, o in zip("ABCD", options)]
                                       + ["", CHOICE_INSTRUCTION])
        assert p.uid == f"gpqa_diamond/{row['Record ID']}" and p.solution == row["Explanation"]
    # the order depends on (seed, id) only: the same with a limit, different with another seed
    assert load_benchmark(str(BENCH / "gpqa_diamond.jsonl"), seed=0, limit=2).problems[1].meta == b.problems[1].meta
    orders = {tuple(tuple(p.meta["options"]) for p in load_benchmark(str(BENCH / "gpqa_diamond.jsonl"),
                                                                    seed=s).problems) for s in range(6)}
    assert len(orders) > 1
    letters = {p.answer for s in range(20) for p in load_benchmark(str(BENCH / "gpqa_diamond.jsonl"), seed=s).problems}
    assert letters == set("ABCD")  # the correct option is not always in one place


def test_parquet_and_names(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (BENCH / "aime24.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    b = load_benchmark(str(tmp_path / "test.parquet"))
    assert [p.answer for p in b.problems] == ["32", "77"] and b.name == tmp_path.name  # "test" -> the folder
    assert load_benchmark(f"aime={tmp_path / 'test.parquet'}").name == "aime"
    assert parse_spec("/data/aime24.jsonl") == ("aime24", "/data/aime24.jsonl")
    assert parse_spec("math=/data/m.jsonl") == parse_spec("math:/data/m.jsonl") == ("math", "/data/m.jsonl")
    assert parse_spec("rel/dir/test.jsonl") == ("dir", "rel/dir/test.jsonl")
    with pytest.raises(ValueError, match="not a file"):
        load_benchmark(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "no question"}) + "\n")
    with pytest.raises(ValueError, match="no usable rows"):
        load_benchmark(str(tmp_path / "empty.jsonl"))


@pytest.mark.parametrize("response, letter", [
    ("so \\boxed{B}", "B"), ("\\boxed{(C)}", "C"), ("\\boxed{\\text{D}}", "D"), ("\\boxed{\\textbf{(A)}}", "A"),
    ("\\boxed{B) neutron}", "B"), ("\\boxed{Option C}", "C"), ("\\boxed{b}", "B"), ("The answer is (C).", "C"),
    ("Answer: D", "D"), ("\\boxed{Bob}", None), ("\\boxed{46}", None), ("\\boxed{E}", None), ("no answer", None),
    ("first \\boxed{A}, finally \\boxed{C}", "C"),
])
def test_choice_letter(response, letter):
    assert choice_letter(response) == letter
    assert choice_letter_score(response, "C") == float(letter == "C")


def test_math_answers_of_the_formats_score_with_math_verify():
    from trace_rl.rewards.math_reward import math_verify_score

    assert math_verify_score("\\boxed{27}", "27") == 1.0                      # AMC's 27.0
    assert math_verify_score("\\boxed{1, -1}", "-1, 1") == 1.0                # OlympiadBench multi-answer
    assert math_verify_score("\\boxed{3/4}", "\\frac{3}{4}") == 1.0
    assert math_verify_score("\\boxed{5}", "\\frac{5}{6}") == 0.0


def test_choice_score_fn_runs_in_verifier_workers():
    from trace_rl.rewards.pool import VerifierPool

    with VerifierPool(1, timeout_s=30.0, score_fn=CHOICE_SCORE_FN) as pool:
        scores, stats = pool.score([("so \\boxed{B}", "B"), ("\\boxed{(C)}", "B"), ("no box", "A")])
    assert scores == [1.0, 0.0, 0.0] and stats["errors"] == 0 and stats["timeouts"] == 0
