"""The method registry: a method turns rewards (and whatever else it declares) into per-token
advantages and *channels* (see :mod:`trace_rl.algo.channels`).

The driver never branches on the method's name. It looks the method up (``get_method(name)``),
gathers exactly the inputs the method ``needs`` (teacher top-k, annotations, ...), asks
``spec.teacher_active(step, params)`` whether the teacher must be called at all this step, calls
:func:`compute_method`, and writes ``advantages`` / ``channel_names`` / ``channel_weights`` /
``channel_norms`` into the batch. The learner sums one loss per channel; nothing else knows which
method runs.

``params`` is a plain dict of the algorithm config's fields; it always holds ``"step"`` (the current
training step, 0-based) when a method has a schedule. Every method declares its own parameters ONCE,
in its own file, as a dataclass whose fields carry the type, the default and (in the string under
each field) the documentation. ``trace_rl.config`` builds the ``algorithm`` config section from these
declarations (:func:`method_param_fields`), so ``algorithm.<param>=...`` works on the command line,
``trace-rl --help`` documents it and OmegaConf checks its type; the method checks the values when it
runs (the config's dry run calls it once before anything starts). ``MethodSpec.defaults`` holds the
same defaults as a plain dict (merged under ``params`` by :func:`compute_method`);
``MethodSpec.overrides`` lists shared algorithm fields whose global default does not suit the method
(e.g. ``filter_zero_variance`` for distillation).

A new method is one file in this package (imported automatically) plus ``conf/algorithm/<name>.yaml``::

    @dataclass
    class MyParams:
        my_coef: float = 1.0
        "What it scales (the string under a field is its documentation)."

    @register_method("my_method", needs=("teacher_topk",), params=MyParams)
    def my_method(inputs: MethodInputs, params: dict) -> MethodOutput: ...
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..advantages import ADVANTAGE_ESTIMATORS
from ..channels import CHANNEL_NORMS, Channel, fold_channels
from ..policy_loss import POLICY_LOSSES
from ..registry import lookup, register_into
from ..schedules import Schedule

__all__ = [
    "KNOWN_NEEDS", "TEACHER_NEEDS", "MethodSpec", "MethodInputs", "MethodOutput", "METHODS", "register_method",
    "get_method", "compute_method", "registry_names", "param_choice", "param_bool", "param_float",
    "param_schedule", "param_step", "ParamField", "method_param_fields", "params_from_dataclass", "attribute_docs",
]

# Inputs a method may ask for beyond rewards / group ids / response mask / behaviour log-probs, and
# the MethodInputs.extra keys each one fills. The driver knows how to produce each of these.
KNOWN_NEEDS: Mapping[str, tuple[str, ...]] = {
    "teacher_topk": ("teacher_topk_ids", "teacher_topk_logprobs"),
    "teacher_logprobs": ("teacher_logprobs",),
    "annotations": ("key_mask", "error_mask"),
    "entropy": ("entropy",),
    "prefix_tree": ("response_ids",),
    "reference": ("ref_logprobs",),
}
TEACHER_NEEDS = frozenset({"teacher_topk", "teacher_logprobs"})

# extra key -> (dtype check, trailing-dims description) for MethodInputs.validate
_EXTRA_KINDS = {"teacher_topk_ids": "int3", "teacher_topk_logprobs": "float3", "teacher_logprobs": "float",
                "key_mask": "bool", "error_mask": "bool", "entropy": "float", "response_ids": "int",
                "ref_logprobs": "float"}


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, the extra inputs it needs, a one-line description, its
    parameters with defaults, and whether the teacher must be called at a given step."""
    name: str
    fn: Callable[..., "MethodOutput"]
    needs: frozenset[str]
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Every parameter the method reads (besides ``step``), with its default."""
    teacher_active: Callable[[int, Mapping[str, Any]], bool] = lambda step, params: False
    """``teacher_active(step, params)``: False once no teacher input is needed (e.g. the KL
    coefficient has annealed to 0), so the driver can stop calling the teacher."""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """Shared algorithm fields whose global default does not suit this method."""
    gated_needs: frozenset[str] = frozenset()
    """The needs only required while ``teacher_active`` (teacher inputs, and e.g. TRACE's annotations)."""
    teacher_rows: str = "all"
    """Which rollouts the teacher must score: "all", or "annotated" (only those with a key or error
    token: the method reads teacher inputs on span tokens only, so the driver skips the rest)."""
    params_cls: type | None = None
    """The dataclass declaring the parameters (types, defaults, documentation), when given."""

    def needs_at(self, step: int, params: Mapping[str, Any] | None = None) -> frozenset[str]:
        """What the driver must gather at ``step``: ``needs``, less ``gated_needs`` once the teacher is off."""
        return self.needs if self.teacher_active(step, params) else self.needs - self.gated_needs


@dataclass
class MethodInputs:
    """What a method receives. ``extra`` holds exactly the inputs named in the method's ``needs``
    (keys in :data:`KNOWN_NEEDS`); ``behaviour_logprobs`` [B, R] is filled by the driver."""
    rewards: Tensor  # [B] float
    group_ids: Tensor  # [B] long
    response_mask: Tensor  # [B, R] bool
    extra: dict[str, Tensor] = field(default_factory=dict)
    behaviour_logprobs: Tensor | None = None  # [B, R] float, log-prob of each sampled token (rollout)

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
        B, R = m.shape
        if not isinstance(self.rewards, Tensor) or tuple(self.rewards.shape) != (B,):
            got = tuple(self.rewards.shape) if isinstance(self.rewards, Tensor) else type(self.rewards).__name__
            raise ValueError(f"MethodInputs.rewards has shape {got}, expected ({B},)")
        if not isinstance(self.group_ids, Tensor) or tuple(self.group_ids.shape) != (B,):
            got = tuple(self.group_ids.shape) if isinstance(self.group_ids, Tensor) else type(self.group_ids).__name__
            raise ValueError(f"MethodInputs.group_ids has shape {got}, expected ({B},)")
        if self.group_ids.dtype.is_floating_point or self.group_ids.dtype == torch.bool:
            raise TypeError(f"MethodInputs.group_ids must be integers, got {self.group_ids.dtype}; use .long()")
        if self.behaviour_logprobs is not None:
            _check_tensor("MethodInputs.behaviour_logprobs", self.behaviour_logprobs, (B, R), "float")
        for key, t in self.extra.items():
            kind = _EXTRA_KINDS.get(key)
            if kind is not None:
                _check_tensor(f"MethodInputs.extra[{key!r}]", t, (B, R), kind)

    def require_behaviour_logprobs(self, method: str) -> Tensor:
        """``behaviour_logprobs``, or a ValueError saying the driver must fill it."""
        if self.behaviour_logprobs is None:
            raise ValueError(f"method {method!r} needs MethodInputs.behaviour_logprobs [B, R] (the rollout's "
                             f"sampled-token log-probs); the driver must fill it")
        return self.behaviour_logprobs


def _check_tensor(name: str, t: Any, shape: tuple[int, int], kind: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    want3 = kind.endswith("3")
    if tuple(t.shape[:2]) != shape or t.dim() != (3 if want3 else 2):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape + ('K',) if want3 else shape}")
    base = kind.rstrip("3")
    ok = {"bool": t.dtype == torch.bool, "float": t.dtype.is_floating_point,
          "int": not t.dtype.is_floating_point and t.dtype != torch.bool}[base]
    if not ok:
        raise TypeError(f"{name} must be {base}, got {t.dtype}")


@dataclass
class MethodOutput:
    """What a method returns (written into the batch's advantages / channel fields)."""
    advantages: Tensor  # [B, R] float32, 0 outside the response
    channel_names: tuple[str, ...]  # ("pg",) for the GRPO family
    channel_weights: Tensor  # [C, B, R] float32, per-token weight of each channel (0 = not in it)
    metrics: dict[str, float] = field(default_factory=dict)
    channel_norms: tuple[str, ...] = ()  # empty (= all "agg") or one of CHANNEL_NORMS per channel

    @classmethod
    def from_channels(cls, inputs: MethodInputs, channels: Sequence[Channel], advantages: Tensor | None = None,
                      metrics: Mapping[str, float] | None = None) -> "MethodOutput":
        """Fold every channel's coefficient into its weights (:func:`~trace_rl.algo.channels.fold_channels`,
        which leaves out channels whose coefficient is 0) and add the ``coef/`` and ``route/`` metrics.
        ``advantages`` [B, R] (or [B], broadcast) default to 0; they are zeroed outside the response."""
        mask = inputs.response_mask
        names, weights, norms, route = fold_channels(channels, mask)
        if advantages is None:
            adv = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        else:
            adv = advantages.float()
            adv = adv[:, None].expand(mask.shape) if adv.dim() == 1 else adv
            adv = torch.where(mask, adv, torch.zeros((), dtype=adv.dtype, device=adv.device))
        return cls(advantages=adv, channel_names=names, channel_weights=weights,
                   metrics={**route, **{k: float(v) for k, v in (metrics or {}).items()}}, channel_norms=norms)

    def validate(self, inputs: MethodInputs) -> None:
        """Check shapes, dtypes, norms and that nothing leaks outside the response; raise ValueError."""
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
        norms = tuple(self.channel_norms)
        if norms and (len(norms) != C or any(n not in CHANNEL_NORMS for n in norms)):
            raise ValueError(f"MethodOutput.channel_norms must be empty or one of {CHANNEL_NORMS} per channel "
                             f"({C}: {self.channel_names}), got {norms}")
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


def register_method(name: str, *, needs: Iterable[str] = (), description: str = "",
                    params: type | None = None, defaults: Mapping[str, Any] | None = None,
                    teacher_active: Callable[[int, Mapping[str, Any]], bool] | None = None,
                    overrides: Mapping[str, Any] | None = None, gated_needs: Iterable[str] | None = None,
                    teacher_rows: str = "all"):
    """Decorator: register ``fn(inputs: MethodInputs, params: dict) -> MethodOutput`` as ``name``.

    ``needs`` names the extra inputs the driver must provide (keys of :data:`KNOWN_NEEDS`);
    ``description`` defaults to the first line of the function's docstring; ``params`` is the dataclass
    declaring every parameter the method reads (type, default, documentation: see the module docstring);
    ``defaults`` (a plain dict) is the undocumented shorthand for the same. ``teacher_active(step, params)`` (params already merged with the
    defaults) defaults to "always" for a method that needs a teacher input, "never" otherwise;
    ``gated_needs`` (default: the teacher needs) are not required while it is False, and the method
    must not read them then.
    """
    needs = frozenset(needs)
    unknown = needs - set(KNOWN_NEEDS)
    if unknown:
        raise ValueError(f"method {name!r} needs unknown inputs {sorted(unknown)}; "
                         f"known: {', '.join(sorted(KNOWN_NEEDS))}")
    gated = needs & TEACHER_NEEDS if gated_needs is None else frozenset(gated_needs)
    if not gated <= needs:
        raise ValueError(f"method {name!r}: gated_needs {sorted(gated - needs)} are not among its needs")
    if teacher_rows not in ("all", "annotated") or (teacher_rows == "annotated" and "annotations" not in needs):
        raise ValueError(f"method {name!r}: teacher_rows must be 'all' or 'annotated' (the latter needs "
                         f"'annotations'), got {teacher_rows!r}")
    if params is not None and defaults is not None:
        raise ValueError(f"method {name!r}: give params= (a dataclass) or defaults= (a dict), not both")
    defaults = params_from_dataclass(params) if params is not None else dict(defaults or {})
    if "step" in defaults:
        raise ValueError(f"method {name!r}: 'step' is filled by the driver, not a parameter with a default")
    uses_teacher = bool(needs & TEACHER_NEEDS)
    active = teacher_active or (lambda step, params: uses_teacher)

    def teacher_active_merged(step: int, params: Mapping[str, Any] | None = None) -> bool:
        return bool(active(step, {**defaults, **dict(params or {})}))

    def deco(fn: Callable[..., MethodOutput]) -> Callable[..., MethodOutput]:
        desc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        register_into(METHODS, "method", name, MethodSpec(
            name=name, fn=fn, needs=needs, description=desc, defaults=defaults,
            teacher_active=teacher_active_merged, overrides=dict(overrides or {}), gated_needs=gated,
            teacher_rows=teacher_rows, params_cls=params))
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name``; unknown names raise ValueError (also a KeyError)
    listing the registered ones."""
    return lookup(METHODS, "method", name)


def compute_method(method: str | MethodSpec, inputs: MethodInputs,
                   params: Mapping[str, Any] | None = None) -> MethodOutput:
    """Run a method with checks on both sides: the inputs' shapes, that ``inputs.extra`` holds
    everything the method needs (at ``params["step"]``: see :meth:`MethodSpec.needs_at`), and the
    output's shapes / dtypes / norms / zeros outside the response. ``params`` are merged over
    ``spec.defaults``."""
    spec = get_method(method) if isinstance(method, str) else method
    params = {**spec.defaults, **dict(params or {})}
    inputs.validate()
    needs = spec.needs_at(params["step"], params) if "step" in params else spec.needs
    missing = {key for need in needs for key in KNOWN_NEEDS[need]} - set(inputs.extra)
    if missing:
        raise ValueError(f"method {spec.name!r} needs {sorted(missing)} in MethodInputs.extra "
                         f"(it declares needs={sorted(spec.needs)}); the driver must provide them")
    out = spec.fn(inputs, params)
    if not isinstance(out, MethodOutput):
        raise TypeError(f"method {spec.name!r} returned {type(out).__name__}, expected MethodOutput")
    out.validate(inputs)
    return out


def registry_names() -> dict[str, set[str]]:
    """Registered names: ``{"methods", "advantage_estimators", "policy_losses"}`` -> sets of names."""
    return {"methods": set(METHODS), "advantage_estimators": set(ADVANTAGE_ESTIMATORS),
            "policy_losses": set(POLICY_LOSSES)}


# ------------------------------------------------------------------------------ reading params
def param_step(params: Mapping[str, Any], method: str) -> int:
    """``params["step"]``: the current training step (an int >= 0), filled by the driver."""
    step = params.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"method {method!r} needs params['step'] (the current training step, an int >= 0), "
                         f"got {step!r}; the driver must pass it")
    return step


def param_choice(params: Mapping[str, Any], key: str, choices: Iterable[str]) -> str:
    """``params[key]``, which must be one of ``choices``."""
    choices = tuple(choices)
    v = params.get(key)
    if v not in choices:
        raise ValueError(f"{key} must be one of {choices}, got {v!r}")
    return v


def param_bool(params: Mapping[str, Any], key: str) -> bool:
    """``params[key]``, which must be a bool."""
    v = params.get(key)
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be true or false, got {v!r}")
    return v


def param_float(params: Mapping[str, Any], key: str, lo: float | None = None, hi: float | None = None) -> float:
    """``params[key]`` as a finite float in ``[lo, hi]``."""
    v = params.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{key} must be a finite number{rng}, got {v!r}")
    return float(v)


def param_schedule(params: Mapping[str, Any], key: str) -> Schedule:
    """``params[key]`` as a :class:`~trace_rl.algo.schedules.Schedule` (a number means constant)."""
    return Schedule.from_spec(params.get(key), what=key)


# ------------------------------------------------------------------------------ declared parameters
def params_from_dataclass(cls: type) -> dict[str, Any]:
    """The defaults of a parameter dataclass as a plain dict (a nested dataclass, e.g. a Schedule, as a dict)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"params must be a dataclass, got {cls!r}")
    out = {}
    for f in dataclasses.fields(cls):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


