"""trace_rl/learner/worker.py: schedule, DeepSpeed config, the shm-op switch, and a single in-process
torch rank (skipped steps, logprobs, checkpoints). The multi-rank paths are in test_group.py."""
from __future__ import annotations

import math

import pytest
import torch

from trace_rl.batch import Batch
from trace_rl.config import AlgorithmConfig, LearnerConfig, ModelConfig
from trace_rl.learner.worker import LearnerWorker, deepspeed_config, learning_rate, skip_cpu_shm_comm_build

from .learner_helpers import Reference, make_batch, make_tiny_model, max_abs_diff, naive_logprobs

T = 0.7


def test_learning_rate_warmup_constant_and_cosine():
    warm = AlgorithmConfig(lr=1.0, warmup_steps=4, lr_schedule="constant")
    assert [learning_rate(warm, k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = AlgorithmConfig(lr=2.0, warmup_steps=2, lr_schedule="cosine")
    assert learning_rate(cos, 0, 12) == 1.0
    assert learning_rate(cos, 2, 12) == pytest.approx(2.0)  # decay starts after warm-up
    assert learning_rate(cos, 7, 12) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert learning_rate(cos, 12, 12) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(cos, 50, 12) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    with pytest.raises(ValueError, match="total_steps"):
        learning_rate(cos, 3, None)


def test_deepspeed_config_owns_accumulation_and_merges_overrides():
    lc = LearnerConfig(zero_stage=3, micro_batch_size=4,
                       deepspeed_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    cfg = deepspeed_config(lc, AlgorithmConfig(grad_clip=0.5), ModelConfig(dtype="bfloat16"))
    assert cfg["managed_gradient_accumulation"] is False and cfg["gradient_accumulation_steps"] == 1
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": False, "stage3_param_persistence_threshold": 0}
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["train_micro_batch_size_per_gpu"] == 4


def test_shm_comm_op_is_not_built_on_cpu():
    """init_distributed builds DeepSpeed's shm op (36-115 s) unless it is marked incompatible."""
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    assert skip_cpu_shm_comm_build() is True
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert build_shm_op() is None  # returns at once instead of compiling


# ------------------------------------------------------------------------------------ one torch rank
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_worker"))


def _worker(model_dir, **algo) -> LearnerWorker:
    w = LearnerWorker(LearnerConfig(backend="torch", num_ranks=1, micro_batch_size=3, logprob_chunk_size=4,
                                    threads_per_rank=1),
                      AlgorithmConfig(**{"lr": 1e-3, **algo}), ModelConfig(), model_dir)
    w.setup()
    return w


def _params(w: LearnerWorker) -> dict[str, torch.Tensor]:
    return w.gather_state_dict()


def test_single_rank_step_matches_reference_and_logprobs_match_full_logits(model_dir):
    algo = dict(kl_coef=0.05, entropy_coef=0.01, old_logprobs="behaviour", grad_clip=1.0)
    w = _worker(model_dir, **algo)
    batch = make_batch(B=7, seed=6)  # micro-batches of 3, 3, 1
    metrics = w.train_step(batch, temperature=T, step=0)  # no counts: a single rank computes them
    ref = Reference(model_dir, AlgorithmConfig(lr=1e-3, **algo))
    loss, norm = ref.update(batch, T)
    assert metrics["loss"] == pytest.approx(loss, abs=1e-5)
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert max_abs_diff(_params(w), {n: p.detach() for n, p in ref.model.named_parameters()}) < 1e-5
    got = w.compute_logprobs(batch, temperature=T)
    ent = w.compute_logprobs(batch, temperature=T, entropy=True)
    with torch.no_grad():
        for i, (lp, h) in enumerate(naive_logprobs(ref.model, batch, T)):
            assert torch.allclose(got[i, :len(lp)], lp, atol=2e-5)
            assert torch.allclose(ent[i, :len(h)], h, atol=2e-5)
            assert bool((ent[i, len(h):] == 0).all())


def test_nonfinite_advantage_skips_the_update_and_zeroes_the_gradients(model_dir):
    w = _worker(model_dir)
    batch = make_batch(B=6, seed=2)
    before = _params(w)
    adv = batch.advantages.clone()
    adv[2, 0] = float("inf")
    metrics = w.train_step(Batch(**{**batch.to_dict(), "advantages": adv}), temperature=T, step=0)
    assert metrics["nonfinite"] == 1 and metrics["updates"] == 0
    assert max_abs_diff(_params(w), before) == 0.0
    assert all(p.grad is None for p in w.policy.parameters())
    assert w.train_step(batch, temperature=T, step=0)["nonfinite"] == 0
    assert max_abs_diff(_params(w), before) > 1e-5


def test_torch_checkpoint_round_trip_gives_the_identical_next_step(model_dir, tmp_path):
    w = _worker(model_dir, weight_decay=0.1)
    b1, b2 = make_batch(B=6, seed=3), make_batch(B=6, seed=4)
    w.train_step(b1, temperature=T, step=0)
    w.save_checkpoint(str(tmp_path), {"step": 1})
    w.train_step(b2, temperature=T, step=1)
    want = _params(w)
    fresh = _worker(model_dir, weight_decay=0.1)
    assert fresh.load_checkpoint(str(tmp_path)) == {"step": 1}
    fresh.train_step(b2, temperature=T, step=1)
    assert max_abs_diff(_params(fresh), want) == 0.0
    with pytest.raises(FileNotFoundError, match="torch_learner.pt"):
        fresh.load_checkpoint(str(tmp_path / "nowhere"))


def test_bad_arguments_are_named(model_dir):
    w = _worker(model_dir)
    batch = make_batch(B=6, seed=2)
    with pytest.raises(ValueError, match="temperature"):
        w.train_step(batch, temperature=0, step=0)
    w2 = _worker(model_dir, num_mini_batches=4)
    with pytest.raises(ValueError, match="num_mini_batches=4"):
        w2.train_step(batch, temperature=T, step=0)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        LearnerWorker(LearnerConfig(), AlgorithmConfig(), ModelConfig(), model_dir, rank=2, world_size=2)
    with pytest.raises(RuntimeError, match="setup"):
        LearnerWorker(LearnerConfig(backend="torch"), AlgorithmConfig(), ModelConfig(), model_dir).compute_logprobs(
            batch, temperature=T)
