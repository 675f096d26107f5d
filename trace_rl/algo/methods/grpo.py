"""The GRPO family (grpo, dapo, dr_grpo): one ``"pg"`` channel of weight 1 on every response token,
with a per-sequence outcome advantage broadcast to its tokens. Other methods reuse
:func:`grpo_seq_advantages` for their policy-gradient part."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..advantages import get_advantage_estimator, zero_variance_mask
from ..channels import Channel
from .base import MethodInputs, MethodOutput, params_from_dataclass, register_method

__all__ = ["GRPOParams", "GRPO_DEFAULTS", "grpo_seq_advantages", "grpo_std_scaled", "outcome_advantage_output",
           "grpo_method", "dapo_method", "dr_grpo_method"]

@dataclass
class GRPOParams:
    """The group-advantage parameters, shared by every method that computes a GRPO advantage (its own
    parameter dataclass derives from this one)."""
    adv_estimator: str = "grpo"
    """Group advantage estimator: grpo ((r - mean) / (std + eps)) or dr_grpo (r - mean); see
    ``python -m trace_rl.algo``."""
    norm_adv_by_std: bool = True
    """GRPO: divide by the group's unbiased std (False = Dr.GRPO-style centring only)."""
    adv_eps: float = 1e-6
    """GRPO: added to the group std (verl 1e-6, TRL 1e-4)."""
    singleton_group: str = "unit"
    """GRPO advantage of a group of one: 'unit' (verl: mean 0, std 1) or 'zero' (TRL)."""


GRPO_DEFAULTS: dict[str, Any] = params_from_dataclass(GRPOParams)

# Config field -> estimator keyword argument. Passed only when the estimator declares the keyword,
# so "dr_grpo" (no options) and "grpo" can both be driven by the same config.
_PARAM_TO_ESTIMATOR_KWARG = {"norm_adv_by_std": "scale_by_std", "adv_eps": "eps", "singleton_group": "singleton"}


def _estimator_kwargs(estimator: Callable[..., Tensor], params: Mapping[str, Any]) -> dict[str, Any]:
    sig = inspect.signature(estimator).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())
    return {kw: params[key] for key, kw in _PARAM_TO_ESTIMATOR_KWARG.items()
            if key in params and (takes_any or kw in sig)}


def grpo_seq_advantages(inputs: MethodInputs, params: Mapping[str, Any], default_estimator: str = "grpo") -> Tensor:
    """Per-sequence advantage [B] from the estimator named by ``params['adv_estimator']``."""
    est = get_advantage_estimator(params.get("adv_estimator") or default_estimator)
    return est(inputs.rewards, inputs.group_ids, **_estimator_kwargs(est, params))


def grpo_std_scaled(params: Mapping[str, Any], default_estimator: str = "grpo") -> bool:
    """Whether the configured estimator divides by the group std (it takes ``scale_by_std`` and it is on)."""
    est = get_advantage_estimator(params.get("adv_estimator") or default_estimator)
    sig = inspect.signature(est).parameters
    if "scale_by_std" not in sig:
        return False
    return bool(_estimator_kwargs(est, params).get("scale_by_std", sig["scale_by_std"].default))


def outcome_advantage_output(inputs: MethodInputs, seq_advantages: Tensor) -> MethodOutput:
    """One "pg" channel over the whole response, with a per-sequence advantage broadcast to its
    tokens. Shared by every method whose advantage is a function of the outcome only."""
    return MethodOutput.from_channels(inputs, [Channel("pg", inputs.response_mask.float())],
                                      advantages=seq_advantages, metrics=outcome_metrics(inputs, seq_advantages))


def outcome_metrics(inputs: MethodInputs, seq_advantages: Tensor) -> dict[str, float]:
    """``adv/seq_mean``, ``adv/seq_abs_mean``, ``adv/zero_variance_group_frac``."""
    seq = seq_advantages.float()
    zv = zero_variance_mask(inputs.rewards, inputs.group_ids)
    n_groups = torch.unique(inputs.group_ids).numel()
    return {"adv/seq_mean": float(seq.mean()) if len(seq) else 0.0,
            "adv/seq_abs_mean": float(seq.abs().mean()) if len(seq) else 0.0,
            "adv/zero_variance_group_frac": torch.unique(inputs.group_ids[zv]).numel() / max(n_groups, 1)}


@register_method("grpo", params=GRPOParams, description=(
    "GRPO: group-normalised outcome advantage (r - mean) / (std + eps) on every response token, "
    "one 'pg' channel."))
def grpo_method(inputs: MethodInputs, params: dict) -> MethodOutput:
    """GRPO (arXiv 2402.03300): the estimator named by ``params['adv_estimator']`` (default "grpo")."""
    return outcome_advantage_output(inputs, grpo_seq_advantages(inputs, params))


@register_method("dapo", params=GRPOParams, description=(
    "DAPO: the same advantages and channel as grpo; its differences (clip-higher eps 0.2/0.28, "
    "token-mean aggregation, dropping zero-variance groups) are config defaults, not code here."))
def dapo_method(inputs: MethodInputs, params: dict) -> MethodOutput:
    """DAPO (arXiv 2503.14476): advantages as GRPO; the rest lives in the loss config and the driver."""
    return outcome_advantage_output(inputs, grpo_seq_advantages(inputs, params))


@register_method("dr_grpo", description=(
    "Dr. GRPO: mean-centred outcome advantage r - mean (no std division) on every response token; "
    "pair it with loss_agg_mode=seq-mean-token-sum-norm. Always uses the dr_grpo estimator."))
def dr_grpo_method(inputs: MethodInputs, params: dict) -> MethodOutput:
    """Dr. GRPO (arXiv 2503.20783): ``r - mean_g``, ignoring ``params['adv_estimator']``."""
    est = get_advantage_estimator("dr_grpo")
    return outcome_advantage_output(inputs, est(inputs.rewards, inputs.group_ids))
