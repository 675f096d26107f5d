"""trace_rl/algo/methods/tip.py: the token selection against sorted() over a flat token list."""
from __future__ import annotations

import math

import pytest
import torch

from tests.algo.test_methods import random_inputs
from trace_rl.algo import compute_method


def naive_select(inputs, budget, share, quantile):
    m = inputs.response_mask
    B, R = m.shape
    toks = [(b, t) for b in range(B) for t in range(R) if m[b, t]]  # row-major, like the implementation
    ent = [float(inputs.extra["entropy"][b, t]) for b, t in toks]
    div = [abs(float(inputs.extra["teacher_logprobs"][b, t]) - float(inputs.behaviour_logprobs[b, t]))
           for b, t in toks]
    n = len(toks)
    k = math.floor(budget * n)
    k_o = math.floor(share * k)
    by_ent_desc = sorted(range(n), key=lambda i: -ent[i])  # stable: ties keep the earlier token
    high = set(by_ent_desc[:k - k_o])
    low = set(sorted(range(n), key=lambda i: ent[i])[:math.floor(quantile * n)])
    cand = [i for i in range(n) if i in low and i not in high]
    over = set(sorted(cand, key=lambda i: -div[i])[:k_o])
    sel = torch.zeros(B, R)
    for i in high | over:
        sel[toks[i]] = 1.0
    return sel, len(high), len(over)


@pytest.mark.parametrize("budget,share,quantile", [(0.5, 0.5, 0.5), (0.2, 1.0, 0.3), (0.8, 0.25, 0.9),
                                                   (1.0, 0.0, 0.5), (0.3, 0.5, 0.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_selection_matches_sorted(budget, share, quantile, seed):
    inputs = random_inputs(seed, R=9)
    params = {"step": 0, "tip_budget": budget, "tip_overconfident_share": share, "tip_low_entropy_quantile": quantile,
              "tip_coef": 0.7}
    out = compute_method("tip", inputs, params)
    sel, n_high, n_over = naive_select(inputs, budget, share, quantile)
    assert out.channel_names == ("rkl:tip",) and out.channel_norms == ("token",)
    torch.testing.assert_close(out.channel_weights[0], 0.7 * sel)
    n_resp = int(inputs.response_mask.sum())
    assert out.metrics["tip/high_entropy_frac"] == pytest.approx(n_high / n_resp)
    assert out.metrics["tip/overconfident_frac"] == pytest.approx(n_over / n_resp)
    assert int(sel.sum()) <= math.floor(budget * n_resp)
    assert not out.advantages.any()


def test_overconfident_tokens_are_low_entropy_and_high_divergence():
    inputs = random_inputs(3, R=9)
    m = inputs.response_mask
    ent, div = inputs.extra["entropy"], (inputs.extra["teacher_logprobs"] - inputs.behaviour_logprobs).abs()
    out = compute_method("tip", inputs, {"step": 0, "tip_overconfident_share": 1.0, "tip_budget": 0.2})
    sel = out.channel_weights[0] != 0
    assert sel.any()
    n_low = int(m.sum()) // 2
    cut = float(ent[m].sort().values[n_low - 1])  # the largest entropy of the low-entropy half
    assert float(ent[sel].max()) <= cut  # all from the low-entropy half
    low_unselected = m & ~sel & (ent <= cut)
    assert float(div[sel].min()) >= float(div[low_unselected].max())


def test_divergence_kind_and_coefficient_zero():
    inputs = random_inputs(2)
    assert compute_method("tip", inputs, {"step": 0, "tip_divergence": "forward"}).channel_names == ("fkl:tip",)
    out = compute_method("tip", inputs, {"step": 0, "tip_coef": 0.0})
    assert out.channel_names == ("pg",) and not out.channel_weights.any() and not out.advantages.any()
