"""The method registry: a method turns rewards (and whatever else it declares) into per-token
advantages and *channels*.

The driver never branches on the method's name. It looks the method up (``get_method(name)``),
gathers exactly the inputs the method ``needs`` (teacher top-k, annotations, ...), calls
:func:`compute_method`, and writes ``advantages`` / ``channel_names`` / ``channel_weights`` into the
batch. The learner then sums one loss per channel; nothing else knows which method runs.

``params`` is a plain dict of the algorithm config's fields (``adv_estimator``,
``norm_adv_by_std``, ``adv_eps``, ``singleton_group``, ...): this package never imports the
config module, so it stays pure torch and testable on its own.

A new method is one function::

    @register_method("my_method", needs=("teacher_topk",), description="...")
    def my_method(inputs: MethodInputs, params: dict) -> MethodOutput: ...
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from .advantages import ADVANTAGE_ESTIMATORS, get_advantage_estimator, zero_variance_mask
from .policy_loss import POLICY_LOSSES
from .registry import lookup, register_into

__all__ = [
    "KNOWN_NEEDS", "MethodSpec", "MethodInputs", "MethodOutput", "METHODS", "register_method",
    "get_method", "compute_method", "registry_names",
]

# Inputs a method may ask for beyond rewards / group ids / response mask. The driver knows how
# to produce each of these; a method asking for anything else is a bug caught at registration.
KNOWN_NEEDS = frozenset({"teacher_topk", "teacher_logprobs", "annotations", "prefix_tree", "entropy",
                         "reference"})


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, the extra inputs it needs, and a one-line description."""
    name: str
    fn: Callable[..., "MethodOutput"]
    needs: frozenset[str]
    description: str


@dataclass
class MethodInputs:
    """What a method receives. ``extra`` holds exactly the inputs named in the method's ``needs``."""
    rewards: Tensor  # [B] float
    group_ids: Tensor  # [B] long
    response_mask: Tensor  # [B, R] bool
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.response_mask.shape[0])

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the field whose shape or dtype is wrong."""
        m = self.response_mask
        if not isinstance(m, Tensor) or m.dim() != 2:
            raise ValueError("MethodInputs.response_mask must be a [B, R] tensor")
        if m.dtype != torch.bool:
            raise TypeError(f"MethodInputs.response_mask must be bool, got {m.dtype}; use .bool()")
        B = m.shape[0]
        if not isinstance(self.rewards, Tensor) or tuple(self.rewards.shape) != (B,):
            got = tuple(self.rewards.shape) if isinstance(self.rewards, Tensor) else type(self.rewards).__name__
            raise ValueError(f"MethodInputs.rewards has shape {got}, expected ({B},)")
        if not isinstance(self.group_ids, Tensor) or tuple(self.group_ids.shape) != (B,):
            got = tuple(self.group_ids.shape) if isinstance(self.group_ids, Tensor) else type(self.group_ids).__name__
            raise ValueError(f"MethodInputs.group_ids has shape {got}, expected ({B},)")
        if self.group_ids.dtype.is_floating_point or self.group_ids.dtype == torch.bool:
            raise TypeError(f"MethodInputs.group_ids must be integers, got {self.group_ids.dtype}; use .long()")


@dataclass
class MethodOutput:
    """What a method returns (written into the batch's advantages / channel fields)."""
    advantages: Tensor  # [B, R] float32, 0 outside the response
    channel_names: tuple[str, ...]  # ("pg",) for the GRPO family
    channel_weights: Tensor  # [C, B, R] float32, per-token weight of each channel (0 = not in it)
    metrics: dict[str, float] = field(default_factory=dict)

    def validate(self, inputs: MethodInputs) -> None:
        """Check shapes, dtypes and that nothing leaks outside the response; raise ValueError."""
        B, R = inputs.response_mask.shape
        if not isinstance(self.advantages, Tensor) or tuple(self.advantages.shape) != (B, R):
            raise ValueError(f"MethodOutput.advantages must be [{B}, {R}], got "
                             f"{getattr(self.advantages, 'shape', type(self.advantages).__name__)}")
        C = len(self.channel_names)
        if C == 0 or len(set(self.channel_names)) != C:
            raise ValueError(f"MethodOutput.channel_names must be non-empty and unique, got {self.channel_names}")
        if not isinstance(self.channel_weights, Tensor) or tuple(self.channel_weights.shape) != (C, B, R):
            raise ValueError(f"MethodOutput.channel_weights must be [{C}, {B}, {R}] for channel_names="
                             f"{self.channel_names}, got "
                             f"{getattr(self.channel_weights, 'shape', type(self.channel_weights).__name__)}")
        for name in ("advantages", "channel_weights"):
            t = getattr(self, name)
            if t.dtype != torch.float32:
                raise ValueError(f"MethodOutput.{name} must be float32, got {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"MethodOutput.{name} contains NaN or inf")
        outside = ~inputs.response_mask
        if bool((self.advantages[outside] != 0).any()) or bool((self.channel_weights[:, outside] != 0).any()):
            raise ValueError("MethodOutput has nonzero advantages or channel weights outside response_mask")


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, needs: Iterable[str] = (), description: str = ""):
    """Decorator: register ``fn(inputs: MethodInputs, params: dict) -> MethodOutput`` as ``name``.

    ``needs`` names the extra inputs the driver must provide (a subset of ``KNOWN_NEEDS``);
    ``description`` defaults to the first line of the function's docstring.
    """
    needs = frozenset(needs)
    unknown = needs - KNOWN_NEEDS
    if unknown:
        raise ValueError(f"method {name!r} needs unknown inputs {sorted(unknown)}; "
                         f"known: {', '.join(sorted(KNOWN_NEEDS))}")

    def deco(fn: Callable[..., MethodOutput]) -> Callable[..., MethodOutput]:
        desc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        register_into(METHODS, "method", name, MethodSpec(name=name, fn=fn, needs=needs, description=desc))
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name``; unknown names raise ValueError (also a KeyError)
    listing the registered ones."""
    return lookup(METHODS, "method", name)


def compute_method(method: str | MethodSpec, inputs: MethodInputs,
                   params: Mapping[str, Any] | None = None) -> MethodOutput:
    """Run a method with checks on both sides: the inputs' shapes, that ``inputs.extra`` holds
    everything the method needs, and the output's shapes / dtypes / zeros outside the response."""
    spec = get_method(method) if isinstance(method, str) else method
    inputs.validate()
    missing = spec.needs - set(inputs.extra)
    if missing:
        raise ValueError(f"method {spec.name!r} needs {sorted(missing)} in MethodInputs.extra "
                         f"(it declares needs={sorted(spec.needs)}); the driver must provide them")
    out = spec.fn(inputs, dict(params or {}))
    if not isinstance(out, MethodOutput):
        raise TypeError(f"method {spec.name!r} returned {type(out).__name__}, expected MethodOutput")
    out.validate(inputs)
    return out


def registry_names() -> dict[str, set[str]]:
    """Registered names: ``{"methods", "advantage_estimators", "policy_losses"}`` -> sets of names."""
    return {"methods": set(METHODS), "advantage_estimators": set(ADVANTAGE_ESTIMATORS),
            "policy_losses": set(POLICY_LOSSES)}


# ------------------------------------------------------------------------------ the GRPO family
# Config field -> estimator keyword argument. Passed only when the estimator declares the keyword,
# so "dr_grpo" (no options) and "grpo" can both be driven by the same config.
_PARAM_TO_ESTIMATOR_KWARG = {"norm_adv_by_std": "scale_by_std", "adv_eps": "eps", "singleton_group": "singleton"}


def _estimator_kwargs(estimator: Callable[..., Tensor], params: Mapping[str, Any]) -> dict[str, Any]:
    sig = inspect.signature(estimator).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())
    return {kw: params[key] for key, kw in _PARAM_TO_ESTIMATOR_KWARG.items()
            if key in params and (takes_any or kw in sig)}


