"""Tests of trace_rl/tasks/math_data.py: loading local JSONL / JSON / Parquet math files."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from trace_rl.tasks.base import render_prompt
from trace_rl.tasks.math_data import load_problems

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "math_small.jsonl"


def _load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_problems(path, **kw)


def test_fixture_rows_and_stats():
    with pytest.warns(UserWarning, match=r"skipped 6") as rec:
        problems, stats = load_problems(FIXTURE)
    assert "line 13" in str(rec[0].message)  # the warning names the bad lines
    # count the fixture by hand: non-blank lines, and the six deliberately bad ones
    lines = [ln for ln in FIXTURE.read_text().splitlines() if ln.strip()]
    assert stats.rows == len(lines) == 20
    assert (stats.loaded, stats.skipped) == (14, 6) and len(problems) == 14
    assert stats.reasons == {"not a JSON object": 1, "no question": 2, "no answer": 2, "unparsable JSON": 1}
    assert [n for n, _ in stats.examples] == [13, 14, 15, 16, 17]  # first five, 1-based file lines
    assert stats.answers_from_solution == 3
    by_q = {p.question: p for p in problems}
    assert by_q["What is $2 + 3$?"].answer == "5"
    assert by_q["How many sides does a hexagon have?"].answer == "6"             # final_answer
    assert by_q["Solve for $x$: $2x = 10$."].answer == "5"                       # prompt + ground_truth
    assert by_q["What is $7 \\times 8$?"].hint == "multiplication"               # gt + hint
    assert by_q["Find the remainder when $17$ is divided by $5$."].answer == "2"  # from the solution's box
    assert by_q["Simplify $\\sqrt{50}$."].answer == "5\\sqrt{2}"                  # from 'reference'
    assert by_q["Simplify $\\sqrt{50}$."].solution.startswith("$\\sqrt{50}")
    assert by_q["What is $6 \\cdot 7$?"].answer == "42"                          # int answer
    assert by_q["What is half of $3$?"].answer == "1.5"                          # float answer
    verl = by_q["What is $9 - 4$?"]                                              # chat-message prompt
    assert verl.answer == "5" and verl.meta == {"data_source": "verl_style"}
    assert by_q["What is the set of roots of $x^2 = 1$?"].answer == "\\{-1, 1\\}"  # boxed answer unboxed
    assert by_q["Evaluate $2^5$."].answer == "32"                                # empty answer -> solution
    frac = by_q["Compute $\\frac{1}{2} + \\frac{1}{4}$."]
    assert frac.meta == {"type": "Prealgebra", "level": "Level 1"} and frac.solution.endswith("$.")
    uids = [p.uid for p in problems]
    assert len(set(uids)) == len(uids)
    assert "math_small/p1" in uids and "math_small/p1#1" in uids and "math_small/pow" in uids
    assert all(p.source == "math_small" for p in problems)


def test_explicit_keys_limit_and_source(tmp_path):
    path = tmp_path / "custom.jsonl"
    rows = [{"q": f"What is {i} + 1?", "data": {"final": str(i + 1)}, "worked": f"so \\boxed{{{i + 1}}}"}
            for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    problems, stats = load_problems(path, question_key="q", answer_key="data.final", solution_key="worked",
                                    limit=4, source="mine")
    assert [p.question for p in problems] == [f"What is {i} + 1?" for i in range(4)]
    assert [p.answer for p in problems] == ["1", "2", "3", "4"]
    assert problems[2].solution == "so \\boxed{3}"
    assert stats.rows == 4 and stats.loaded == 4 and stats.skipped == 0
    assert all(p.source == "mine" and p.uid.startswith("mine/") for p in problems)
    # without the explicit keys nothing is recognised
    with pytest.raises(ValueError, match="no usable rows"):
        _load(path)


def test_json_array_file(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"problem": "1+1?", "answer": "2"}, "junk", {"question": "2+2?", "gt": 4}]))
    problems, stats = _load(path)
    assert [(p.question, p.answer) for p in problems] == [("1+1?", "2"), ("2+2?", "4")]
    assert stats.skipped == 1 and stats.examples == [(2, "not a JSON object (str)")]


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    table = pa.table({
        "prompt": [[{"role": "user", "content": "What is 3 * 4?"}], [{"role": "user", "content": "What is 5 - 2?"}],
                   [{"role": "user", "content": "No answer here."}]],
        "reward_model": [{"ground_truth": "12", "style": "rule"}, {"ground_truth": "3", "style": "rule"},
                         {"ground_truth": None, "style": "rule"}],
        "data_source": ["toy", "toy", "toy"],
        "extra_info": [{"index": 0}, {"index": 1}, {"index": 2}],
    })
    pq.write_table(table, path)
    with pytest.warns(UserWarning, match="no answer"):
        problems, stats = load_problems(path)
    assert [(p.question, p.answer) for p in problems] == [("What is 3 * 4?", "12"), ("What is 5 - 2?", "3")]
    assert (stats.rows, stats.loaded, stats.skipped) == (3, 2, 1)
    assert stats.examples[0][0] == 3
    assert problems[0].meta == {"data_source": "toy"}  # nested, non-scalar columns stay out of meta
    assert [p.uid for p in problems] == ["train/1", "train/2"]


def test_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl")
    csv = tmp_path / "data.csv"
    csv.write_text("problem,answer\n1+1,2\n")
    with pytest.raises(ValueError, match=r"data\.csv.*extension"):
        load_problems(csv)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x"}\nnot json\n[1]\n')
    with pytest.raises(ValueError, match=r"no usable rows in .*bad\.jsonl"):
        load_problems(bad)
    with pytest.raises(ValueError, match="limit"):
        load_problems(FIXTURE, limit=0)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="corrupt.parquet"):
        load_problems(corrupt)


def test_loaded_problem_renders_with_chat_template(chat_tokenizer):
    problems, _ = _load(FIXTURE)
    p = next(p for p in problems if p.question == "What is $2 + 3$?")
    text = render_prompt(p, chat_tokenizer)
    assert text.startswith("<|im_start|>user\nWhat is $2 + 3$?\nPlease reason step by step")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chat_tokenizer.decode(ids) == text
