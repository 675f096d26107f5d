"""Weight-sync config checks (trace_rl.sync.check_config), raised by validate() before any actor starts."""
from __future__ import annotations

import pytest

from trace_rl.config import Config, ConfigError, to_config
from trace_rl.startup import validate
from trace_rl.sync import check_config


def problems(**overrides) -> list[tuple[str, str, str]]:
    cfg = Config()
    for key, value in overrides.items():
        group, name = key.split("__")
        setattr(getattr(cfg, group), name, value)
    out: list[tuple[str, str, str]] = []
    check_config(cfg, lambda field, problem, fix: out.append((field, problem, fix)))
    return out


GPU = dict(learner__gpus_per_rank=1.0, rollout__gpus_per_engine=1.0)


@pytest.mark.parametrize("overrides", [
    {},
    dict(rollout__weight_sync="collective"),
    dict(rollout__weight_sync="collective", rollout__sync_backend="gloo", rollout__sync_bucket_mb=0.5),
    dict(rollout__weight_sync="collective", rollout__sync_backend="nccl", **GPU),
    dict(rollout__weight_sync="collective", rollout__sync_backend="gloo", cluster__placement="colocated", **GPU),
    dict(rollout__weight_sync="cuda_ipc", cluster__placement="colocated", **GPU),
])
def test_good_settings_pass(overrides):
    assert problems(**overrides) == []


@pytest.mark.parametrize("overrides, field, fix", [
    (dict(rollout__weight_sync="nccl"), "rollout.weight_sync", "object_store, collective, cuda_ipc"),
    (dict(rollout__sync_backend="mpi"), "rollout.sync_backend", "auto, gloo, nccl"),
    (dict(rollout__sync_bucket_mb=0.0), "rollout.sync_bucket_mb", "256"),
    (dict(rollout__sync_bucket_mb=float("nan")), "rollout.sync_bucket_mb", "256"),
    (dict(rollout__weight_sync="collective", rollout__sync_backend="nccl"), "rollout.sync_backend", "gloo"),
    (dict(rollout__weight_sync="collective", cluster__placement="colocated", **GPU), "rollout.sync_backend",
     "cuda_ipc"),
    (dict(rollout__weight_sync="cuda_ipc"), "rollout.weight_sync", "collective (gloo on CPU)"),
    (dict(rollout__weight_sync="cuda_ipc", **GPU), "rollout.weight_sync", "cluster.placement=colocated"),
])
def test_bad_settings_name_the_field_and_the_fix(overrides, field, fix):
    found = problems(**overrides)
    assert len(found) == 1, found
    assert found[0][0] == field and fix in found[0][2]


def test_validate_runs_the_weight_sync_checks():
    from tests.test_config import compose

    cfg = to_config(compose(["rollout.weight_sync=cuda_ipc", "rollout.sync_bucket_mb=-1"]))
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "rollout.weight_sync: cuda_ipc shares CUDA memory" in str(e.value)
    assert "rollout.sync_bucket_mb" in str(e.value)
