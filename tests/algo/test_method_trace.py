"""trace_rl/algo/methods/trace.py against per-token loops; TRACE's invariants (no spans / lambda = 0 -> GRPO)."""
from __future__ import annotations

import pytest
import torch

from tests.algo.test_methods import naive_seq_adv, random_inputs
from trace_rl.algo import compute_method


def naive_lambda(step):
    """TRACE's default: 0.5 up to step 10, then linearly to 0 at step 40."""
    return 0.5 if step <= 10 else max(0.0, 0.5 * (1 - (step - 10) / 30))


def naive_trace(inputs, lam, lam0, use_key=True, use_err=True, threshold=0.5):
    B, R = inputs.response_mask.shape
    seq = naive_seq_adv(inputs.rewards.tolist(), inputs.group_ids.tolist())
    adv, pg, fkl, rkl = ([[0.0] * R for _ in range(B)] for _ in range(4))
    for b in range(B):
        n = int(inputs.response_mask[b].sum())
        correct = float(inputs.rewards[b]) > threshold
        for t in range(R):
            if not inputs.response_mask[b, t]:
                continue
            adv[b][t] = seq[b]
            key = use_key and correct and bool(inputs.extra["key_mask"][b, t])
            err = use_err and not correct and bool(inputs.extra["error_mask"][b, t])
            pg[b][t] = 1.0 - lam / lam0 if (key or err) else 1.0
            fkl[b][t] = lam / n if key else 0.0
            rkl[b][t] = lam / n if err else 0.0
    return [torch.tensor(x) for x in (adv, pg, fkl, rkl)]


@pytest.mark.parametrize("step", [0, 10, 11, 25, 39])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loops_along_the_default_schedule(step, seed):
    inputs = random_inputs(seed)
    out = compute_method("trace", inputs, {"step": step})
    lam = naive_lambda(step)
    adv, pg, fkl, rkl = naive_trace(inputs, lam, 0.5)
    assert out.channel_names == ("pg", "fkl:key", "rkl:error")
    assert out.channel_norms == ("agg", "seq", "seq")
    torch.testing.assert_close(out.advantages, adv, atol=1e-6, rtol=1e-6)
    for c, want in enumerate((pg, fkl, rkl)):
        torch.testing.assert_close(out.channel_weights[c], want, atol=1e-6, rtol=1e-6)
    assert out.metrics["coef/fkl:key"] == pytest.approx(lam) and out.metrics["trace/lambda"] == pytest.approx(lam)


@pytest.mark.parametrize("use_key,use_err", [(True, False), (False, True)])
def test_switches(use_key, use_err):
    inputs = random_inputs(4)
    out = compute_method("trace", inputs, {"step": 3, "trace_key_kl": use_key, "trace_error_kl": use_err,
                                           "correct_threshold": 0.0})
    adv, pg, fkl, rkl = naive_trace(inputs, 0.5, 0.5, use_key, use_err, threshold=0.0)
    kept = ["pg"] + (["fkl:key"] if use_key else []) + (["rkl:error"] if use_err else [])
    assert list(out.channel_names) == kept
    weights = dict(zip(out.channel_names, out.channel_weights))
    torch.testing.assert_close(weights["pg"], pg)
    torch.testing.assert_close(weights[kept[1]], fkl if use_key else rkl)
    assert out.metrics["coef/" + ("rkl:error" if use_key else "fkl:key")] == 0.0


def test_custom_schedule_sets_lambda0_to_its_peak():
    inputs = random_inputs(2)
    sched = {"name": "cosine", "start": 0.8, "hold_steps": 0, "decay_steps": 10}
    out = compute_method("trace", inputs, {"step": 5, "trace_lambda": sched})
    lam = 0.4  # cos(pi / 2) midpoint of 0.8 -> 0
    adv, pg, fkl, rkl = naive_trace(inputs, lam, 0.8)
    torch.testing.assert_close(out.channel_weights[0], pg, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.channel_weights[1], fkl, atol=1e-6, rtol=0)
    assert out.metrics["trace/pg_span_share"] == pytest.approx(0.5)


def _grpo(inputs):
    return compute_method("grpo", inputs)


@pytest.mark.parametrize("seed", range(3))
def test_no_spans_is_grpo(seed):
    inputs = random_inputs(seed)
    inputs.extra["key_mask"][:] = False
    inputs.extra["error_mask"][:] = False
    out, ref = compute_method("trace", inputs, {"step": 0}), _grpo(inputs)
    assert torch.equal(out.advantages, ref.advantages)
    assert torch.equal(out.channel_weights[0], ref.channel_weights[0])
    assert not out.channel_weights[1:].any()  # the KL channels carry nothing


@pytest.mark.parametrize("params", [{"step": 40}, {"step": 1000}, {"step": 3, "trace_lambda": 0.0},
                                    {"step": 3, "trace_key_kl": False, "trace_error_kl": False}])
def test_lambda_zero_is_grpo(params):
    inputs = random_inputs(7)
    out, ref = compute_method("trace", inputs, params), _grpo(inputs)
    assert out.channel_names == ref.channel_names == ("pg",)
    assert torch.equal(out.advantages, ref.advantages)
    assert torch.equal(out.channel_weights, ref.channel_weights)


def test_seq_norm_encodes_span_mean_times_span_fraction():
    """What the learner computes for a 'seq' channel, sum(w * x) / (#sequences with w != 0), equals
    lam * mean over span sequences of [mean_span(x) * |span| / n_i]."""
    inputs = random_inputs(9)
    out = compute_method("trace", inputs, {"step": 0})
    w = out.channel_weights[1].double()
    x = torch.rand(w.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    learner = float((w * x).sum()) / int((w != 0).any(dim=1).sum())
    per_seq = []
    for b in range(w.shape[0]):
        span = [t for t in range(w.shape[1]) if w[b, t] != 0]
        if span:
            n = int(inputs.response_mask[b].sum())
            per_seq.append(sum(float(x[b, t]) for t in span) / len(span) * len(span) / n)
    assert per_seq and learner == pytest.approx(0.5 * sum(per_seq) / len(per_seq), rel=1e-6)
