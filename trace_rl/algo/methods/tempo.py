"""TEMPO: GRPO plus branch-gated TD corrections from the group's prefix tree (Prefix-to-Tree,
arXiv 2509.18314).

The responses of a group form a prefix tree. The value of a prefix is the mean reward of the group
members whose response starts with it (a member that ends exactly there counts); the root (empty
prefix) is the whole group. For token ``t`` of response ``i``, with ``s_t = y_i[:t]``:

  A_it = A_i^GRPO + tempo_td_coef * (V(s_{t+1}) - V(s_t)) / scale_g

``scale_g = std_g + adv_eps`` when the configured estimator divides by the group std, else 1 (the
same scale as the GRPO term). The TD term is 0 wherever the tree does not branch (the node at
``s_{t+1}`` holds the same members as ``s_t``), so TEMPO is GRPO off branching tokens; it is 0 for
zero-variance groups and groups of one. As in the reference code, the root counts as a node: when
the first tokens of a group differ, token 0 gets ``(r_i - mean_g) / scale_g`` extra.

Difference from the reference code: there a member that ended before position t is compared by its
padding token; here it simply is not in the child node (it still counts in the parent, which it
reached).

The tree is built without Python loops over tokens: each prefix gets a double polynomial hash
(cumulative sums of ``(y_t + 1) * base^t`` modulo two primes), nodes are the unique
``(group, depth, hash)`` triples, and the result is verified (every node's members share their
parent node and last token); a hash collision, which that check catches, falls back to an exact
per-depth construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..advantages import group_stats, zero_variance_mask
from ..channels import Channel
from .base import MethodInputs, MethodOutput, param_float, register_method
from .grpo import GRPOParams, grpo_seq_advantages, grpo_std_scaled, outcome_metrics

__all__ = ["prefix_node_ids", "prefix_values", "tempo_method"]

_HASHES = ((1_000_000_007, 911_382_323), (998_244_353, 972_663_749))  # (prime modulus, base)


def _check_prefix_mask(mask: Tensor) -> Tensor:
    lengths = mask.sum(dim=1)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]):
        raise ValueError("response_mask must be right-padded (each row's tokens a prefix of the row) for the "
                         "prefix tree")
    return lengths


def _hash_prefixes(ids: Tensor, mask: Tensor, hashes) -> Tensor:
    """[B, R] int64 key of every prefix ``y_i[:t+1]`` (two polynomial hashes packed in one int)."""
    R = ids.shape[1]
    tok = torch.where(mask, ids.long(), torch.zeros_like(ids, dtype=torch.long)) + 1
    key = torch.zeros(ids.shape, dtype=torch.long, device=ids.device)
    for mod, base in hashes:
        pw, p = [], 1
        for _ in range(R):
            pw.append(p)
            p = p * base % mod
        terms = (tok % mod) * torch.tensor(pw, dtype=torch.long, device=ids.device) % mod  # < 2^60
        key = key * (1 << 30) + terms.cumsum(dim=1) % mod  # cumsum < R * 2^30: fits int64
    return key


def _dense(rows: Tensor) -> Tensor:
    """Dense ids of the distinct rows of a [N, k] tensor."""
    return torch.unique(rows, dim=0, return_inverse=True)[1] if rows.numel() else rows.new_zeros(0)


def _exact_node_ids(ids: Tensor, mask: Tensor, ginv: Tensor) -> Tensor:
    """Exact node ids, one depth at a time: node(i, t) = unique (node(i, t-1), y_it)."""
    B, R = ids.shape
    node = torch.full((B, R), -1, dtype=torch.long, device=ids.device)
    parent, offset = -1 - ginv, 0  # the root of each group
    for t in range(R):
        rows = mask[:, t]
        if not bool(rows.any()):
            break
        d = _dense(torch.stack([parent[rows], ids[rows, t].long()], dim=1))
        node[rows, t] = d + offset
        offset += int(d.max()) + 1
        parent = node[:, t]
    return node


def prefix_node_ids(response_ids: Tensor, response_mask: Tensor, group_ids: Tensor, *, _hashes=_HASHES) -> Tensor:
    """[B, R] long: the id of the prefix-tree node ``(group, y_i[:t+1])`` at every response token
    (-1 on padding). Two tokens share an id iff same group, same depth and same prefix."""
    mask = response_mask.bool()
    _check_prefix_mask(mask)
    _, ginv = torch.unique(group_ids, return_inverse=True)
    B, R = mask.shape
    depth = torch.arange(R, device=mask.device).expand(B, R)
    key = _hash_prefixes(response_ids, mask, _hashes)
    node = torch.full((B, R), -1, dtype=torch.long, device=mask.device)
    node[mask] = _dense(torch.stack([ginv[:, None].expand(B, R)[mask], depth[mask], key[mask]], dim=1))
    # verify: every node's members share the parent node and the last token (induction from the root)
    parent = torch.cat([(-1 - ginv)[:, None], node[:, :-1]], dim=1)[mask]
    tok, nid = response_ids.long()[mask], node[mask]
    for x in (parent, tok):
        n_nodes = int(nid.max()) + 1 if nid.numel() else 0
        lo = x.new_full((n_nodes,), torch.iinfo(torch.long).max).scatter_reduce(0, nid, x, "amin")
        hi = x.new_full((n_nodes,), torch.iinfo(torch.long).min).scatter_reduce(0, nid, x, "amax")
        if not torch.equal(lo, hi):
            return _exact_node_ids(response_ids, mask, ginv)  # a hash collision: rebuild exactly
    return node


def prefix_values(node: Tensor, rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(V_node, V_parent, n_node, n_parent)``, each [B, R] (float64 / long; 0 on padding): the mean
    reward and member count of the node at each token and of its parent (the root for t = 0)."""
    valid = node >= 0
    B, R = node.shape
    r = rewards.double()[:, None].expand(B, R)
    n_nodes = int(node.max()) + 1 if bool(valid.any()) else 0
    nid = node[valid]
    s = torch.zeros(n_nodes, dtype=torch.float64, device=node.device).index_add_(0, nid, r[valid])
    c = torch.zeros(n_nodes, dtype=torch.long, device=node.device).index_add_(0, nid, torch.ones_like(nid))
    v_node = torch.zeros(B, R, dtype=torch.float64, device=node.device)
    n_node = torch.zeros(B, R, dtype=torch.long, device=node.device)
    v_node[valid], n_node[valid] = s[nid] / c[nid], c[nid]
    g_mean, _, g_size = group_stats(rewards.double(), group_ids)
    v_par = torch.cat([g_mean[:, None], v_node[:, :-1]], dim=1) * valid
    n_par = torch.cat([g_size[:, None], n_node[:, :-1]], dim=1) * valid
    return v_node, v_par, n_node, n_par


