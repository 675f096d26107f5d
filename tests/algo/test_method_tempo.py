"""trace_rl/algo/methods/tempo.py against a naive O(n^2) prefix-tree reference."""
from __future__ import annotations

import math

import pytest
import torch

from tests.algo.test_methods import naive_seq_adv, random_inputs
from trace_rl.algo import compute_method
from trace_rl.algo.methods import tempo as tempo_module
from trace_rl.algo.methods.tempo import prefix_node_ids


def naive_tempo(inputs, coef=1.0, scale_by_std=True, eps=1e-6):
    """A_it = GRPO_i + coef * (V(y_i[:t+1]) - V(y_i[:t])) / (std_g + eps), V(prefix) = mean reward of the
    group members whose response starts with the prefix; 0 for all-equal groups."""
    m, ids = inputs.response_mask, inputs.extra["response_ids"]
    r, gids = inputs.rewards.tolist(), inputs.group_ids.tolist()
    B, R = m.shape
    seq = naive_seq_adv(r, gids, scale=scale_by_std, eps=eps)
    resp = [[int(ids[b, t]) for t in range(R) if m[b, t]] for b in range(B)]

    def value(g, prefix):
        vals = [r[k] for k in range(B)
                if gids[k] == g and len(resp[k]) >= len(prefix) and resp[k][:len(prefix)] == prefix]
        return sum(vals) / len(vals)

    out = [[0.0] * R for _ in range(B)]
    for b in range(B):
        group = [r[k] for k in range(B) if gids[k] == gids[b]]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1)) if len(group) > 1 else 0.0
        flat = max(group) == min(group)
        for t in range(len(resp[b])):
            td = 0.0 if flat else value(gids[b], resp[b][:t + 1]) - value(gids[b], resp[b][:t])
            out[b][t] = seq[b] + coef * (td / (std + eps) if scale_by_std else td)
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("params", [{}, {"tempo_td_coef": 0.5}, {"norm_adv_by_std": False},
                                    {"adv_estimator": "dr_grpo"}])
def test_matches_naive(seed, params):
    inputs = random_inputs(seed, vocab=2)
    out = compute_method("tempo", inputs, params)
    scaled = params.get("norm_adv_by_std", True) and params.get("adv_estimator", "grpo") == "grpo"
    want = naive_tempo(inputs, params.get("tempo_td_coef", 1.0), scale_by_std=scaled)
    torch.testing.assert_close(out.advantages, want, atol=1e-5, rtol=1e-5)
    assert out.channel_names == ("pg",)
    assert torch.equal(out.channel_weights[0], inputs.response_mask.float())
    assert out.metrics["tempo/branch_token_frac"] > 0


def test_td_is_zero_off_branching_tokens():
    inputs = random_inputs(5, vocab=2)
    out, grpo = compute_method("tempo", inputs), compute_method("grpo", inputs)
    node = prefix_node_ids(inputs.extra["response_ids"], inputs.response_mask, inputs.group_ids)
    m = inputs.response_mask
    count = {int(n): int((node == n).sum()) for n in node[m].unique()}
    for b in range(m.shape[0]):
        group_size = int((inputs.group_ids == inputs.group_ids[b]).sum())
        for t in range(int(m[b].sum())):
            parent = group_size if t == 0 else count[int(node[b, t - 1])]
            if count[int(node[b, t])] == parent:  # no branching here
                assert float(out.advantages[b, t]) == pytest.approx(float(grpo.advantages[b, t]), abs=1e-6)


def test_equals_grpo_without_branching():
    """Identical responses within each group (and groups of one): the tree never branches."""
    inputs = random_inputs(6, groups=(3, 1, 4, 2))
    for g in inputs.group_ids.unique():
        rows = (inputs.group_ids == g).nonzero().flatten()
        inputs.extra["response_ids"][rows] = inputs.extra["response_ids"][rows[0]].clone()
        inputs.response_mask[rows] = inputs.response_mask[rows[0]].clone()
    out, grpo = compute_method("tempo", inputs), compute_method("grpo", inputs)
    assert torch.equal(out.advantages, grpo.advantages)
    assert out.metrics["tempo/branch_token_frac"] == 0.0


def test_distinct_first_tokens_differ_from_grpo_only_at_the_root():
    """No two responses share a non-empty prefix: the root is the only branching node."""
    inputs = random_inputs(7, groups=(3, 4, 2))
    B, R = inputs.response_mask.shape
    inputs.response_mask[:] = True
    inputs.extra["response_ids"] = torch.arange(B)[:, None] * 10 + torch.arange(R)[None, :]  # all distinct
    out, grpo = compute_method("tempo", inputs), compute_method("grpo", inputs)
    torch.testing.assert_close(out.advantages[:, 1:], grpo.advantages[:, 1:], atol=0, rtol=0)
    torch.testing.assert_close(out.advantages[:, 0], 2 * grpo.advantages[:, 0], atol=1e-5, rtol=1e-5)


def naive_same_node(inputs, b, t, k, s):
    m, ids = inputs.response_mask, inputs.extra["response_ids"]
    return (int(inputs.group_ids[b]) == int(inputs.group_ids[k]) and t == s
            and all(int(ids[b, j]) == int(ids[k, j]) for j in range(t + 1)) and bool(m[b, t]) and bool(m[k, s]))


@pytest.mark.parametrize("hashes", [None, ((2, 1),)])  # a 2-bucket hash collides: the exact fallback runs
def test_node_ids_partition_tokens_by_prefix(hashes, monkeypatch):
    inputs = random_inputs(8, vocab=3, R=6)
    kw = {} if hashes is None else {"_hashes": hashes}
    calls = []
    exact = tempo_module._exact_node_ids
    monkeypatch.setattr(tempo_module, "_exact_node_ids", lambda *a: calls.append(1) or exact(*a))
    node = prefix_node_ids(inputs.extra["response_ids"], inputs.response_mask, inputs.group_ids, **kw)
    assert len(calls) == (0 if hashes is None else 1)
    B, R = node.shape
    assert bool((node[~inputs.response_mask] == -1).all())
    for b in range(B):
        for t in range(R):
            for k in range(B):
                for s in range(R):
                    if inputs.response_mask[b, t] and inputs.response_mask[k, s]:
                        assert (int(node[b, t]) == int(node[k, s])) == naive_same_node(inputs, b, t, k, s)


def test_rejects_left_padding():
    inputs = random_inputs(0)
    inputs.response_mask[0, 0] = False
    with pytest.raises(ValueError, match="right-padded"):
        compute_method("tempo", inputs)
