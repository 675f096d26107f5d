"""trace_rl/algo/methods.py (the method registry) and ``python -m trace_rl.algo``."""
from __future__ import annotations

import math
import runpy
import warnings

import pytest
import torch

from trace_rl.algo import methods as M
from trace_rl.algo import (MethodInputs, MethodOutput, compute_method, get_method, register_method,
                           registry_names)
from trace_rl.algo.__main__ import describe


def naive_seq_adv(rewards, gids, scale=True, eps=1e-6, singleton="unit"):
    """Per-sequence GRPO-family advantage with plain loops."""
    out = []
    for i, g in enumerate(gids):
        vals = [r for r, h in zip(rewards, gids) if h == g]
        if len(vals) == 1:
            out.append(0.0 if singleton == "zero" else (rewards[i] / (1 + eps) if scale else rewards[i]))
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        d = rewards[i] - mean
        out.append(0.0 if std == 0 else (d / (std + eps) if scale else d))
    return out


def make_inputs():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.25, 0.75, 3.0])
    gids = torch.tensor([7, 7, 7, 2, 2, 2, 5, 5, 9])  # group 2 all-equal, group 9 a singleton
    lengths = torch.tensor([4, 1, 6, 0, 3, 6, 2, 5, 6])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    return MethodInputs(rewards=rewards, group_ids=gids, response_mask=mask)


def expected_tokens(inputs, seq_adv):
    B, R = inputs.response_mask.shape
    return torch.tensor([[seq_adv[b] if inputs.response_mask[b, t] else 0.0 for t in range(R)] for b in range(B)])


def test_registry_names():
    names = registry_names()
    assert set(names) == {"methods", "advantage_estimators", "policy_losses"}
    assert {"grpo", "dapo", "dr_grpo"} <= names["methods"]
    assert {"grpo", "dr_grpo"} <= names["advantage_estimators"]
    assert "ppo_clip" in names["policy_losses"]
    assert all(isinstance(v, set) for v in names.values())


@pytest.mark.parametrize("name", ["grpo", "dapo"])
@pytest.mark.parametrize("params", [
    {},
    {"adv_estimator": "grpo", "norm_adv_by_std": True, "adv_eps": 1e-4, "singleton_group": "zero"},
    {"adv_estimator": "grpo", "norm_adv_by_std": False, "adv_eps": 1e-6, "singleton_group": "unit"},
    {"adv_estimator": "dr_grpo", "norm_adv_by_std": True, "adv_eps": 1e-6, "singleton_group": "unit",
     "clip_eps_high": 0.28},  # unrelated config fields are ignored
])
def test_grpo_and_dapo_follow_params(name, params):
    inputs = make_inputs()
    out = compute_method(name, inputs, params)
    if params.get("adv_estimator") == "dr_grpo":
        seq = naive_seq_adv(inputs.rewards.tolist(), inputs.group_ids.tolist(), scale=False, singleton="zero")
    else:
        seq = naive_seq_adv(inputs.rewards.tolist(), inputs.group_ids.tolist(),
                            scale=params.get("norm_adv_by_std", True), eps=params.get("adv_eps", 1e-6),
                            singleton=params.get("singleton_group", "unit"))
    torch.testing.assert_close(out.advantages, expected_tokens(inputs, seq), atol=1e-6, rtol=1e-6)
    assert out.advantages.dtype == torch.float32
    assert out.channel_names == ("pg",)
    assert out.channel_weights.shape == (1, 9, 6) and out.channel_weights.dtype == torch.float32
    assert torch.equal(out.channel_weights[0], inputs.response_mask.float())


def test_dapo_equals_grpo():
    inputs = make_inputs()
    a, b = compute_method("grpo", inputs, {}), compute_method("dapo", inputs, {})
    assert torch.equal(a.advantages, b.advantages) and torch.equal(a.channel_weights, b.channel_weights)
    assert "clip-higher" in get_method("dapo").description and "config" in get_method("dapo").description


