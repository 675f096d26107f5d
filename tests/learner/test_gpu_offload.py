"""The learner's optimizer and colocated offload (GPU parts skip without CUDA): DeepSpeed ranks on GPUs use
DeepSpeed's FusedAdam, the only optimizer whose states ZeRO-3 ``offload_states`` can move (it asserts it), and
a rank trains on after an offload / reload round trip exactly as one that never left the GPU."""
from __future__ import annotations

import pytest
import torch

from .learner_helpers import make_batch, make_tiny_model
from trace_rl.config import AlgorithmConfig, LearnerConfig, ModelConfig
from trace_rl.learner.worker import optimizer_kind


def test_optimizer_kind_follows_backend_and_device():
    assert optimizer_kind("deepspeed", on_gpu=True) == "fused_adam"
    assert optimizer_kind("deepspeed", on_gpu=False) == "torch_adamw"
    assert optimizer_kind("torch", on_gpu=True) == "torch_adamw"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_offload_reload_round_trip_trains_like_a_resident_rank(ray_cluster, tmp_path, stage):
    import ray

    from trace_rl.learner.group import LearnerGroup

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model_dir = make_tiny_model(tmp_path / "m")
    batch = make_batch(B=8, seed=3)
    states = []
    for offload in (False, True):
        lc = LearnerConfig(backend="deepspeed", num_ranks=1, zero_stage=stage, micro_batch_size=4, gpus_per_rank=1)
        with LearnerGroup(lc, AlgorithmConfig(lr=1e-3, kl_coef=0.0, grad_clip=0.0), ModelConfig(), model_dir,
                          seed=0) as group:
            rank = group.actors[0]
            group.train(batch, temperature=1.0, step=0)
            if offload:
                assert ray.get(rank.offload_states.remote())["acted"]  # FusedAdam: DeepSpeed accepts it
                assert ray.get(rank.reload_states.remote())["acted"]
            group.train(batch, temperature=1.0, step=1)
            states.append(dict(ray.get(group.state_dict_ref())))
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=0, atol=1e-6, msg=name)