def outcome_advantage_output(inputs: MethodInputs, seq_advantages: Tensor) -> MethodOutput:
    """One "pg" channel over the whole response, with a per-sequence advantage broadcast to its
    tokens. Shared by every method whose advantage is a function of the outcome only."""
    mask = inputs.response_mask
    w = mask.float()
    adv = seq_advantages.float()[:, None] * w
    zv = zero_variance_mask(inputs.rewards, inputs.group_ids)
    groups = torch.unique(inputs.group_ids)
    zv_groups = torch.unique(inputs.group_ids[zv])
    n_tok = int(mask.sum())
    metrics = {
        "adv/seq_mean": float(seq_advantages.float().mean()) if len(seq_advantages) else 0.0,
        "adv/seq_abs_mean": float(seq_advantages.float().abs().mean()) if len(seq_advantages) else 0.0,
        "adv/zero_variance_group_frac": zv_groups.numel() / max(groups.numel(), 1),
        "route/pg_token_frac": 1.0 if n_tok else 0.0,
    }
    return MethodOutput(advantages=adv, channel_names=("pg",), channel_weights=w[None].clone(), metrics=metrics)


def _grpo_family(inputs: MethodInputs, params: Mapping[str, Any], default_estimator: str) -> MethodOutput:
    est = get_advantage_estimator(params.get("adv_estimator") or default_estimator)
    seq_adv = est(inputs.rewards, inputs.group_ids, **_estimator_kwargs(est, params))
    return outcome_advantage_output(inputs, seq_adv)


@register_method("grpo", description=(
    "GRPO: group-normalised outcome advantage (r - mean) / (std + eps) on every response token, "
    "one 'pg' channel. params: adv_estimator (default grpo), norm_adv_by_std, adv_eps, singleton_group."))
def grpo_method(inputs: MethodInputs, params: dict) -> MethodOutput:
    """GRPO (arXiv 2402.03300): the estimator named by ``params['adv_estimator']`` (default "grpo")."""
    return _grpo_family(inputs, params, "grpo")


@register_method("dapo", description=(
    "DAPO: the same advantages and channel as grpo; its differences (clip-higher eps 0.2/0.28, "
    "token-mean aggregation, dropping zero-variance groups) are config defaults, not code here."))
def dapo_method(inputs: MethodInputs, params: dict) -> MethodOutput:
    """DAPO (arXiv 2503.14476): advantages as GRPO; the rest lives in the loss config and the driver."""
    return _grpo_family(inputs, params, "grpo")


@register_method("dr_grpo", description=(
    "Dr. GRPO: mean-centred outcome advantage r - mean (no std division) on every response token; "
    "pair it with loss_agg_mode=seq-mean-token-sum-norm. Always uses the dr_grpo estimator."))
def dr_grpo_method(inputs: MethodInputs, params: dict) -> MethodOutput:
    """Dr. GRPO (arXiv 2503.20783): ``r - mean_g``, ignoring ``params['adv_estimator']``."""
    est = get_advantage_estimator("dr_grpo")
    return outcome_advantage_output(inputs, est(inputs.rewards, inputs.group_ids))
