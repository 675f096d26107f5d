from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest

from trace_rl.config import GROUPS, Config, ConfigError, field_docs, help_text, to_config
from trace_rl.startup import validate
from trace_rl.train import CONF_DIR


def compose(overrides=()):
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="trace_rl_schema", node=Config)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hcompose(config_name="config", overrides=list(overrides))


def test_default_config_composes_and_validates():
    cfg = validate(to_config(compose()))
    assert cfg.algorithm.name == "grpo" and cfg.rollout.engine == "vllm" and cfg.learner.backend == "deepspeed"
    assert cfg.algorithm.clip_eps_low == 0.2 and cfg.algorithm.clip_eps_high == 0.28


@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo"])
def test_every_algorithm_file_validates(name):
    cfg = validate(to_config(compose([f"algorithm={name}"])))
    assert cfg.algorithm.name == name


def test_overrides_are_type_checked_by_the_schema():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    with pytest.raises((ValidationError, ConfigCompositionException)):
        compose(["algorithm.lr=fast"])
    with pytest.raises(ConfigCompositionException):
        compose(["algorithm.no_such_field=1"])


@pytest.mark.parametrize("overrides, field, fix", [
    (["learner.num_ranks=3"], "data.prompts_per_step", "multiple of 3"),
    (["algorithm.name=nope"], "algorithm.name", "python -m trace_rl.algo"),
    (["model.path=/does/not/exist"], "model.path", "Hugging Face checkpoint directory"),
    (["learner.zero_stage=4"], "learner.zero_stage", "1, 2, 3"),
    (["rollout.n=1"], "rollout.n", "rollout.n >= 2"),
    (["algorithm.clip_eps_high=1.5"], "algorithm.clip_eps_high", "0.28"),
    (["rollout.engine=sglang"], "rollout.engine", "vllm, hf"),
    (["learner.micro_batch_size=5"], "learner.micro_batch_size", "divisor"),
])
def test_validation_names_the_field_and_the_fix(overrides, field, fix):
    with pytest.raises(ConfigError) as e:
        validate(to_config(compose(overrides)))
    assert field in str(e.value) and fix in str(e.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        validate(to_config(compose(["learner.num_ranks=3", "algorithm.name=nope"])))
    assert "algorithm.name" in str(e.value) and "data.prompts_per_step" in str(e.value)


def test_every_field_is_documented():
    for group in GROUPS:
        cls = Config.__dataclass_fields__[group].default_factory
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{group}: fields without a docstring: {missing}"
    text = help_text()
    assert "algorithm.clip_eps_high=0.28" in text and "learner.zero_stage" in text


def test_bad_config_fails_before_anything_starts():
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "trace_rl.train", "learner.num_ranks=3", "logger.wandb=false"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "data.prompts_per_step" in r.stderr and "Fix:" in r.stderr
    assert "Ray" not in r.stderr and "vLLM" not in r.stderr  # no cluster, no engine
    assert time.time() - t0 < 60


def test_help_prints_the_documented_fields():
    r = subprocess.run([sys.executable, "-m", "trace_rl.train", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "rollout.max_new_tokens" in r.stdout and "Response length cap" in r.stdout
