"""The pipelined driver end to end (real Ray, HF engine, DeepSpeed ranks, the stage actors):

- at ``trainer.max_staleness=0`` it reproduces, bit for bit, the metrics of the lockstep loop it replaced
  (the trace in tests/fixtures/lockstep_trace.json was recorded with that loop; see
  scripts/record_lockstep_trace.py);
- at ``max_staleness=1`` it trains a token-routed method with rollouts one version ahead, logs the
  staleness and importance-sampling statistics, and the driver process fetches only small summaries.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def train(tmp_path: Path, *overrides: str) -> Path:
    """Run ``python -m trace_rl.train`` with ``overrides`` (no evaluation, no final save, no W&B) in a fresh
    local cluster; returns its run directory once it exited 0."""
    run_dir = tmp_path / "run"
    args = [*overrides, "eval.before=false", "eval.after=false", "trainer.save_final=false", "logger.wandb=false",
            f"trainer.run_dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "trace_rl.train", *args], capture_output=True, text=True,
                       timeout=1200, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return run_dir


def test_lockstep_pipeline_reproduces_the_recorded_trace():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "record_lockstep_trace.py"), "--check",
                        str(ROOT / "tests" / "fixtures" / "lockstep_trace.json"), "trainer.max_staleness=0"],
                       capture_output=True, text=True, timeout=1800, cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "identical" in r.stdout


def test_async_trace_run_bounds_staleness_and_keeps_batches_off_the_driver(tmp_path):
    run_dir = train(tmp_path, "algorithm=trace", "rollout=hf", "trainer.max_staleness=1", "trainer.total_steps=4",
                    "data.prompts_per_step=8", "rollout.n=4", "rollout.max_new_tokens=48",
                    "learner.micro_batch_size=8", "algorithm.lr=1e-4", "teacher.resync_every=2")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "timing_s/step" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    # staleness: the first step is on-policy, later ones learn from rollouts one version behind, never more
    assert steps[0]["async/staleness_max"] == 0
    assert all(m["async/staleness_max"] <= 1 for m in steps)
    assert any(m["async/staleness_max"] == 1 and m["async/offpolicy_row_frac"] > 0 for m in steps[1:])
    learned = [m for m in steps if "actor/loss" in m]
    assert learned and all("actor/async/is_weight_mean" in m for m in learned)
    assert all(0 < m["actor/async/is_weight_mean"] <= 2.0 for m in learned)
    assert all(m["buffer/dropped_batches"] == 0 for m in steps)
    # token routing still happens: annotations and teacher scores reach the learner
    assert any(m.get("route/fkl:key_token_frac", 0) > 0 or m.get("route/rkl:error_token_frac", 0) > 0 for m in steps)
    # the driver fetched summaries only: far less than one step's routed batch (tokens, masks, teacher top-k)
    for m in steps:
        assert m["driver/fetched_bytes"] < 64_000, m["driver/fetched_bytes"]
        assert m["driver/fetched_bytes"] * 10 < m["pipeline/batch_bytes"], (m["driver/fetched_bytes"],
                                                                             m["pipeline/batch_bytes"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["max_staleness"] == 1 and summary["steps"] == 4 and summary["train_loop_s"] > 0
    assert summary["teacher"]["teacher/syncs"] >= 1  # re-synced at step 2 (teacher.resync_every=2)
    assert set(summary["pipeline"]["busy_s"]) >= {"rollout", "reward", "annotate", "teacher", "learn"}


def test_colocated_run_hands_the_accelerators_over_in_the_peers_order(tmp_path):
    """cluster.placement=colocated (on CPU the engines' and ranks' hooks are counted no-ops, the order is the
    driver's): the engines sleep before the learners are built; each step the engines generate, sleep, the
    learners reload and train, the engines take back their weights only for the sync, and only after it the
    learners offload and the engines' KV cache wakes."""
    run_dir = train(tmp_path, "rollout=hf", "cluster.placement=colocated", "rollout.num_engines=2",
                    "learner.num_ranks=2", "trainer.total_steps=2", "data.prompts_per_step=4", "rollout.n=4",
                    "rollout.max_new_tokens=24", "learner.micro_batch_size=8", "algorithm.filter_zero_variance=false")
    events = json.loads((run_dir / "summary.json").read_text())["colocation_events"]
    step = ["sleep", "reload", "wake_weights", "offload", "wake_kv_cache"]
    assert events == ["sleep", "offload", "wake"] + step * 2, events