@dataclass(frozen=True)
class ParamField:
    """One ``algorithm.<name>`` field contributed by the methods' parameter declarations."""
    name: str
    type: Any
    default_factory: Callable[[], Any]
    doc: str
    methods: tuple[str, ...]


def attribute_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (and of its dataclass bases): the documentation of
    config fields and method parameters alike."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs


def method_param_fields() -> list[ParamField]:
    """Every parameter declared by a registered method, once, in registration order. Two methods may
    share a parameter (TRACE and SCOPE both read ``correct_threshold``) only with the same type and
    default; anything else is a registration bug and raises ValueError naming both."""
    out: dict[str, ParamField] = {}
    for spec in METHODS.values():
        if spec.params_cls is not None:
            hints = typing.get_type_hints(spec.params_cls)
            docs = attribute_docs(spec.params_cls)
            items = []
            for f in dataclasses.fields(spec.params_cls):
                factory = (f.default_factory if f.default is dataclasses.MISSING
                           else (lambda v=f.default: v))  # type: ignore[misc]
                items.append((f.name, hints[f.name], factory, docs.get(f.name, "")))
        else:
            items = [(k, type(v) if not isinstance(v, Mapping) else dict, (lambda v=v: v), "")
                     for k, v in spec.defaults.items()]
        for pname, ptype, factory, doc in items:
            prev = out.get(pname)
            if prev is None:
                out[pname] = ParamField(pname, ptype, factory, doc, (spec.name,))
                continue
            if prev.type != ptype or _plain(prev.default_factory()) != _plain(factory()):
                raise ValueError(
                    f"methods {prev.methods} and {spec.name!r} both declare parameter {pname!r}, with different "
                    f"types or defaults ({prev.type} = {_plain(prev.default_factory())!r} vs {ptype} = "
                    f"{_plain(factory())!r}); share one declaration (a common base dataclass) or rename one")
            out[pname] = dataclasses.replace(prev, doc=prev.doc or doc, methods=prev.methods + (spec.name,))
    return list(out.values())


def _plain(v: Any) -> Any:
    return dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
