"""trace_rl/algo/channels.py and MethodOutput.from_channels / channel_norms validation."""
from __future__ import annotations

import pytest
import torch

from trace_rl.algo import MethodInputs, MethodOutput
from trace_rl.algo.channels import CHANNEL_NORMS, TEACHER_KINDS, Channel, channel_kind, fold_channels


def make_mask():
    lengths = torch.tensor([3, 0, 5, 2])
    return torch.arange(5)[None, :] < lengths[:, None]


def test_channel_kind():
    assert channel_kind("pg") == "pg"
    assert channel_kind("fkl:key") == "fkl"
    assert channel_kind("rkl:error:x") == "rkl"
    assert {"fkl", "rkl", "jsd", "skl", "logratio"} == TEACHER_KINDS
    assert CHANNEL_NORMS == ("agg", "token", "seq")


def test_channel_validation():
    w = torch.ones(2, 3)
    with pytest.raises(ValueError, match="norm must be one of"):
        Channel("pg", w, norm="mean")
    with pytest.raises(ValueError, match="name must look like"):
        Channel(":key", w)
    with pytest.raises(ValueError, match="weights must be a \\[B, R\\] tensor"):
        Channel("pg", torch.ones(3))
    with pytest.raises(ValueError, match="coef must be finite"):
        Channel("pg", w, coef=float("inf"))


def test_fold_multiplies_coef_masks_padding_and_reports_metrics():
    mask = make_mask()
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(4, 5, generator=g) + 0.1  # nonzero everywhere, also on padding
    sparse = raw * (torch.rand(4, 5, generator=g) > 0.5)
    names, weights, norms, metrics = fold_channels(
        [Channel("pg", raw), Channel("fkl:key", sparse, norm="seq", coef=0.25),
         Channel("rkl:error", raw, norm="seq", coef=0.0)], mask)
    assert names == ("pg", "fkl:key") and norms == ("agg", "seq")  # coef 0: left out
    assert weights.shape == (2, 4, 5) and weights.dtype == torch.float32
    n_resp = int(mask.sum())
    for c, (w_raw, coef) in enumerate(((raw, 1.0), (sparse, 0.25))):
        for b in range(4):
            for t in range(5):
                want = float(w_raw[b, t]) * coef if mask[b, t] else 0.0
                assert float(weights[c, b, t]) == pytest.approx(want, rel=1e-6)
    nz_sparse = sum(1 for b in range(4) for t in range(5) if mask[b, t] and sparse[b, t] != 0)
    assert metrics == pytest.approx({"coef/pg": 1.0, "coef/fkl:key": 0.25, "coef/rkl:error": 0.0,
                                     "route/pg_token_frac": 1.0, "route/fkl:key_token_frac": nz_sparse / n_resp,
                                     "route/rkl:error_token_frac": 0.0})


def test_fold_all_zero_gives_one_empty_pg_channel():
    mask = make_mask()
    names, weights, norms, _ = fold_channels([Channel("fkl:opd", mask.float(), norm="token", coef=0.0)], mask)
    assert names == ("pg",) and norms == ("agg",)
    assert torch.equal(weights, torch.zeros(1, 4, 5))


def test_fold_errors():
    mask = make_mask()
    with pytest.raises(ValueError, match="unique"):
        fold_channels([Channel("pg", mask.float()), Channel("pg", mask.float())], mask)
    with pytest.raises(ValueError, match="weights have shape \\(4, 4\\), expected \\(4, 5\\)"):
        fold_channels([Channel("pg", torch.ones(4, 4))], mask)


def test_method_output_from_channels_and_norm_validation():
    mask = make_mask()
    inputs = MethodInputs(rewards=torch.zeros(4), group_ids=torch.zeros(4, dtype=torch.long), response_mask=mask)
    out = MethodOutput.from_channels(inputs, [Channel("pg", torch.ones(4, 5)),
                                              Channel("mle:correct", torch.ones(4, 5), coef=2.0)],
                                     advantages=torch.tensor([1.0, 2.0, -1.0, 0.5]), metrics={"x/y": 3})
    out.validate(inputs)
    assert out.channel_norms == ("agg", "agg")
    assert torch.equal(out.advantages, torch.tensor([1.0, 2.0, -1.0, 0.5])[:, None] * mask.float())
    assert torch.equal(out.channel_weights[1], 2.0 * mask.float())
    assert out.metrics["x/y"] == 3.0 and isinstance(out.metrics["x/y"], float)
    out.channel_norms = ("agg",)
    with pytest.raises(ValueError, match="channel_norms must be empty or one of"):
        out.validate(inputs)
    out.channel_norms = ("agg", "mean")
    with pytest.raises(ValueError, match="channel_norms must be empty or one of"):
        out.validate(inputs)
    out.channel_norms = ()
    out.validate(inputs)  # empty = all "agg"
