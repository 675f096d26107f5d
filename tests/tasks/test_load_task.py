"""Tests of trace_rl/tasks/__init__.py: load_task_problems dispatch and instruction_for."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest

from trace_rl.tasks import DEFAULT_INSTRUCTION, instruction_for, load_task_problems
from trace_rl.tasks.arith import ARITH_INSTRUCTION, generate

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "math_small.jsonl"


def test_arith_dispatch():
    got = load_task_problems("arith", "test", n=30, seed=2)
    assert [p.question for p in got] == [p.question for p in generate("test", 30, seed=2)]
    # "arith:<split>" (the config's form) picks the split named there
    ood = load_task_problems("arith:ood", "test", n=5)
    assert all(p.source == "arith:ood" for p in ood)
    assert len(load_task_problems("arith", "ood")) == 200  # default size
    with pytest.raises(ValueError, match="split"):
        load_task_problems("arith", "validation", n=3)


def test_file_and_directory_dispatch(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        all_rows = load_task_problems(str(FIXTURE), "train")
        assert len(all_rows) == 14
        assert len(load_task_problems(str(FIXTURE), "train", n=3)) == 3
        shutil.copy(FIXTURE, tmp_path / "test.jsonl")
        from_dir = load_task_problems(str(tmp_path), "test", n=5)
    assert [p.question for p in from_dir] == [p.question for p in all_rows[:5]]
    assert from_dir[0].source == "test"
    with pytest.raises(ValueError, match="train.jsonl"):
        load_task_problems(str(tmp_path), "train")
    with pytest.raises(ValueError, match="neither a built-in task"):
        load_task_problems("gsm8k", "train")
    with pytest.raises(ValueError, match="n="):
        load_task_problems("arith", "train", n=-2)


def test_instruction_for():
    assert instruction_for("arith") == ARITH_INSTRUCTION
    assert instruction_for("arith:test") == ARITH_INSTRUCTION
    assert instruction_for(str(FIXTURE)) == DEFAULT_INSTRUCTION
