"""GPU weight-sync paths (skipped without CUDA): cuda_ipc with the engine on the learner's GPU, and the
collective over NCCL with the engine on its own GPU. Same check as the CPU paths: after a sync the engine's
log-probs equal the learner's (1e-3), and before it they differ."""
from __future__ import annotations

import pytest
import torch

from trace_rl.config import AlgorithmConfig, LearnerConfig, ModelConfig

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _check_sync(tiny_random_model, kind: str, gpus: float, backend: str = "auto"):
    from transformers import AutoTokenizer

    from trace_rl.algo import MethodInputs, compute_method
    from trace_rl.learner.group import LearnerGroup
    from trace_rl.rollout.pool import RolloutPool
    from trace_rl.sync import make_weight_sync

    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ["Tom has 3 apples", "3 + 5 ="]]
    pool = RolloutPool(tiny_random_model, engine="hf", gpus_per_engine=gpus, pad_token_id=tok.pad_token_id)
    lc = LearnerConfig(backend="deepspeed", num_ranks=1, zero_stage=3, micro_batch_size=8, gpus_per_rank=gpus)
    group = LearnerGroup(lc, AlgorithmConfig(lr=3e-3, grad_clip=0.0), ModelConfig(path=tiny_random_model),
                         tiny_random_model, seed=0)
    try:
        batch = pool.generate(prompts, {"n": 4, "temperature": 1.0, "max_new_tokens": 16}, version=0)
        batch.rewards = torch.tensor([1.0, 0.0] * 4)
        out = compute_method("grpo", MethodInputs(batch.rewards, batch.group_ids, batch.response_mask),
                             {"adv_estimator": "grpo"})
        batch.advantages, batch.channel_names, batch.channel_weights = (
            out.advantages, out.channel_names, out.channel_weights)
        group.train(batch, temperature=1.0, step=0)
        lp = group.logprobs(batch, temperature=1.0)
        seqs = [batch.input_ids()[i][batch.attention_mask()[i]].tolist() for i in range(len(batch))]
        starts = [int(batch.prompt_mask[i].sum()) for i in range(len(batch))]

        def worst(scores):
            return max(max(abs(a - b) for a, b in zip(row, lp[i, : len(row)].tolist()))
                       for i, row in enumerate(scores))

        stale = worst(pool.score(seqs, starts))
        with make_weight_sync(kind, group, pool, bucket_mb=0.05, backend=backend) as ws:
            ws.sync(version=1)
        assert stale > 0.01
        assert worst(pool.score(seqs, starts)) < 1e-3
    finally:
        group.shutdown()
        pool.shutdown()


def test_cuda_ipc_sync_is_exact(ray_cluster, tiny_random_model):
    _check_sync(tiny_random_model, "cuda_ipc", gpus=0.5)  # learner and engine share the GPU


def test_nccl_collective_sync_is_exact(ray_cluster, tiny_random_model):
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL cannot join two ranks on one GPU: needs 2 GPUs")
    _check_sync(tiny_random_model, "collective", gpus=1.0, backend="nccl")
