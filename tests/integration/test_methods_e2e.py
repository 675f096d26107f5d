"""The token-routed methods end to end: real local Ray cluster, rollout engine, teacher service, annotators
and learner ranks on the project's tiny model. TRACE runs once with the ``api`` annotator against a crafted
OpenAI-compatible server on 127.0.0.1 (tests/annotate/conftest.py) and once, in the multirun of every
method, with ``annotator=self`` (the policy annotating itself through the rollout pool)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.annotate.conftest import CraftedServer

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


KEY, KEY_ENV = "sk-e2e-s3cret-Wv7", "TRACE_RL_E2E_ANNOTATOR_KEY"


def test_trace_kl_channels_are_active_during_warmup_and_absent_after_it(tmp_path, monkeypatch):
    """lambda = 0.5 at steps 0-1, 0 from step 2: the teacher and the annotator are called exactly twice,
    the KL channels carry loss while lambda > 0 and are gone afterwards. The annotator is an LLM behind
    HTTP (``annotator=api``): its replies become the spans, its cache fills, its key is stored nowhere."""
    monkeypatch.setenv(KEY_ENV, KEY)
    server = CraftedServer()
    run_dir = tmp_path / "trace"
    try:
        r = run(["algorithm=trace", "annotator=api", f"annotator.base_url={server.base_url}",
                 "annotator.model=crafted", f"annotator.api_key_env={KEY_ENV}", *SMALL, "trainer.total_steps=4",
                 "rollout=hf",  # the default job (tests/integration/test_train_e2e.py) covers the vLLM engine
                 "algorithm.trace_lambda.hold_steps=1", "algorithm.trace_lambda.decay_steps=1", "data.eval_size=8",
                 "eval.k=1", "algorithm.lr=1e-4", f"trainer.run_dir={run_dir}"], tmp_path)
    finally:
        server.close()
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
    # the api annotator: 2 steps x 32 rollouts + the key-token probe (the 8 eval problems' solutions);
    # identical requests go once; every request is in the cache; the key is in no file and no output
    assert steps[1]["annotate/items"] == 2 * 32 + 8
    distinct = {json.dumps(q["body"], sort_keys=True) for q in server.requests}
    assert len(server.requests) == steps[1]["annotate/requests"] == len(distinct) > 0
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert steps[1]["annotate/annotated"] > 0 and steps[1]["annotate/parse_failures"] == 0
    assert len(list((run_dir / "annotator_cache").rglob("*.json"))) == len(distinct)
    for f in run_dir.rglob("*"):
        if f.is_file() and f.stat().st_size < 5_000_000:
            assert KEY not in f.read_text(errors="ignore"), f
    assert KEY not in r.stdout + r.stderr
    assert "exposure/key_logprob_lift" in json.loads((run_dir / "summary.json").read_text())["exposure"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["teacher"]["teacher/calls"] == 2
    assert summary["exposure"]["exposure/lambda_sum"] == pytest.approx(1.0)
    assert summary["exposure"]["exposure/privileged_grad_cum"] > 0


def test_every_registered_method_runs_as_algorithm_group(tmp_path):
    """One Hydra multirun over the other methods (HF engines, one torch rank): the jobs run one after the
    other in one process, each in its own run directory (sweep/<i>) with its own cluster, finish a step and
    report their own channels. TRACE here annotates with the policy itself (``annotator=self``); weights reach
    the engine through the torch.distributed (gloo) weight sync, in 1 MiB buckets."""
    sweep = tmp_path / "sweep"
    # (dapo and dr_grpo are GRPO with other clip / advantage settings: their configs are dry-run by
    # tests/test_config.py and their formulas tested in tests/algo; the default job runs GRPO itself)
    methods = ["self_opd", "scope", "tip", "tempo", "div_weighted", "trace"]
    r = run(["-m", f"algorithm={','.join(methods)}", "annotator=self", "annotator.max_new_tokens=48", *SMALL, "trainer.total_steps=1", "rollout=hf",
             "learner=torch", "learner.num_ranks=1", "eval.before=false", "eval.after=false",
             "algorithm.filter_zero_variance=false", "rollout.weight_sync=collective", "rollout.sync_bucket_mb=1",
             f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    expect = {"self_opd": "fkl:opd", "scope": "mle:correct", "tip": ":tip", "tempo": "pg", "div_weighted": "pg",
              "trace": "pg"}
    for i, name in enumerate(methods):
        d = sweep / str(i)
        summary = json.loads((d / "summary.json").read_text())
        assert summary["algorithm"] == name and summary["steps"] == 1
        assert Path(summary["run_dir"]) == d.resolve() and f"summary: {d / 'summary.json'}" in r.stdout
        (m,) = [m for m in metrics(d) if "train/reward_mean" in m]
        routes = [k for k in m if k.startswith("route/") and k.endswith("_token_frac")]
        assert any(expect[name] in k for k in routes), (name, routes)
        if name == "trace":  # self-annotation: every rollout asked once, every reply parsed or counted
            assert m["annotate/items"] == 32 and "timing_s/annotate" in m
            outcomes = sum(m.get(f"annotate/{k}", 0) for k in (
                "annotated", "parse_failures", "nothing_marked", "unknown_segments", "prompt_too_long",
                "request_failures", "skipped_empty_response"))
            assert outcomes == 32, {k: v for k, v in m.items() if k.startswith("annotate/")}
            assert summary["teacher"]["teacher/calls"] <= (1 if m.get("annotate/annotated") else 0)
        elif name in ("self_opd", "scope", "tip", "div_weighted"):
            assert summary["teacher"]["teacher/calls"] == 1 and "timing_s/teacher" in m
        else:
            assert summary["teacher"] is None
        assert "actor/loss" in m or "actor/pg_loss" in m, sorted(m)
        assert m["sync/buckets"] >= 2 and m["sync/bytes"] > 0, sorted(k for k in m if k.startswith("sync/"))