@dataclass
class TempoParams(GRPOParams):
    tempo_td_coef: float = 1.0
    """TEMPO: weight of the branch-gated TD correction added to the GRPO advantage."""


@register_method(
    "tempo", needs=("prefix_tree",), params=TempoParams,
    description=("TEMPO: GRPO plus branch-gated TD corrections V(child) - V(parent) from the prefix tree of "
                 "the group's responses (V = mean reward of the members sharing the prefix); one 'pg' channel."))
def tempo_method(inputs: MethodInputs, params: dict) -> MethodOutput:
    """TEMPO (arXiv 2509.18314): token advantage = GRPO + coef * TD(prefix tree) / group scale."""
    coef = param_float(params, "tempo_td_coef", lo=0.0)
    mask = inputs.response_mask
    seq_adv = grpo_seq_advantages(inputs, params)
    node = prefix_node_ids(inputs.extra["response_ids"], mask, inputs.group_ids)
    v_node, v_par, n_node, n_par = prefix_values(node, inputs.rewards, inputs.group_ids)
    td = v_node - v_par
    td = torch.where(zero_variance_mask(inputs.rewards, inputs.group_ids)[:, None] | ~mask, torch.zeros_like(td), td)
    if grpo_std_scaled(params):
        _, std, _ = group_stats(inputs.rewards, inputs.group_ids)
        td = td / (std.double() + param_float(params, "adv_eps", lo=0.0))[:, None].clamp(min=1e-12)
    adv = seq_adv.double()[:, None] + coef * td
    branch = mask & (n_node < n_par)
    n_resp = max(int(mask.sum()), 1)
    metrics = {**outcome_metrics(inputs, seq_adv), "tempo/branch_token_frac": float(branch.sum()) / n_resp,
               "tempo/td_abs_mean": float(td.abs().sum()) / n_resp}
    return MethodOutput.from_channels(inputs, [Channel("pg", mask.float())], advantages=adv.float(), metrics=metrics)
