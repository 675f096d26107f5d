"""trace_rl/algo/methods/self_opd.py: channel kind per divergence, coefficient schedule, with / without GRPO."""
from __future__ import annotations

import pytest
import torch

from tests.algo.test_methods import naive_seq_adv, random_inputs
from trace_rl.algo import compute_method


@pytest.mark.parametrize("divergence,kind", [("forward", "fkl"), ("reverse", "rkl"), ("jsd", "jsd"),
                                             ("skl", "skl"), ("logratio", "logratio")])
def test_alone(divergence, kind):
    inputs = random_inputs(0)
    out = compute_method("self_opd", inputs, {"step": 3, "opd_divergence": divergence, "opd_coef": 0.3})
    assert out.channel_names == (f"{kind}:opd",) and out.channel_norms == ("token",)
    B, R = inputs.response_mask.shape
    want = torch.tensor([[0.3 if inputs.response_mask[b, t] else 0.0 for t in range(R)] for b in range(B)])
    torch.testing.assert_close(out.channel_weights[0], want)
    assert not out.advantages.any()
    assert out.metrics[f"coef/{kind}:opd"] == pytest.approx(0.3)


def test_with_grpo_and_schedule():
    inputs = random_inputs(1)
    sched = {"name": "hold_linear", "start": 1.0, "hold_steps": 2, "decay_steps": 4}
    out = compute_method("self_opd", inputs, {"step": 4, "opd_with_grpo": True, "opd_coef": sched})
    assert out.channel_names == ("pg", "fkl:opd") and out.channel_norms == ("agg", "token")
    seq = naive_seq_adv(inputs.rewards.tolist(), inputs.group_ids.tolist())
    B, R = inputs.response_mask.shape
    m = inputs.response_mask
    torch.testing.assert_close(out.advantages, torch.tensor([[seq[b] * float(m[b, t]) for t in range(R)]
                                                             for b in range(B)]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.channel_weights[0], m.float())
    torch.testing.assert_close(out.channel_weights[1], 0.5 * m.float())  # halfway down the decay
    late = compute_method("self_opd", inputs, {"step": 6, "opd_with_grpo": True, "opd_coef": sched})
    ref = compute_method("grpo", inputs)
    assert late.channel_names == ("pg",) and torch.equal(late.advantages, ref.advantages)
