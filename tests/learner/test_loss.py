"""trace_rl/learner/loss.py: channel routing and global normalisation, without any model."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from trace_rl.batch import Batch
from trace_rl.config import AlgorithmConfig
from trace_rl.learner.loss import (CHANNEL_LOSSES, RESPONSE, Counts, channel_weights, check_channels, global_counts,
                                   micro_batch_loss, register_channel_loss)

from .learner_helpers import make_batch

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "balanced")


def _inputs(batch: Batch, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, R = len(batch), batch.response_len
    m = batch.response_mask
    logp = (-3 * torch.rand(B, R, generator=g) * m).requires_grad_()
    old = (logp.detach() + 0.3 * torch.randn(B, R, generator=g)) * m
    ent = (4 * torch.rand(B, R, generator=g) * m).requires_grad_()
    ref = (logp.detach() + 0.2 * torch.randn(B, R, generator=g)) * m
    return logp, old, ent, ref


@pytest.mark.parametrize("mode", MODES)
def test_micro_batch_losses_add_up_to_the_whole_batch_loss(mode):
    """With the whole batch's counts, any split into micro-batches (or ranks) sums to the same loss and
    the same gradient: the property that makes micro-batching and data parallelism exact."""
    algo = AlgorithmConfig(loss_agg_mode=mode, kl_coef=0.1, entropy_coef=0.01)
    batch = make_batch(B=10, seed=3)
    logp, old, ent, ref = _inputs(batch)
    counts = global_counts(batch)
    whole = micro_batch_loss(batch, logp, old, counts, algo, entropy=ent, ref_logprobs=ref)
    g_whole = torch.autograd.grad(whole.loss, [logp, ent])
    parts, grads = [], []
    for rows in (slice(0, 3), slice(3, 5), slice(5, 10)):
        t = micro_batch_loss(batch.select(rows), logp[rows], old[rows], counts, algo, entropy=ent[rows],
                             ref_logprobs=ref[rows])
        parts.append(t.loss)
    total = sum(parts)
    grads = torch.autograd.grad(total, [logp, ent])
    assert float(total.detach()) == pytest.approx(float(whole.loss.detach()), abs=1e-6)
    for a, b in zip(grads, g_whole):
        assert torch.allclose(a, b, atol=1e-7)
    # and the loss is not trivially zero
    assert abs(float(whole.loss.detach())) > 1e-3


def test_token_mean_loss_equals_a_token_by_token_loop():
    algo = AlgorithmConfig(loss_agg_mode="token-mean", kl_coef=0.1, entropy_coef=0.01, clip_eps_low=0.2,
                           clip_eps_high=0.28)
    batch = make_batch(B=6, seed=4)
    logp, old, ent, ref = _inputs(batch, seed=1)
    got = micro_batch_loss(batch, logp, old, global_counts(batch), algo, entropy=ent, ref_logprobs=ref)
    w = batch.channel_weights[0]
    pg, n_pg, kl, ent_sum, n_resp = 0.0, 0, 0.0, 0.0, 0
    for i in range(len(batch)):
        for t in range(batch.response_len):
            if not batch.response_mask[i, t]:
                continue
            lp, o, a = float(logp[i, t].detach()), float(old[i, t]), float(batch.advantages[i, t])
            r = torch.exp(torch.tensor(lp - o)).item()
            rc = min(max(r, 0.8), 1.28)
            if w[i, t] != 0:
                pg += float(w[i, t]) * max(-a * r, -a * rc)
                n_pg += 1
            d = float(ref[i, t]) - lp
            kl += torch.exp(torch.tensor(d)).item() - d - 1
            ent_sum += float(ent[i, t].detach())
            n_resp += 1
    want = pg / n_pg + 0.1 * kl / n_resp - 0.01 * ent_sum / n_resp
    assert float(got.loss.detach()) == pytest.approx(want, abs=1e-5)
    assert float(got.parts["pg_loss"]) == pytest.approx(pg / n_pg, abs=1e-5)
    assert float(got.parts["kl"]) == pytest.approx(kl / n_resp, abs=1e-5)


def test_counts_are_taken_over_nonzero_channel_weights_and_all_response_tokens():
    batch = make_batch(B=6, seed=2)
    counts = global_counts(batch, max_len=50)
    w = batch.channel_weights[0]
    c = counts["pg"]
    assert (c.num_tokens, c.num_seqs, c.max_len) == (float((w != 0).sum()), float((w != 0).any(1).sum()), 50)
    # the balanced-mode counts split the same tokens by the sign of each sequence's advantage
    sign = torch.sign(batch.advantages.sum(1))
    for name, s in (("pos", 1), ("neg", -1)):
        rows = (w != 0) & (sign == s)[:, None]
        assert getattr(c, f"num_{name}_tokens") == float(rows.sum())
        assert getattr(c, f"num_{name}_seqs") == float(rows.any(1).sum())
    assert c.num_pos_tokens + c.num_neg_tokens <= c.num_tokens
    assert counts[RESPONSE].num_tokens == batch.num_response_tokens()
    assert global_counts(batch)["pg"].max_len == batch.response_len


def test_batch_without_channels_is_one_pg_channel_on_every_response_token():
    batch = make_batch(B=4, seed=2)
    plain = Batch(**{**batch.to_dict(), "channel_weights": None, "channel_names": ()})
    weights = channel_weights(plain)
    assert list(weights) == ["pg"] and torch.equal(weights["pg"], batch.response_mask.float())
    check_channels(plain)


def test_unknown_channel_kind_and_missing_fields_are_named():
    batch = make_batch(B=4, seed=2)
    odd = Batch(**{**batch.to_dict(), "channel_names": ("fancy:span",)})
    with pytest.raises(ValueError, match=r"unknown channel loss kind 'fancy'.*known: .*pg"):
        check_channels(odd)
    no_adv = Batch(**{**batch.to_dict(), "advantages": None})
    with pytest.raises(ValueError, match=r"channel 'pg' needs Batch\.advantages"):
        check_channels(no_adv)


def test_kl_without_reference_logprobs_is_an_error():
    batch = make_batch(B=4, seed=2)
    logp, old, ent, _ = _inputs(batch)
    with pytest.raises(ValueError, match="ref_logprobs"):
        micro_batch_loss(batch, logp, old, global_counts(batch), AlgorithmConfig(kl_coef=0.1))


def test_a_registered_channel_kind_is_summed_in_by_name_prefix():
    """A new objective is one registered function; channels 'kind:tag' route to it."""

    @register_channel_loss("test_mle")
    def mle(x):
        from trace_rl.algo.aggregation import aggregate

        return aggregate(-x.logprobs, x.weight, "token-mean", num_tokens=x.counts.num_tokens), {}

    try:
        batch = make_batch(B=6, seed=5)
        w = batch.channel_weights[0]
        span = (torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5).float() * batch.response_mask
        two = Batch(**{**batch.to_dict(), "channel_names": ("pg", "test_mle:span"),
                       "channel_weights": torch.stack([w, span])})
        logp, old, _, _ = _inputs(two)
        algo = AlgorithmConfig()
        t = micro_batch_loss(two, logp, old, global_counts(two), algo)
        want_mle = float(-(logp.detach() * span).sum() / (span != 0).sum())
        assert float(t.parts["loss/test_mle:span"]) == pytest.approx(want_mle, abs=1e-6)
        only_pg = micro_batch_loss(batch, logp, old, global_counts(batch), algo)
        assert float(t.loss.detach()) == pytest.approx(float(only_pg.loss.detach()) + want_mle, abs=1e-6)
        assert float(t.parts["pg_loss"]) == pytest.approx(float(only_pg.loss.detach()), abs=1e-6)
    finally:
        CHANNEL_LOSSES.pop("test_mle", None)


def test_explicit_agg_norm_is_the_default_and_token_seq_norms_use_the_channel_counts():
    """channel_norms=() and ("agg",) are the pre-existing behaviour; "token" / "seq" divide sum(w x) by
    the channel's global token / sequence counts whatever algo.loss_agg_mode says."""
    algo = AlgorithmConfig(loss_agg_mode="seq-mean-token-mean")
    batch = make_batch(B=6, seed=7)
    logp, old, _, _ = _inputs(batch, seed=2)
    counts = global_counts(batch)
    plain = micro_batch_loss(batch, logp, old, counts, algo).loss
    agg = micro_batch_loss(Batch(**{**batch.to_dict(), "channel_norms": ("agg",)}), logp, old, counts, algo).loss
    assert float(agg.detach()) == float(plain.detach())
    w = batch.channel_weights[0]
    per_token = {}
    for i in range(len(batch)):
        for t in range(batch.response_len):
            if w[i, t] != 0:
                lp, o, a = float(logp[i, t].detach()), float(old[i, t]), float(batch.advantages[i, t])
                r = math.exp(lp - o)
                per_token[i, t] = float(w[i, t]) * max(-a * r, -a * min(max(r, 0.8), 1.28))
    n_seqs = len({i for i, _ in per_token})
    for norm, denom in (("token", len(per_token)), ("seq", n_seqs)):
        got = micro_batch_loss(Batch(**{**batch.to_dict(), "channel_norms": (norm,)}), logp, old, counts, algo)
        assert float(got.loss.detach()) == pytest.approx(sum(per_token.values()) / denom, abs=1e-6)


