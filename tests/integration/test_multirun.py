"""Hydra multirun (``-m``): two real jobs in one process, each with its own run directory, cluster and
learning rate (HF engine and a single torch rank, to keep it short)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_multirun_sweeps_learning_rate(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "algorithm.lr=1e-4,3e-4", "trainer.total_steps=1", "data.prompts_per_step=4", "rollout.n=2",
            "rollout=hf", "rollout.max_new_tokens=32", "algorithm.filter_zero_variance=false", "learner=torch", "learner.num_ranks=1",
            "learner.micro_batch_size=8", "eval.before=false", "eval.after=false", "trainer.save_final=false",
            "logger.wandb=false", f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "trace_rl.train", *args], capture_output=True, text=True,
                       timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lrs = {}
    for job in ("0", "1"):
        d = sweep / job
        summary = json.loads((d / "summary.json").read_text())
        assert summary["steps"] == 1 and Path(summary["run_dir"]) == d.resolve()
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        lrs[job] = [m["actor/lr"] for m in metrics if "actor/lr" in m]
        assert f"summary: {d / 'summary.json'}" in r.stdout
    assert lrs["0"] == [pytest.approx(1e-4)] and lrs["1"] == [pytest.approx(3e-4)], lrs