def test_dr_grpo_method_is_mean_centred_regardless_of_adv_estimator():
    inputs = make_inputs()
    seq = naive_seq_adv(inputs.rewards.tolist(), inputs.group_ids.tolist(), scale=False, singleton="zero")
    for params in ({}, {"adv_estimator": "grpo", "norm_adv_by_std": True}):
        out = compute_method("dr_grpo", inputs, params)
        torch.testing.assert_close(out.advantages, expected_tokens(inputs, seq), atol=1e-6, rtol=0)


def test_metrics():
    out = compute_method("grpo", make_inputs(), {})
    m = out.metrics
    assert all(isinstance(v, float) for v in m.values())
    assert m["adv/zero_variance_group_frac"] == pytest.approx(2 / 4)  # group 2 and the singleton
    assert m["route/pg_token_frac"] == 1.0


def test_unknown_method_lists_names():
    with pytest.raises(ValueError) as info:
        get_method("trace_v2")
    assert "dapo, dr_grpo, grpo" in str(info.value)


def test_needs_are_checked_and_custom_method_roundtrip():
    with pytest.raises(ValueError, match="unknown inputs"):
        register_method("test_bad_needs", needs=("teacher_mind",))
    with pytest.raises(ValueError, match="already registered"):
        register_method("grpo")(lambda i, p: None)
    try:
        @register_method("test_kl_only", needs=("teacher_logprobs",))
        def kl_only(inputs: MethodInputs, params: dict) -> MethodOutput:
            """Test method: a single distillation channel weighted by the teacher logprob."""
            w = inputs.response_mask.float()
            weight = (-inputs.extra["teacher_logprobs"]).clamp(min=0) * w
            return MethodOutput(advantages=torch.zeros_like(w), channel_names=("kl",),
                                channel_weights=weight[None], metrics={})

        spec = get_method("test_kl_only")
        assert spec.needs == frozenset({"teacher_logprobs"})
        assert spec.description.startswith("Test method")
        assert "test_kl_only" in registry_names()["methods"]
        inputs = make_inputs()
        with pytest.raises(ValueError, match="needs \\['teacher_logprobs'\\]"):
            compute_method("test_kl_only", inputs)
        inputs.extra["teacher_logprobs"] = -torch.rand(9, 6)
        out = compute_method("test_kl_only", inputs)
        assert out.channel_names == ("kl",)
        assert "test_kl_only" in describe() and "teacher_logprobs" in describe()
    finally:
        M.METHODS.pop("test_kl_only", None)


def test_output_validation_catches_bad_methods():
    inputs = make_inputs()
    B, R = inputs.response_mask.shape
    good_w = inputs.response_mask.float()[None]
    bad = {
        "advantages must be": MethodOutput(torch.zeros(B), ("pg",), good_w),
        "channel_weights must be": MethodOutput(torch.zeros(B, R), ("pg", "kl"), good_w),
        "float32": MethodOutput(torch.zeros(B, R, dtype=torch.float64), ("pg",), good_w),
        "outside response_mask": MethodOutput(torch.ones(B, R), ("pg",), good_w),
        "NaN": MethodOutput(torch.full((B, R), float("nan")), ("pg",), good_w),
    }
    for msg, output in bad.items():
        spec = M.MethodSpec(name="test_bad", fn=lambda i, p, o=output: o, needs=frozenset(), description="")
        with pytest.raises(ValueError, match=msg):
            compute_method(spec, inputs)


def test_input_validation():
    inputs = make_inputs()
    inputs.response_mask = inputs.response_mask.float()
    with pytest.raises(TypeError, match="response_mask must be bool"):
        compute_method("grpo", inputs)
    inputs = make_inputs()
    inputs.rewards = inputs.rewards[:-1]
    with pytest.raises(ValueError, match="MethodInputs.rewards has shape"):
        compute_method("grpo", inputs)


def test_describe_and_cli(capsys):
    text = describe()
    for word in ("grpo", "dapo", "dr_grpo", "ppo_clip", "needs: rewards only", "Advantage estimators",
                 "Policy losses", "singleton='unit'"):
        assert word in text
    # what `python -m trace_rl.algo` does, in-process (a subprocess would re-import torch: seconds)
    with warnings.catch_warnings():  # "__main__ already in sys.modules": we imported describe from it
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module("trace_rl.algo", run_name="__main__", alter_sys=False)
    assert capsys.readouterr().out.strip() == text.strip()
