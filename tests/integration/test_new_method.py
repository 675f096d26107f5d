"""A new method is one file in trace_rl/algo/methods/ plus one yaml in conf/algorithm/: this test adds a toy
method exactly that way (and removes it afterwards) and checks that the registry lists it with its documented
parameter, the configuration knows the parameter (help, overrides, type checks, the method's own value
check) and a real training job runs it, with nothing else edited."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

METHOD = '''"""A toy method for tests/integration/test_new_method.py: GRPO with its advantage scaled by a constant."""
from __future__ import annotations

from dataclasses import dataclass

from .base import MethodInputs, MethodOutput, param_float, register_method
from .grpo import GRPOParams, grpo_seq_advantages, outcome_advantage_output


@dataclass
class {cls}(GRPOParams):
    {param}: float = 0.5
    """Factor applied to the GRPO advantage (the toy's only knob); must be > 0."""


@register_method("{name}", params={cls})
def {name}_method(inputs: MethodInputs, params: dict) -> MethodOutput:
    """Toy: GRPO with the advantage scaled by a constant."""
    scale = param_float(params, "{param}", lo=1e-9)
    out = outcome_advantage_output(inputs, grpo_seq_advantages(inputs, params) * scale)
    out.metrics["{name}/scale"] = scale
    return out
'''

YAML = """# the toy method of tests/integration/test_new_method.py
name: {name}
clip_eps_low: 0.2
clip_eps_high: 0.28
{param}: 0.25
"""


@pytest.fixture()
def toy_method():
    name = f"toy_{uuid.uuid4().hex[:8]}"
    param = f"{name}_scale"
    files = [ROOT / "trace_rl" / "algo" / "methods" / f"{name}.py", ROOT / "conf" / "algorithm" / f"{name}.yaml"]
    files[0].write_text(METHOD.format(name=name, param=param, cls=f"Toy{name[4:]}Params"))
    files[1].write_text(YAML.format(name=name, param=param))
    try:
        yield name, param
    finally:
        for f in files:
            f.unlink(missing_ok=True)


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_a_new_method_is_one_file_and_one_yaml(toy_method, tmp_path):
    name, param = toy_method
    listed = run("-m", "trace_rl.algo")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert name in listed.stdout and f"{param}=0.5" in listed.stdout
    helped = run("-m", "trace_rl.train", "--help")
    assert f"algorithm.{param}=0.5" in helped.stdout and "Factor applied to the GRPO advantage" in helped.stdout
    composed = run("-m", "trace_rl.train", f"algorithm={name}", "--cfg", "job")
    assert composed.returncode == 0 and f"{param}: 0.25" in composed.stdout
    # a wrong type fails in OmegaConf, a wrong value in the method's own check: both before anything starts
    bad_type = run("-m", "trace_rl.train", f"algorithm={name}", f"algorithm.{param}=many")
    assert bad_type.returncode != 0 and param in bad_type.stdout + bad_type.stderr
    bad_value = run("-m", "trace_rl.train", f"algorithm={name}", f"algorithm.{param}=-1")
    assert bad_value.returncode != 0 and f"{param} must be a finite number" in bad_value.stdout + bad_value.stderr
    # and a real job trains with it
    run_dir = tmp_path / "run"
    job = run("-m", "trace_rl.train", f"algorithm={name}", "rollout=hf", "learner.num_ranks=1",
              "learner.micro_batch_size=8", "data.prompts_per_step=8", "rollout.n=4", "rollout.max_new_tokens=32",
              "trainer.total_steps=2", "eval.before=false", "eval.after=false", "trainer.save_final=false",
              "logger.wandb=false", f"trainer.run_dir={run_dir}")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m[f"{name}/scale"] for m in steps if "timing_s/step" in m] == [0.25, 0.25]
    assert json.loads((run_dir / "summary.json").read_text())["algorithm"] == name
