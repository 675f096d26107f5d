"""The ``advantage`` stage (trace_rl/pipeline/route.py), a pure function: concatenation order, the method,
filtering, padding, global counts and rank shards, against independent references."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from trace_rl.algo import MethodInputs, compute_method
from trace_rl.batch import Batch
from trace_rl.config import AlgorithmConfig
from trace_rl.learner.group import shard_rows
from trace_rl.learner.loss import global_counts
from trace_rl.pipeline.route import RouteSpec, concat_chunks, pad_rows_to_multiple, route_batch


def rollout_batch(groups: int = 6, n: int = 4, R: int = 7, seed: int = 0, version: int = 3) -> Batch:
    """A rollout as the engines return it: rewards filled, no advantages yet; group g has rewards of
    varying variance (groups 0 and 1 all-equal)."""
    g = torch.Generator().manual_seed(seed)
    B = groups * n
    lens = torch.randint(1, R + 1, (B,), generator=g)
    mask = torch.arange(R)[None, :] < lens[:, None]
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    rewards[:n] = 1.0
    rewards[n:2 * n] = 0.0
    return Batch(prompt_ids=torch.randint(1, 50, (B, 3), generator=g), prompt_mask=torch.ones(B, 3, dtype=torch.bool),
                 response_ids=torch.randint(1, 50, (B, R), generator=g) * mask, response_mask=mask,
                 behaviour_logprobs=-torch.rand(B, R, generator=g) * mask,
                 group_ids=torch.arange(B) // n, policy_version=torch.full((B,), version), rewards=rewards,
                 meta={"uid": [f"u{i // n}" for i in range(B)], "finish_reason": ["stop"] * B})


def spec(method: str = "grpo", step: int = 0, W: int = 2, M: int = 1, filter_zv: bool = True, **params) -> RouteSpec:
    p = {**dataclasses.asdict(AlgorithmConfig(name=method)), **params, "step": step}
    return RouteSpec(method=method, params=p, needs=frozenset(), filter_zero_variance=filter_zv, num_ranks=W,
                     num_mini_batches=M, max_len=7, pad_token_id=0)


def test_concat_chunks_restores_group_order_whatever_order_chunks_arrive():
    whole = rollout_batch()
    chunks = [whole.select(torch.arange(16, 24)), whole.select(torch.arange(0, 8)), whole.select(torch.arange(8, 16))]
    got = concat_chunks(chunks, pad_token_id=0)
    for name in ("response_ids", "response_mask", "behaviour_logprobs", "group_ids", "rewards", "prompt_ids"):
        assert torch.equal(getattr(got, name), getattr(whole, name)), name
    assert got.meta["uid"] == whole.meta["uid"]


@pytest.mark.parametrize("W, M", [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_route_batch_equals_method_filter_pad_and_shard_done_by_hand(W, M):
    batch = rollout_batch()
    shards, info = route_batch(spec(W=W, M=M), batch.replace(meta=dict(batch.meta)))
    # the reference: the method on the whole batch, then the lockstep loop's filter / pad / shard
    out = compute_method("grpo", MethodInputs(batch.rewards, batch.group_ids, batch.response_mask,
                                              behaviour_logprobs=batch.behaviour_logprobs),
                         {**spec().params})
    keep = torch.tensor([r.std() > 0 for r in batch.rewards.view(-1, 4)]).repeat_interleave(4)
    ref = batch.replace(advantages=out.advantages, channel_names=out.channel_names,
                        channel_weights=out.channel_weights, channel_norms=out.channel_norms).select(keep)
    ref = pad_rows_to_multiple(ref, W * M)
    assert info.rows == len(batch) and info.learn_rows == int(keep.sum()) and info.padded_rows == len(ref)
    assert info.versions == {3: int(keep.sum())} and not info.skipped
    assert info.metrics["train/zero_variance_frac"] == pytest.approx(1 - keep.float().mean().item())
    assert info.metrics["train/reward_mean"] == pytest.approx(batch.rewards.mean().item())
    for r, shard in enumerate(shards):
        idx = shard_rows(len(ref), M, W, r)
        assert torch.equal(shard.response_ids, ref.response_ids[idx])
        assert torch.equal(shard.advantages, ref.advantages[idx])
        assert torch.equal(shard.channel_weights, ref.channel_weights[:, idx])
        assert shard.meta == {} and shard.key_mask is None and shard.teacher_topk_ids is None
    want = [global_counts(mini, max_len=7) for mini in ref.split(M)]
    assert info.counts == want


def test_route_batch_with_nothing_to_learn_returns_no_shards():
    batch = rollout_batch()
    batch.rewards = torch.ones(len(batch))
    shards, info = route_batch(spec(), batch)
    assert shards == [None, None] and info.skipped and info.learn_rows == 0
    # with the filter off the same batch is learnable (its advantages are 0)
    shards, info = route_batch(spec(filter_zv=False), rollout_batch().replace(rewards=torch.ones(24)))
    assert not info.skipped and all(s is not None for s in shards)


def test_route_batch_names_a_missing_method_input():
    batch = rollout_batch()
    s = dataclasses.replace(spec("trace"), needs=frozenset({"annotations", "teacher_topk"}))
    with pytest.raises(ValueError, match="key_mask"):
        route_batch(s, batch)


def test_trace_step_keeps_span_rows_of_zero_variance_groups_and_ships_teacher_fields():
    batch = rollout_batch()
    B, R, K = len(batch), batch.response_len, 4
    key = torch.zeros(B, R, dtype=torch.bool)
    key[0, 0] = True  # row 0 is in the all-correct group 0: it carries a KL channel
    batch = batch.replace(key_mask=key, error_mask=torch.zeros(B, R, dtype=torch.bool),
                          teacher_logprobs=-torch.rand(B, R), teacher_topk_ids=torch.randint(0, 50, (B, R, K)),
                          teacher_topk_logprobs=-torch.rand(B, R, K))
    s = dataclasses.replace(spec("trace", step=0), needs=frozenset({"annotations", "teacher_topk"}))
    shards, info = route_batch(s, batch)
    kept = info.learn_rows
    n_var = sum(1 for r in batch.rewards.view(-1, 4) if r.std() > 0) * 4
    assert kept == n_var + 1  # the span row of the zero-variance group is kept
    assert all(sh.teacher_topk_ids is not None and sh.key_mask is None for sh in shards)
    assert "teacher/student_minus_teacher_logprob" in info.metrics and info.exposure[1] >= 1


def test_length_order_changes_micro_batches_not_the_loss():
    """learner.sort_by_length: within each mini-batch rows of similar length share micro-batches, balanced
    over ranks; each mini-batch trains on the same rows and the summed loss is the same (up to rounding)."""
    from trace_rl.learner.loss import micro_batch_loss

    batch = rollout_batch(groups=8, R=9, seed=4)
    W, M, mb = 2, 2, 4
    plain, info_p = route_batch(spec(W=W, M=M, filter_zv=False), batch.replace(meta=dict(batch.meta)))
    s = dataclasses.replace(spec(W=W, M=M, filter_zv=False), sort_by_length=True)
    sorted_, info_s = route_batch(s, batch.replace(meta=dict(batch.meta)))
    assert info_p.counts == info_s.counts
    algo = AlgorithmConfig()

    def rows(shards, m):
        n = len(shards[0]) // M
        return sorted(tuple(sh.response_ids[i].tolist()) for sh in shards for i in range(m * n, (m + 1) * n))

    def total_loss(shards, info):
        total = 0.0
        for sh in shards:
            n = len(sh) // M
            for m in range(M):
                mini = sh.select(slice(m * n, (m + 1) * n))
                for k in range(0, n, mb):
                    x = mini.select(slice(k, k + mb))
                    logp = x.behaviour_logprobs * 0.9
                    total += float(micro_batch_loss(x, logp, x.behaviour_logprobs, info.counts[m], algo).loss)
        return total

    for m in range(M):
        assert rows(plain, m) == rows(sorted_, m)
    assert total_loss(sorted_, info_s) == pytest.approx(total_loss(plain, info_p), abs=1e-6)
    # ranks get equal shares, each sorted longest first
    lens = [sh.response_mask.sum(1) + sh.prompt_mask.sum(1) for sh in sorted_]
    n = len(sorted_[0]) // M
    for L in lens:
        for m in range(M):
            part = L[m * n:(m + 1) * n]
            assert bool((part[:-1] >= part[1:]).all())
    # and less padding per micro-batch than the rollout order
    def padded(shards):
        return sum(int(x.response_mask.sum(1).max()) * len(x) for sh in shards
                   for x in (sh.select(slice(k, k + mb)) for k in range(0, len(sh), mb)))
    assert padded(sorted_) < padded(plain)


def _teacher_batch(skipped: list[bool]):
    batch = rollout_batch()
    B, R, K = len(batch), batch.response_len, 4
    key = torch.zeros(B, R, dtype=torch.bool)
    key[0, 0] = key[1, 0] = True  # rows 0 and 1 are in the all-correct group 0: only their KL channel keeps them
    return batch.replace(key_mask=key, error_mask=torch.zeros(B, R, dtype=torch.bool),
                         teacher_logprobs=-torch.rand(B, R), teacher_topk_ids=torch.randint(0, 50, (B, R, K)),
                         teacher_topk_logprobs=-torch.rand(B, R, K),
                         meta={**batch.meta, "teacher_skipped": skipped})


def test_a_row_too_long_for_the_teacher_gets_no_teacher_signal():
    """TeacherScorer marks rows whose privileged prompt + response exceed the teacher's context: TRACE sees such
    a row unannotated (its spans go to GRPO, here: a zero-variance row, so it is not learned at all), and a
    method that reads the teacher on every row does not learn from it."""
    B = len(rollout_batch())
    skipped = [False] * B
    skipped[1] = True
    trace = dataclasses.replace(spec("trace", step=0), needs=frozenset({"annotations", "teacher_topk"}))
    _, info_all = route_batch(trace, _teacher_batch([False] * B))
    _, info_skip = route_batch(trace, _teacher_batch(skipped))
    assert info_skip.learn_rows == info_all.learn_rows - 1  # row 1 lost its only (KL) channel
    assert info_skip.metrics["teacher/too_long_rows"] == 1.0 and info_all.metrics["teacher/too_long_rows"] == 0.0
    assert info_skip.metrics["teacher/scored_frac"] == pytest.approx(1 / B)  # row 0 only

    opd = dataclasses.replace(spec("self_opd", step=0), needs=frozenset({"teacher_logprobs", "teacher_topk"}))
    skipped_var = [False] * B
    skipped_var[10] = True  # a row of a group with reward variance
    _, full = route_batch(opd, _teacher_batch([False] * B))
    _, part = route_batch(opd, _teacher_batch(skipped_var))
    assert part.learn_rows == full.learn_rows - 1
