"""Every CPU weight-sync path, end to end on real services: DeepSpeed ZeRO-2 / ZeRO-3 ranks (2, over gloo)
train, the sync moves the weights, and a vLLM engine and an HF engine then score fixed sequences with the
learner's log-probs (1e-3). Before the sync the engines must disagree, so the comparison can fail.

Cost is kept down by sharing: one vLLM pool and one HF pool for the module, one learner group per ZeRO
stage; each test trains one more step so the engines are stale again before its sync.
"""
from __future__ import annotations

import pytest
import torch

from trace_rl.config import AlgorithmConfig, LearnerConfig, ModelConfig

pytestmark = pytest.mark.slow

PROMPTS = ["Tom has 3 apples", "and buys 5 more:", "3 + 5 =", "The answer is"]


@pytest.fixture(scope="module")
def pools(ray_cluster, tiny_random_model):
    from transformers import AutoTokenizer

    from trace_rl.rollout.pool import RolloutPool

    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    made = {}
    try:
        made["vllm"] = RolloutPool(tiny_random_model, engine="vllm", max_model_len=256, pad_token_id=tok.pad_token_id,
                                   gpu_memory_utilization=0.05)
        made["hf"] = RolloutPool(tiny_random_model, engine="hf", pad_token_id=tok.pad_token_id)
        yield made
    finally:
        for pool in made.values():
            pool.shutdown()


@pytest.fixture(scope="module")
def batch(pools, tiny_random_model):
    """Rollouts of the initial policy with GRPO advantages (every group has both outcomes)."""
    from transformers import AutoTokenizer

    from trace_rl.algo import MethodInputs, compute_method

    tok = AutoTokenizer.from_pretrained(tiny_random_model)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in PROMPTS]
    b = pools["hf"].generate(prompts, {"n": 4, "temperature": 1.0, "max_new_tokens": 16, "seed": 0}, version=0)
    torch.manual_seed(0)
    b.rewards = torch.randint(0, 2, (len(b),)).float()
    b.rewards[::4] = 1.0 - b.rewards[1::4]
    out = compute_method("grpo", MethodInputs(b.rewards, b.group_ids, b.response_mask), {"adv_estimator": "grpo"})
    b.advantages, b.channel_names, b.channel_weights = out.advantages, out.channel_names, out.channel_weights
    return b


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def learners(request, ray_cluster, tiny_random_model):
    from trace_rl.learner.group import LearnerGroup

    lc = LearnerConfig(backend="deepspeed", num_ranks=2, zero_stage=request.param, micro_batch_size=8,
                       threads_per_rank=1,
                       deepspeed_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    group = LearnerGroup(lc, AlgorithmConfig(lr=3e-3, grad_clip=0.0), ModelConfig(path=tiny_random_model),
                         tiny_random_model, seed=0)
    group.test_steps = 0
    yield group
    group.shutdown()


def _train_and_learner_logprobs(learners, batch) -> torch.Tensor:
    metrics = learners.train(batch, temperature=1.0, step=learners.test_steps)
    assert metrics["nonfinite"] == 0
    learners.test_steps += 1
    return learners.logprobs(batch, temperature=1.0)


def _worst(scores: list[list[float]], learner: torch.Tensor, mask: torch.Tensor) -> float:
    worst = 0.0
    for i, row in enumerate(scores):
        ref = learner[i, : int(mask[i].sum())].tolist()
        assert len(row) == len(ref)
        worst = max(worst, max(abs(a - b) for a, b in zip(row, ref)))
    return worst


@pytest.mark.parametrize("kind", ["object_store", "collective"])
def test_engine_logprobs_equal_learner_logprobs_after_sync(pools, batch, learners, kind):
    from trace_rl.sync import make_weight_sync

    lp = _train_and_learner_logprobs(learners, batch)
    seqs = [batch.input_ids()[i][batch.attention_mask()[i]].tolist() for i in range(len(batch))]
    starts = [int(batch.prompt_mask[i].sum()) for i in range(len(batch))]
    version = 100 + learners.test_steps
    syncs = {}
    try:
        for name, pool in pools.items():
            stale = _worst(pool.score(seqs, starts), lp, batch.response_mask)
            # small buckets: the tiny model travels in several buckets, its embedding alone in one
            syncs[name] = ws = make_weight_sync(kind, learners, pool, bucket_mb=0.05, backend="auto", timeout_s=300)
            stats = ws.sync(version=version)
            fresh = _worst(pool.score(seqs, starts), lp, batch.response_mask)
            assert stale > 0.01, f"{name}: the engine should be stale before the sync ({stale})"
            assert fresh < 1e-3, f"{name} engine vs learner after a {kind} sync: {fresh}"
            assert stats["bytes"] > 0 and stats["seconds"] > 0
            assert pool.versions() == [version]
            if kind == "collective":
                assert ws.backend == "gloo" and len(ws.buckets) >= 3
                assert stats["bytes"] == sum(b.nbytes for b in ws.buckets)
        if kind == "collective":
            # the driver keeps one group for the run: after more training, a second sync through it is exact too
            lp = _train_and_learner_logprobs(learners, batch)
            for name, pool in pools.items():
                assert _worst(pool.score(seqs, starts), lp, batch.response_mask) > 0.01
                syncs[name].sync(version=version + 1)
                assert _worst(pool.score(seqs, starts), lp, batch.response_mask) < 1e-3, name
                assert syncs[name].syncs == 2
    finally:
        for ws in syncs.values():
            ws.close()
