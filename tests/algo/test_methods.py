"""trace_rl/algo/methods/ (the method registry, every method's generic contract) and
``python -m trace_rl.algo``. Each method's formula is tested in tests/algo/test_method_<name>.py."""
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
    assert "dapo, div_weighted, dr_grpo, grpo, scope, self_opd, tempo, tip, trace" in str(info.value)


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
                 "Policy losses", "singleton='unit'", "trace  [needs: annotations*, teacher_topk*]",
                 "trace_lambda=hold_linear(start=0.5, end=0.0, hold_steps=10, decay_steps=30)",
                 "tempo  [needs: prefix_tree]", "scope_weighting='paper'", "overrides: filter_zero_variance=False",
                 "Schedules", "hold_linear", "Aggregation modes", "balanced", "seq-mean-token-sum-norm"):
        assert word in text
    # what `python -m trace_rl.algo` does, in-process (a subprocess would re-import torch: seconds)
    with warnings.catch_warnings():  # "__main__ already in sys.modules": we imported describe from it
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module("trace_rl.algo", run_name="__main__", alter_sys=False)
    assert capsys.readouterr().out.strip() == text.strip()


# ------------------------------------------------------------------ every method: the shared contract
ALL_METHODS = {"grpo", "dapo", "dr_grpo", "self_opd", "trace", "scope", "tempo", "tip", "div_weighted"}


def random_inputs(seed, groups=(4, 3, 5, 1, 2, 3), R=7, vocab=3, K=4):
    """A batch with interleaved, non-contiguous group ids, binary rewards, ragged responses and every
    extra input a method can need. A small vocabulary makes responses share prefixes (TEMPO)."""
    g = torch.Generator().manual_seed(seed)
    gids = torch.cat([torch.full((n,), 10 * k + 3) for k, n in enumerate(groups)])
    B = len(gids)
    gids = gids[torch.randperm(B, generator=g)]
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    lengths = torch.randint(0, R + 1, (B,), generator=g)
    lengths[0] = R
    mask = torch.arange(R)[None, :] < lengths[:, None]
    extra = {
        "teacher_topk_ids": torch.randint(0, 50, (B, R, K), generator=g),
        "teacher_topk_logprobs": -torch.rand(B, R, K, generator=g) * 3,
        "teacher_logprobs": -torch.rand(B, R, generator=g) * 3,
        "key_mask": torch.rand(B, R, generator=g) < 0.3,
        "error_mask": torch.rand(B, R, generator=g) < 0.3,
        "entropy": torch.rand(B, R, generator=g) * 2,
        "response_ids": torch.randint(0, vocab, (B, R), generator=g),
        "ref_logprobs": -torch.rand(B, R, generator=g) * 3,
    }
    return MethodInputs(rewards=rewards, group_ids=gids, response_mask=mask, extra=extra,
                        behaviour_logprobs=-torch.rand(B, R, generator=g) * 3)


def permuted(inputs, perm):
    return MethodInputs(rewards=inputs.rewards[perm], group_ids=inputs.group_ids[perm],
                        response_mask=inputs.response_mask[perm], extra={k: v[perm] for k, v in inputs.extra.items()},
                        behaviour_logprobs=inputs.behaviour_logprobs[perm])


def test_all_methods_registered_with_declared_parameters():
    assert ALL_METHODS <= set(M.METHODS)
    for name in ALL_METHODS:
        spec = get_method(name)
        assert spec.gated_needs <= spec.needs
        assert "step" not in spec.defaults
        assert spec.description


def test_parameter_defaults_agree_across_methods():
    """One flat config holds every method's parameters: a name shared by two methods must have one default."""
    seen = {}
    for name in sorted(ALL_METHODS):
        for key, value in get_method(name).defaults.items():
            if key in seen:
                assert seen[key][1] == value, f"{key}: {seen[key][0]} has {seen[key][1]!r}, {name} has {value!r}"
            seen[key] = (name, value)


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
@pytest.mark.parametrize("step", [0, 20, 100])
def test_every_method_runs_reports_channel_metrics_and_is_batch_order_independent(name, step):
    inputs = random_inputs(step + 1)
    out = compute_method(name, inputs, {"step": step})
    assert len(out.channel_norms) == len(out.channel_names)
    for ch in out.channel_names:
        assert f"route/{ch}_token_frac" in out.metrics and f"coef/{ch}" in out.metrics
    assert all(isinstance(v, float) for v in out.metrics.values())
    perm = torch.randperm(inputs.batch_size, generator=torch.Generator().manual_seed(5))
    out_p = compute_method(name, permuted(inputs, perm), {"step": step})
    assert out_p.channel_names == out.channel_names and out_p.channel_norms == out.channel_norms
    torch.testing.assert_close(out_p.advantages, out.advantages[perm], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_p.channel_weights, out.channel_weights[:, perm], rtol=1e-6, atol=1e-6)


