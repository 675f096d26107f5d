"""trace_rl/algo/exposure.py: counting by hand, cumulative sums, lift, checkpoint round-trip."""
from __future__ import annotations

import json
import math

import pytest
import torch

from trace_rl.algo.exposure import ExposureTracker, logprob_lift, teacher_coef, teacher_token_mask


def step_batch(seed, B=5, R=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, R + 1, (B,), generator=g)
    mask = torch.arange(R)[None, :] < lengths[:, None]
    names = ("pg", "fkl:key", "mle:correct", "rkl:error")
    w = torch.rand(4, B, R, generator=g) * (torch.rand(4, B, R, generator=g) > 0.6)
    w = w * mask  # folded weights are 0 outside the response
    return names, w, mask


def naive_teacher_tokens(names, w, mask, rows=None):
    n = 0
    for b in range(mask.shape[0]):
        if rows is not None and not rows[b]:
            continue
        for t in range(mask.shape[1]):
            if mask[b, t] and any(w[c, b, t] != 0 for c, name in enumerate(names)
                                  if name.split(":")[0] in ("fkl", "rkl", "jsd", "skl", "logratio")):
                n += 1
    return n


def test_teacher_token_mask_and_coef():
    names, w, mask = step_batch(0)
    got = teacher_token_mask(names, w, mask)
    assert int(got.sum()) == naive_teacher_tokens(names, w, mask)
    assert not teacher_token_mask(("pg", "mle:correct"), w[[0, 2]], mask).any()  # mle is not a teacher kind
    assert teacher_coef({"coef/pg": 1.0, "coef/fkl:key": 0.3, "coef/rkl:error": 0.2, "coef/mle:correct": 5.0,
                         "route/fkl:key_token_frac": 0.9}) == 0.3
    assert teacher_coef({"coef/pg": 1.0}) == 0.0
    with pytest.raises(ValueError, match="channel_weights must be"):
        teacher_token_mask(names, w[:2], mask)


def test_tracker_per_step_and_cumulative():
    tr = ExposureTracker()
    lams = [0.5, 0.5, 0.25, 0.0]
    tot_resp = tot_teacher = tot_grad = 0
    for i, lam in enumerate(lams):
        names, w, mask = step_batch(i)
        rows = torch.tensor([True, False, True, True, False])
        m = tr.update(names, w, mask, lam=lam, learned_rows=rows)
        n_t, n_g = naive_teacher_tokens(names, w, mask), naive_teacher_tokens(names, w, mask, rows.tolist())
        tot_resp += int(mask.sum())
        tot_teacher += n_t
        tot_grad += n_g
        assert m["exposure/teacher_token_frac"] == pytest.approx(n_t / max(int(mask.sum()), 1))
        assert m["exposure/privileged_grad"] == n_g
        assert m["exposure/lambda"] == lam
        assert m["exposure/teacher_token_frac_cum"] == pytest.approx(tot_teacher / tot_resp)
        assert m["exposure/privileged_grad_cum"] == tot_grad
        assert m["exposure/lambda_sum"] == pytest.approx(sum(lams[:i + 1]))
        assert m["exposure/lambda_sq_sum"] == pytest.approx(sum(x * x for x in lams[:i + 1]))
        assert all(k.startswith("exposure/") and isinstance(v, float) for k, v in m.items())
    assert tot_grad < tot_teacher  # the learned_rows filter mattered


def test_logprob_lift():
    before = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, 0.0]])
    after = torch.tensor([[-0.5, -2.5, -1.0], [-0.5, -1.0, 9.0]])
    key = torch.tensor([[True, False, True], [False, True, False]])
    assert logprob_lift(before, after, key) == pytest.approx((0.5 + 2.0 + 3.0) / 3)
    assert logprob_lift(before, after) == pytest.approx(float((after - before).mean()))
    assert math.isnan(logprob_lift(before, after, torch.zeros_like(key)))
    with pytest.raises(ValueError, match="same shape"):
        logprob_lift(before, after[:, :2])


def test_key_logprobs_and_checkpoint_roundtrip():
    tr = ExposureTracker()
    names, w, mask = step_batch(1)
    tr.update(names, w, mask, lam=0.5)
    key = torch.tensor([[True, False, True], [False, True, False]])
    lp0 = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, 0.0]])
    lp1 = lp0 + torch.tensor([[1.0, 0.0, 1.0], [0.0, -0.5, 0.0]])
    assert math.isnan(tr.record_key_logprobs(lp0, key))
    assert tr.record_key_logprobs(lp1, key) == pytest.approx((1.0 + 1.0 - 0.5) / 3)
    state = json.loads(json.dumps(tr.state_dict()))  # checkpoints are JSON
    tr2 = ExposureTracker()
    tr2.load_state_dict(state)
    lp2 = lp1 + 0.25
    assert tr2.record_key_logprobs(lp2, key) == pytest.approx(0.25)
    assert tr2.metrics()["exposure/key_logprob_lift_cum"] == pytest.approx((1.0 + 1.0 - 0.5) / 3 + 0.25)
    names, w, mask = step_batch(2)
    a, b = tr.update(names, w, mask, lam=0.1), tr2.update(names, w, mask, lam=0.1)
    assert a["exposure/lambda_sum"] == b["exposure/lambda_sum"] == pytest.approx(0.6)
    assert a["exposure/privileged_grad_cum"] == b["exposure/privileged_grad_cum"]
    with pytest.raises(ValueError, match="key tokens changed"):
        tr2.record_key_logprobs(lp2, torch.ones_like(key))
    with pytest.raises(ValueError, match="state keys"):
        tr2.load_state_dict({"steps": 1})
    with pytest.raises(ValueError, match="learned_rows must be"):
        tr.update(names, w, mask, learned_rows=torch.ones(2, dtype=torch.bool))
