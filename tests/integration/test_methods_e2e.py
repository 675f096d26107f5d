"""The token-routed methods end to end: real local Ray cluster, rollout engine, teacher service, oracle
annotator and learner ranks on the project's tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SMALL = ["data.prompts_per_step=8", "rollout.n=4", "rollout.max_new_tokens=96", "learner.micro_batch_size=8",
         "logger.wandb=false", "trainer.save_final=false"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "trace_rl.train", *args], capture_output=True, text=True,
                          timeout=1500, env=env, cwd=cwd)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trace_kl_channels_are_active_during_warmup_and_absent_after_it(tmp_path):
    """lambda = 0.5 at steps 0-1, 0 from step 2: the teacher and the annotator are called exactly twice,
    the KL channels carry loss while lambda > 0 and are gone afterwards."""
    run_dir = tmp_path / "trace"
    r = run(["algorithm=trace", *SMALL, "trainer.total_steps=4", "algorithm.trace_lambda.hold_steps=1",
             "algorithm.trace_lambda.decay_steps=1", "data.eval_size=8", "eval.k=1", "algorithm.lr=1e-4",
             f"trainer.run_dir={run_dir}"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [m for m in metrics(run_dir) if "train/reward_mean" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps[:2]:
        assert m["trace/lambda"] == 0.5 and "timing_s/teacher" in m and "timing_s/annotate" in m
        kl = [k for k in m if k.startswith("actor/kl/fkl:key") or k.startswith("actor/kl/rkl:error")]
        assert kl, sorted(m)
        assert m["route/fkl:key_token_frac"] + m["route/rkl:error_token_frac"] > 0
        assert 0 < m["exposure/teacher_token_frac"] <= 0.25 + 1e-6  # the span cap
    assert steps[0]["teacher/calls"] == 1 and steps[1]["teacher/calls"] == 2
    for m in steps[2:]:
        assert m["trace/lambda"] == 0.0 and "timing_s/teacher" not in m and "timing_s/annotate" not in m
        assert not [k for k in m if "fkl" in k and k.startswith("actor/") or "rkl" in k and k.startswith("actor/")]
        assert m["route/pg_token_frac"] == 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["teacher"]["teacher/calls"] == 2
    assert summary["exposure"]["exposure/lambda_sum"] == pytest.approx(1.0)
    assert summary["exposure"]["exposure/privileged_grad_cum"] > 0


def test_every_registered_method_runs_as_algorithm_group(tmp_path):
    """One Hydra multirun over the other methods (HF engines, one torch rank): each finishes a step and
    reports its own channels."""
    sweep = tmp_path / "sweep"
    methods = ["self_opd", "scope", "tip", "tempo", "div_weighted", "dapo", "dr_grpo"]
    r = run(["-m", f"algorithm={','.join(methods)}", *SMALL, "trainer.total_steps=1", "rollout=hf",
             "learner=torch", "learner.num_ranks=1", "eval.before=false", "eval.after=false",
             "algorithm.filter_zero_variance=false", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    expect = {"self_opd": "fkl:opd", "scope": "mle:correct", "tip": ":tip", "tempo": "pg", "div_weighted": "pg",
              "dapo": "pg", "dr_grpo": "pg"}
    for i, name in enumerate(methods):
        d = sweep / str(i)
        summary = json.loads((d / "summary.json").read_text())
        assert summary["algorithm"] == name and summary["steps"] == 1
        (m,) = [m for m in metrics(d) if "train/reward_mean" in m]
        routes = [k for k in m if k.startswith("route/") and k.endswith("_token_frac")]
        assert any(expect[name] in k for k in routes), (name, routes)
        if name in ("self_opd", "scope", "tip", "div_weighted"):
            assert summary["teacher"]["teacher/calls"] == 1 and "timing_s/teacher" in m
        else:
            assert summary["teacher"] is None
        assert "actor/loss" in m or "actor/pg_loss" in m, sorted(m)
