"""scripts/gpu_check.sh, the prepared GPU check, on CPU (``--cpu-smoke``): it builds the 151,936-token models
(tied and untied), runs the short TRACE job end to end and writes the figures the GPU run will record; without
a GPU and without --cpu-smoke it refuses instead of measuring something else."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_without_a_gpu_the_check_refuses(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PY": sys.executable})
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_cpu_smoke_runs_the_trace_job_and_records_its_figures(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200, env={**env, "PY": sys.executable})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    for name, tied in (("tied", True), ("untied", False)):
        config = json.loads((Path(res["models"][name]) / "config.json").read_text())
        assert config["vocab_size"] == 151_936 and config["tie_word_embeddings"] is tied
    run = res["trace_run"]
    assert run["returncode"] == 0 and run["steps"] == 5
    figures = run["median_over_steps_2_on"]
    for key in ("timing_s/rollout", "timing_s/teacher", "timing_s/learn", "timing_s/sync", "perf/rollout_tokens_per_s"):
        assert figures[key] > 0, key
    assert res["gpu_tests"] == {"skipped": "cpu-smoke"}
