"""trace_rl/algo/methods/scope.py against the paper's and the released code's formulas, written as loops."""
from __future__ import annotations

import math

import pytest
import torch

from tests.algo.test_methods import random_inputs
from trace_rl.algo import compute_method


def mean_logp(lp, mask, b):
    toks = [float(lp[b, t]) for t in range(mask.shape[1]) if mask[b, t]]
    return sum(toks) / len(toks)


def naive_scope_weights(inputs, tau, weighting, threshold=0.5):
    """(w, v) per sequence. Paper: w ~ PPL_S^(1/tau), v ~ PPL_T^(-1/tau), each summing to 1 over the
    group's correct / incorrect responses. Code: softmax(+l_S / tau) * count and softmax(-l_T / tau) * count."""
    m = inputs.response_mask
    B = m.shape[0]
    w, v = [0.0] * B, [0.0] * B
    for g in set(inputs.group_ids.tolist()):
        for path, out, lp, paper_pow, code_sign in (
                (True, w, inputs.behaviour_logprobs, 1.0, 1.0),
                (False, v, inputs.extra["teacher_logprobs"], -1.0, -1.0)):
            members = [b for b in range(B) if int(inputs.group_ids[b]) == g and m[b].any()
                       and (float(inputs.rewards[b]) > threshold) == path]
            if not members:
                continue
            if weighting == "paper":
                score = {b: math.exp(-mean_logp(lp, m, b)) ** (paper_pow / tau) for b in members}
                z = sum(score.values())
                for b in members:
                    out[b] = score[b] / z
            else:
                score = {b: math.exp(code_sign * mean_logp(lp, m, b) / tau) for b in members}
                z = sum(score.values())
                for b in members:
                    out[b] = score[b] / z * len(members)
    return w, v


@pytest.mark.parametrize("weighting", ["paper", "code"])
@pytest.mark.parametrize("tau", [1.0, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loops(weighting, tau, seed):
    inputs = random_inputs(seed)
    out = compute_method("scope", inputs, {"step": 0, "scope_tau": tau, "scope_weighting": weighting,
                                           "scope_kl_coef": 0.5})
    assert out.channel_names == ("mle:correct", "rkl:incorrect") and out.channel_norms == ("agg", "agg")
    w, v = naive_scope_weights(inputs, tau, weighting)
    m = inputs.response_mask.float()
    torch.testing.assert_close(out.channel_weights[0], torch.tensor(w)[:, None] * m, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.channel_weights[1], 0.5 * torch.tensor(v)[:, None] * m, rtol=1e-5, atol=1e-7)
    assert not out.advantages.any()


@pytest.mark.parametrize("seed", range(3))
def test_paper_weights_sum_to_one_per_group_and_missing_paths_get_nothing(seed):
    inputs = random_inputs(seed, groups=(4, 4, 3, 2, 1))
    g0 = inputs.group_ids == inputs.group_ids[0]
    inputs.rewards[g0] = 1.0  # a group with no incorrect response
    out = compute_method("scope", inputs, {"step": 0})
    m = inputs.response_mask
    has = m.any(1)
    # per-sequence weight = the (constant) token weight of its first token
    w, v = out.channel_weights[0, :, 0] * 1.0, out.channel_weights[1, :, 0] * 1.0
    correct = inputs.rewards > 0.5
    for g in set(inputs.group_ids.tolist()):
        rows = inputs.group_ids == g
        for path, weights in ((correct, w), (~correct, v)):
            members = rows & path & has
            total = float(weights[rows & path].sum())
            assert total == pytest.approx(1.0 if members.any() else 0.0, abs=1e-5)
            assert not weights[rows & ~(path & has)].any()  # other rows get none on this path
    assert not v[g0].any()


def test_coefficients_and_divergence():
    inputs = random_inputs(3)
    out = compute_method("scope", inputs, {"step": 0, "scope_divergence": "forward", "scope_mle_coef": 0.0})
    assert out.channel_names == ("fkl:incorrect",)
    out = compute_method("scope", inputs, {"step": 0, "scope_kl_coef": 0.0})
    assert out.channel_names == ("mle:correct",)