def test_scheduled_methods_need_the_step():
    for name in ("self_opd", "trace", "scope", "tip"):
        with pytest.raises(ValueError, match="needs params\\['step'\\]"):
            compute_method(name, random_inputs(0), {})


def test_teacher_active_and_gated_needs():
    off_at_5 = {"name": "hold_linear", "start": 1.0, "hold_steps": 2, "decay_steps": 3}
    for name, key in (("self_opd", "opd_coef"), ("trace", "trace_lambda"), ("scope", "scope_kl_coef"),
                      ("tip", "tip_coef")):
        spec = get_method(name)
        params = {key: off_at_5}
        assert [spec.teacher_active(s, params) for s in (0, 4, 5, 50)] == [True, True, False, False], name
        assert spec.needs_at(4, params) == spec.needs
        assert not (spec.needs_at(5, params) & {"teacher_topk", "teacher_logprobs"})
        # the driver stops calling the teacher (and TRACE's annotator): the method still runs without them
        inputs = random_inputs(3)
        for need in spec.gated_needs:
            for key_ in M.KNOWN_NEEDS[need]:
                inputs.extra.pop(key_)
        out = compute_method(name, inputs, {**params, "step": 5})
        assert not any(n.split(":")[0] in ("fkl", "rkl", "jsd", "skl", "logratio") for n in out.channel_names)
        with pytest.raises(ValueError, match="needs \\["):
            compute_method(name, inputs, {**params, "step": 4})
    assert get_method("trace").teacher_active(40, {}) is False  # the default schedule: 0 from step 40
    assert get_method("trace").teacher_active(39, {}) is True
    assert get_method("trace").teacher_active(0, {"trace_key_kl": False, "trace_error_kl": False}) is False
    assert get_method("div_weighted").teacher_active(10 ** 6, {}) is True
    assert not any(get_method(n).teacher_active(0, {}) for n in ("grpo", "dapo", "dr_grpo", "tempo"))


def test_bad_parameters_name_themselves():
    inputs = random_inputs(1)
    for name, params, msg in [
        ("trace", {"trace_key_kl": "yes"}, "trace_key_kl must be true or false"),
        ("trace", {"trace_lambda": {"name": "linear"}}, "unknown schedule 'linear'"),
        ("self_opd", {"opd_divergence": "kl"}, "opd_divergence must be one of"),
        ("scope", {"scope_weighting": "both"}, "scope_weighting must be one of"),
        ("scope", {"scope_tau": 0.0}, "scope_tau must be a finite number"),
        ("tip", {"tip_budget": 1.5}, "tip_budget must be a finite number in \\[0.0, 1.0\\]"),
        ("div_weighted", {"div_weight_mix": -1}, "div_weight_mix must be"),
        ("tempo", {"tempo_td_coef": float("nan")}, "tempo_td_coef must be"),
    ]:
        with pytest.raises(ValueError, match=msg):
            compute_method(name, inputs, {"step": 0, **params})
    inputs.behaviour_logprobs = None
    with pytest.raises(ValueError, match="needs MethodInputs.behaviour_logprobs"):
        compute_method("div_weighted", inputs, {"step": 0})


def test_extra_inputs_are_validated():
    inputs = random_inputs(1)
    inputs.extra["key_mask"] = inputs.extra["key_mask"].float()
    with pytest.raises(TypeError, match="extra\\['key_mask'\\] must be bool"):
        compute_method("trace", inputs, {"step": 0})
    inputs = random_inputs(1)
    inputs.extra["teacher_topk_ids"] = inputs.extra["teacher_topk_ids"][:, :, 0]
    with pytest.raises(ValueError, match="teacher_topk_ids'\\] has shape"):
        compute_method("self_opd", inputs, {"step": 0})
    inputs = random_inputs(1)
    inputs.behaviour_logprobs = inputs.behaviour_logprobs[:, :3]
    with pytest.raises(ValueError, match="behaviour_logprobs has shape"):
        compute_method("grpo", inputs)
