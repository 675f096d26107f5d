"""LearnerGroup on a real local Ray cluster: DeepSpeed ZeRO-2/3 and plain torch against a naive reference."""
from __future__ import annotations

import os
import time

import pytest
import torch

from .learner_helpers import (Reference, load_hf, make_batch, make_tiny_model, max_abs_diff, naive_logprobs,
                             unique_params, with_behaviour_near_current)
from trace_rl.batch import Batch
from trace_rl.config import AlgorithmConfig, LearnerConfig, ModelConfig
from trace_rl.learner.group import LearnerGroup, LearnerPlacementError, LearnerRankError, reduce_metrics, shard_rows

# Tensors that come back from the object store zero-copy are read-only; we only read them.
pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

T = 0.7  # rollout temperature: every log-prob is taken at logits / T
# ZeRO-3 keeps parameters below this size whole on every rank; 0 makes the tiny model really sharded
SHARD_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
# kl and entropy on, behaviour log-probs as the ratio's denominator, clipping active (grad_clip < norm)
ALGO = dict(lr=1e-3, kl_coef=0.05, entropy_coef=0.01, old_logprobs="behaviour", grad_clip=1.0,
            weight_decay=0.01, loss_agg_mode="token-mean")


# ------------------------------------------------------------------------------------ pure helpers
def test_shard_rows_gives_each_rank_its_part_of_every_mini_batch():
    rows = [shard_rows(12, 2, 3, r).tolist() for r in range(3)]
    assert rows == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert sorted(sum(rows, [])) == list(range(12))


def test_reduce_metrics_sums_shares_weights_means_and_keeps_rank0_globals():
    r0 = {"loss": 1.0, "clipfrac": 0.5, "_weight/clipfrac": 2.0, "grad_norm": 3.0, "tokens": 10.0}
    r1 = {"loss": 2.0, "clipfrac": 0.0, "_weight/clipfrac": 6.0, "grad_norm": 3.0, "tokens": 5.0}
    out = reduce_metrics([r0, r1])
    assert out == {"loss": 3.0, "clipfrac": 0.125, "grad_norm": 3.0, "tokens": 15.0}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="module")
def batches(model_dir):
    """Three rollout batches of 10 sequences; the first has behaviour log-probs near the model's own."""
    first = with_behaviour_near_current(make_batch(seed=1), load_hf(model_dir), T)
    return [first, make_batch(seed=2), make_batch(seed=3)]


@pytest.fixture(scope="module")
def reference(model_dir, batches):
    """The naive single-process learner after each of the three batches: (loss, grad norm, params)."""
    ref = Reference(model_dir, AlgorithmConfig(**ALGO))
    out = []
    for b in batches:
        loss, norm = ref.update(b, T)
        out.append((loss, norm, unique_params(ref.model)))
    return out


def _run(group: LearnerGroup, batches) -> list[tuple[dict, dict]]:
    import ray

    out = []
    for step, b in enumerate(batches):
        metrics = group.train(b, temperature=T, step=step)
        out.append((metrics, dict(ray.get(group.state_dict_ref()))))
    return out


def _ds_group(model_dir, stage: int, **algo) -> LearnerGroup:
    # 10 sequences over 2 ranks, micro-batches of 3: each rank runs micro-batches of 3 and 2 rows
    lc = LearnerConfig(backend="deepspeed", num_ranks=2, zero_stage=stage, micro_batch_size=3,
                       logprob_chunk_size=5, deepspeed_overrides=SHARD_ALL, threads_per_rank=1)
    return LearnerGroup(lc, AlgorithmConfig(**{**ALGO, **algo}), ModelConfig(), model_dir, seed=0)


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, model_dir, batches, tmp_path_factory):
    """A 2-rank ZeRO-2 group through the three batches (metrics and gathered weights after each), then
    exported as an HF checkpoint; the group is shut down before the tests use the records."""
    with _ds_group(model_dir, 2) as group:
        records = _run(group, batches)
        export = group.export_hf(str(tmp_path_factory.mktemp("export")))
    return records, export


@pytest.fixture(scope="module")
def zero3(ray_cluster, model_dir, batches):
    """A live 2-rank ZeRO-3 group, after the three batches, with its records."""
    group = _ds_group(model_dir, 3)
    records = _run(group, batches)
    yield group, records
    group.shutdown()


