"""One short end-to-end run of the real job (vLLM engine, DeepSpeed ZeRO-2 ranks, verifier pool, local
Ray cluster on 127.0.0.1) on the project's tiny model, then a resume of the same run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ARGS = [
    "data.prompts_per_step=8", "rollout.n=4", "rollout.max_new_tokens=96", "data.eval_size=16", "eval.k=2",
    "learner.micro_batch_size=8", "algorithm.lr=1e-4", "logger.wandb_mode=offline",
]


def run_job(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "trace_rl.train", *ARGS, f"trainer.run_dir={run_dir}", *extra],
                          capture_output=True, text=True, timeout=1200, env=env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_job_end_to_end_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    r = run_job(run_dir, "trainer.total_steps=3")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"summary: {run_dir / 'summary.json'}" in r.stdout

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("eval_before", "eval_after"):
        ev = summary[key]
        assert 0.0 <= ev["id_accuracy"] <= 1.0 and 0.0 <= ev["ood_accuracy"] <= 1.0
        assert ev["test"]["n_problems"] == 16 and ev["test"]["k"] == 2
    assert summary["steps"] == 3 and summary["cluster"]["started_local"]
    # the tiny model is SFT warm-started: it solves some held-out problems before RL
    assert summary["eval_before"]["id_accuracy"] > 0.0

    steps = [m for m in read_metrics(run_dir) if "timing_s/step" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        for stage in ("rollout", "reward", "advantage", "learn", "sync"):
            assert m[f"timing_s/{stage}"] >= 0.0
        assert m["perf/throughput_tokens_per_s"] > 0 and m["train/response_length"] > 0
    assert any("actor/loss" in m for m in steps), "at least one step should have learned"
    # per-step console line with the stage timings
    assert "step    3/3 | reward" in r.stdout and "rollout=" in r.stdout

    # checkpoint + exported HF model
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_3"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(summary["final_model"])
    AutoTokenizer.from_pretrained(summary["final_model"])
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline files expected"

    # resume: continues at step 4 with the saved data position, not from scratch
    r2 = run_job(run_dir, "trainer.total_steps=5", "trainer.resume=true", "eval.before=false", "eval.after=false")
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "resumed from" in r2.stdout and "at step 3" in r2.stdout
    steps = [m["step"] for m in read_metrics(run_dir) if "timing_s/step" in m]
    assert steps == [1, 2, 3, 4, 5]
    s2 = json.loads((run_dir / "summary.json").read_text())
    assert s2["steps"] == 5
    assert s2["eval_before"] == summary["eval_before"]  # carried over from the first part
