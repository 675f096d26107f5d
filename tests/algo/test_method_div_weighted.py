"""trace_rl/algo/methods/div_weighted.py against per-token loops."""
from __future__ import annotations

import pytest
import torch

from tests.algo.test_methods import naive_seq_adv, random_inputs
from trace_rl.algo import compute_method


def naive(inputs, power, mix):
    m = inputs.response_mask
    B, R = m.shape
    seq = naive_seq_adv(inputs.rewards.tolist(), inputs.group_ids.tolist())
    out = [[0.0] * R for _ in range(B)]
    for b in range(B):
        ts = [t for t in range(R) if m[b, t]]
        d = {t: abs(float(inputs.extra["teacher_logprobs"][b, t]) - float(inputs.behaviour_logprobs[b, t])) ** power
             for t in ts}
        mean = sum(d.values()) / len(ts) if ts else 0.0
        for t in ts:
            w = (1 - mix) + mix * d[t] / mean if mean > 0 else 1.0
            out[b][t] = seq[b] * w
    return torch.tensor(out)


@pytest.mark.parametrize("power,mix", [(1.0, 1.0), (2.0, 0.5), (0.5, 0.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loops(power, mix, seed):
    inputs = random_inputs(seed)
    out = compute_method("div_weighted", inputs, {"div_weight_power": power, "div_weight_mix": mix})
    torch.testing.assert_close(out.advantages, naive(inputs, power, mix), atol=1e-5, rtol=1e-5)
    assert out.channel_names == ("pg",) and torch.equal(out.channel_weights[0], inputs.response_mask.float())


def test_weights_have_mean_one_per_response_and_equal_divergence_is_grpo():
    inputs = random_inputs(4)
    out, grpo = compute_method("div_weighted", inputs), compute_method("grpo", inputs)
    m = inputs.response_mask
    for b in range(m.shape[0]):
        if m[b].any() and float(grpo.advantages[b, 0]) != 0:
            assert float(out.advantages[b][m[b]].mean()) == pytest.approx(float(grpo.advantages[b, 0]), rel=1e-5)
    inputs.extra["teacher_logprobs"] = inputs.behaviour_logprobs + 0.5  # the same divergence everywhere
    torch.testing.assert_close(compute_method("div_weighted", inputs).advantages, grpo.advantages)