# ------------------------------------------------------------------------------------ DeepSpeed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_ranks_match_single_process_reference(stage, request, reference, batches):
    """Micro-batched, 2-rank ZeRO == full-batch naive loss + torch AdamW: parameters after every step,
    the loss value, and the pre-clip gradient norm (the norm catches a wrong scale of the gradient,
    to which Adam's update is blind)."""
    records = request.getfixturevalue("zero2_run")[0] if stage == 2 else request.getfixturevalue("zero3")[1]
    for step, ((metrics, state), (ref_loss, ref_norm, ref_params)) in enumerate(zip(records, reference)):
        assert metrics["nonfinite"] == 0
        assert metrics["loss"] == pytest.approx(ref_loss, abs=1e-5), step
        assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5), step
        assert max_abs_diff(state, ref_params) < 1e-5, step
    first = records[0][0]
    assert 0 < first["clipfrac"] < 1  # the clip really acted on the first batch
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the initial policy
    assert first["tokens"] == batches[0].num_response_tokens()


@pytest.mark.slow
def test_zero2_and_zero3_gathered_weights_agree_after_three_steps(zero2_run, zero3):
    z2, z3 = zero2_run[0][-1][1], zero3[1][-1][1]
    assert "model.embed_tokens.weight" in z2 and "lm_head.weight" not in z2  # tied: stored once
    assert max_abs_diff(z2, z3) < 2e-6
    assert max_abs_diff(z2, zero2_run[0][0][1]) > 1e-4  # and training did move them


@pytest.mark.slow
def test_gathered_weights_load_into_hf_and_reproduce_the_learner(zero3, model_dir):
    import ray

    group = zero3[0]
    state = ray.get(group.state_dict_ref())
    # a weight sync to bfloat16 engines ships bfloat16: the same values, rounded, at half the bytes
    half = ray.get(group.state_dict_ref("bfloat16"))
    assert half.keys() == state.keys()
    for name, t in state.items():
        assert half[name].dtype == (torch.bfloat16 if t.is_floating_point() else t.dtype), name
        assert torch.equal(half[name], t.to(half[name].dtype)), name
    model = load_hf(model_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]  # tied to the embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    batch = make_batch(B=5, seed=11)  # 5 rows over 2 ranks: the group pads and drops one
    got = group.logprobs(batch, T)
    with torch.no_grad():
        want = naive_logprobs(model, batch, T)
    assert got.shape == (5, batch.response_len)
    for i, (lp, _) in enumerate(want):
        assert torch.allclose(got[i, :len(lp)], lp, atol=2e-5)
        assert (got[i, len(lp):] == 0).all()