def test_balanced_mode_in_the_learner_matches_a_naive_formula():
    """loss_agg_mode=balanced: the pg channel is the token mean over positive-advantage sequences and
    the token mean over negative ones (and over zero-advantage ones), combined by their sequence counts
    (naive loop here)."""
    algo = AlgorithmConfig(loss_agg_mode="balanced")
    batch = make_batch(B=8, seed=5)
    logp, old, _, _ = _inputs(batch)
    got = micro_batch_loss(batch, logp, old, global_counts(batch), algo).loss
    ratio = torch.exp(logp.detach() - old)
    A = batch.advantages
    per = torch.maximum(-A * ratio, -A * ratio.clamp(1 - algo.clip_eps_low, 1 + algo.clip_eps_high))
    w = batch.channel_weights[0]
    sums = {1: [0.0, 0, 0], -1: [0.0, 0, 0], 0: [0.0, 0, 0]}  # sign -> [weighted sum, tokens, seqs]
    for i in range(len(batch)):
        toks = [t for t in range(batch.response_len) if w[i, t] != 0]
        if not toks:
            continue
        a = sum(float(A[i, t]) for t in toks)  # a sequence's class: the sign of its summed advantage
        s = 1 if a > 0 else (-1 if a < 0 else 0)
        sums[s][0] += sum(float(per[i, t] * w[i, t]) for t in toks)
        sums[s][1] += len(toks)
        sums[s][2] += 1
    n = sums[1][2] + sums[-1][2] + sums[0][2]
    want = sum(sums[s][2] / n * sums[s][0] / max(sums[s][1], 1) for s in (1, -1, 0))
    assert sums[1][2] > 0 and sums[-1][2] > 0
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("cap", [1.5, 2.0])
def test_behaviour_is_weights_each_pg_token_by_the_truncated_ratio_loop(cap):
    """algorithm.behaviour_is=on (asynchronous training): every policy-gradient token is weighted by
    min(pi_old / pi_behaviour, cap), computed here token by token; the micro-batch split still adds up."""
    algo = AlgorithmConfig(loss_agg_mode="token-mean", behaviour_is="on", behaviour_is_cap=cap)
    batch = make_batch(B=6, seed=5)
    g = torch.Generator().manual_seed(9)
    batch.behaviour_logprobs = (batch.behaviour_logprobs + 0.8 * torch.randn(batch.behaviour_logprobs.shape,
                                                                            generator=g)) * batch.response_mask
    logp, old, _, _ = _inputs(batch, seed=2)
    got = micro_batch_loss(batch, logp, old, global_counts(batch), algo)
    w = batch.channel_weights[0]
    pg, n_pg, wsum, clipped = 0.0, 0, 0.0, 0
    for i in range(len(batch)):
        for t in range(batch.response_len):
            if not batch.response_mask[i, t] or w[i, t] == 0:
                continue
            lp, o, a = float(logp[i, t].detach()), float(old[i, t]), float(batch.advantages[i, t])
            r = math.exp(lp - o)
            rc = min(max(r, 0.8), 1.28)
            raw = math.exp(o - float(batch.behaviour_logprobs[i, t]))
            iw = min(raw, cap)
            pg += float(w[i, t]) * max(-a * r, -a * rc) * iw
            wsum += iw
            clipped += raw > cap
            n_pg += 1
    assert float(got.loss.detach()) == pytest.approx(pg / n_pg, abs=1e-5)
    assert got.token_metrics["async/is_weight_mean"][0] == pytest.approx(wsum / n_pg, abs=1e-5)
    assert got.token_metrics["async/is_clipped_frac"][0] == pytest.approx(clipped / n_pg, abs=1e-6)
    assert 0 < clipped < n_pg  # the case exercises the cap
    off = micro_batch_loss(batch, logp, old, global_counts(batch), dataclasses.replace(algo, behaviour_is="off"))
    assert float(off.loss.detach()) != pytest.approx(float(got.loss.detach()), abs=1e-6)
    assert "async/is_weight_mean" not in off.token_metrics
    # the micro-batches' losses still add up to the whole batch's
    counts = global_counts(batch)
    parts = sum(float(micro_batch_loss(batch.select(slice(s, s + 2)), logp[s:s + 2], old[s:s + 2], counts,
                                       algo).loss.detach()) for s in range(0, 6, 2))
    assert parts == pytest.approx(float(got.loss.detach()), abs=1e-6)