@pytest.mark.slow
def test_export_hf_is_a_loadable_checkpoint(zero2_run, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records, export = zero2_run
    assert os.path.isfile(os.path.join(export, "config.json"))
    exported = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    assert max_abs_diff(unique_params(exported), records[-1][1]) == 0.0
    assert AutoTokenizer.from_pretrained(export).convert_tokens_to_ids("t5") == 5


@pytest.mark.slow
def test_nonfinite_loss_skips_the_step_and_is_counted(zero3, batches):
    import ray

    group = zero3[0]
    before = dict(ray.get(group.state_dict_ref()))
    adv = batches[1].advantages.clone()
    adv[7, 0] = float("nan")  # one token on rank 1 only
    poisoned = Batch(**{**batches[1].to_dict(), "advantages": adv})
    metrics = group.train(poisoned, temperature=T, step=3)
    assert metrics["nonfinite"] == 1 and metrics["updates"] == 0
    assert max_abs_diff(dict(ray.get(group.state_dict_ref())), before) == 0.0
    metrics = group.train(batches[1], temperature=T, step=3)  # and training goes on
    assert metrics["nonfinite"] == 0 and metrics["updates"] == 1
    assert max_abs_diff(dict(ray.get(group.state_dict_ref())), before) > 1e-5


@pytest.mark.slow
def test_checkpoint_resume_gives_the_identical_next_step(zero3, model_dir, batches, tmp_path):
    import ray

    group = zero3[0]
    group.save(str(tmp_path / "ckpt"), {"step": 4, "note": "x"})
    group.train(batches[2], temperature=T, step=4)
    want = dict(ray.get(group.state_dict_ref()))
    with _ds_group(model_dir, 3) as fresh:
        assert fresh.load(str(tmp_path / "ckpt")) == {"step": 4, "note": "x"}
        fresh.train(batches[2], temperature=T, step=4)
        got = dict(ray.get(fresh.state_dict_ref()))
    assert max_abs_diff(got, want) < 1e-7


# ------------------------------------------------------------------------------------ plain torch
@pytest.mark.slow
def test_torch_backend_single_rank_matches_reference_with_mini_batches_and_epochs(ray_cluster, model_dir):
    """backend=torch, 1 rank: 2 epochs x 2 mini-batches = 4 updates per batch, old log-probs recomputed
    once before the first update, seq-mean-token-mean, linear warm-up; then the objective improves."""
    import ray

    algo = AlgorithmConfig(lr=2e-3, kl_coef=0.0, entropy_coef=0.0, old_logprobs="recompute", grad_clip=1.0,
                           num_mini_batches=2, ppo_epochs=2, warmup_steps=3, loss_agg_mode="seq-mean-token-mean")
    lc = LearnerConfig(backend="torch", num_ranks=1, micro_batch_size=2, logprob_chunk_size=7, threads_per_rank=1,
                       nice=3)
    batch = make_batch(B=8, seed=5)
    ref = Reference(model_dir, algo)
    old = ref.old_logprobs(batch, T)
    minis = batch.split(2)
    ref_norms = []
    for _epoch in range(2):
        for m, mini in enumerate(minis):
            ref_norms.append(ref.update(mini, T, old=old[4 * m: 4 * m + 4])[1])
    with LearnerGroup(lc, algo, ModelConfig(), model_dir) as group:
        # learner.nice: the rank runs niced from its first instruction (not only once set up), 3 steps below a
        # plain Ray worker (Ray starts its workers niced itself)
        base = ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote())
        ping = ray.get(group.actors[0].ping.remote())
        assert ping["nice_at_start"] == ping["nice"] == min(base + 3, 19)
        metrics = group.train(batch, temperature=T, step=0)
        assert metrics["updates"] == 4 and metrics["lr"] == pytest.approx(2e-3)
        assert metrics["grad_norm"] == pytest.approx(sum(ref_norms) / 4, rel=1e-5)
        # Four Adam updates: elements whose gradient is near Adam's eps turn fp32 rounding differences
        # (chunked head vs full logits) into ~1e-5 differences; the updates themselves are ~1e-2.
        state = dict(ray.get(group.state_dict_ref()))
        assert max_abs_diff(state, unique_params(ref.model)) < 1e-4
        assert max_abs_diff(state, unique_params(load_hf(model_dir))) > 3e-3

        # A few more steps on one batch: the advantage-weighted log-likelihood must go up.
        adv = batch.advantages
        sign = torch.where(adv > 0, 1.0, torch.where(adv < 0, -1.0, 0.0)) * batch.response_mask

        def objective():
            return float((group.logprobs(batch, T) * sign).sum())

        start, losses = objective(), []
        ref_batch = ray.put(batch)  # the driver may pass an ObjectRef
        for step in range(1, 5):
            losses.append(group.train(ref_batch, temperature=T, step=step)["loss"])
        assert objective() > start + 1.0
        assert losses[-1] < losses[0]


@pytest.mark.slow
def test_torch_backend_ddp_two_ranks_matches_reference(ray_cluster, model_dir, batches, reference):
    import ray

    lc = LearnerConfig(backend="torch", num_ranks=2, micro_batch_size=3, logprob_chunk_size=5, threads_per_rank=1)
    with LearnerGroup(lc, AlgorithmConfig(**ALGO), ModelConfig(), model_dir) as group:
        metrics = group.train(batches[0], temperature=T, step=0)
        assert metrics["grad_norm"] == pytest.approx(reference[0][1], rel=1e-5)
        assert max_abs_diff(dict(ray.get(group.state_dict_ref())), reference[0][2]) < 1e-5


# ------------------------------------------------------------------------------------ placement
@pytest.mark.slow
def test_placement_group_timeout_names_the_missing_resources(ray_cluster, model_dir):
    import ray

    free = ray.available_resources().get("CPU", 0)
    lc = LearnerConfig(backend="torch", num_ranks=2, cpus_per_rank=64)
    with pytest.raises(LearnerPlacementError, match=r"2 bundles of \{'CPU': 64\.0\}.*'CPU': 128\.0.*learner\.num_ranks"):
        LearnerGroup(lc, AlgorithmConfig(), ModelConfig(), model_dir, placement_timeout_s=1.0)
    # nothing left reserved (resources come back asynchronously: poll a little)
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) >= free
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()
               if pg["name"].startswith("trace_rl_learner") and pg["bundles"].get(0, {}).get("CPU") == 64.0)


@pytest.mark.slow
def test_a_failing_rank_tears_the_group_down_with_its_error(ray_cluster, tmp_path):
    import json

    import ray

    broken = tmp_path / "no_weights"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": 128}))
    free = ray.available_resources().get("CPU", 0)
    lc = LearnerConfig(backend="torch", num_ranks=1, threads_per_rank=1)
    with pytest.raises(LearnerRankError, match=r"learner rank 0 failed in setup\(\)"):
        LearnerGroup(lc, AlgorithmConfig(), ModelConfig(), str(broken))
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) >= free
