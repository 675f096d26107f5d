"""Coefficient schedules: a loss coefficient as a function of the training step (0-based).

Every schedule is the same :class:`Schedule` record (so a config holds one shape for all of them);
its ``name`` picks the formula from :data:`SCHEDULES`. With ``s`` = step, ``h`` = hold_steps,
``d`` = decay_steps, ``f = min(1, (s - h) / d)`` for ``s >= h`` (``f = 1`` when ``d = 0``):

  - ``constant``:    ``start``.
  - ``hold_linear``: ``start`` for ``s < h``, then ``start + (end - start) * f``; ``end`` from
    ``h + d`` on. TRACE (arXiv 2605.10194): start 0.5, hold 10, linear to 0 over 30 steps.
  - ``cosine``:      ``start`` for ``s < h``, then ``end + (start - end) * (1 + cos(pi f)) / 2``.
  - ``step``:        ``end + (start - end) * gamma ** ((s - h) // step_size)`` for ``s >= h``, ``start``
    before: ``(start - end)`` shrinks by ``gamma`` every ``step_size`` steps after the hold
    (``end = 0, h = 0`` is PyTorch's StepLR; ``gamma = 0``: ``end`` from ``h + step_size`` on).

A method reads a schedule from its params with :meth:`Schedule.from_spec`: a plain number is a
constant; a mapping is ``{"name": ..., <fields>}``. :meth:`Schedule.is_zero_from` gives the first
step from which the value is 0 forever (the driver stops calling the teacher then).
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Optional

from .registry import lookup, register_into

__all__ = ["Schedule", "SCHEDULES", "register_schedule", "schedule_defaults"]


@dataclass(frozen=True)
class ScheduleKind:
    """A registered formula: ``value(schedule, step)`` and ``settles(schedule)``, the first step from
    which the value never changes again (``None`` if it never settles exactly)."""
    name: str
    value: Callable[["Schedule", int], float]
    settles: Callable[["Schedule"], Optional[int]]


SCHEDULES: dict[str, ScheduleKind] = {}


def register_schedule(name: str, settles: Callable[["Schedule"], Optional[int]]):
    """Decorator: register ``value(schedule, step) -> float`` as the schedule ``name``."""
    def deco(fn):
        register_into(SCHEDULES, "schedule", name, ScheduleKind(name, fn, settles))
        return fn
    return deco


@dataclass
class Schedule:
    """A coefficient schedule. All fields are accepted by every ``name``; each formula uses its own.
    Values are non-negative (they scale losses). It is also the type of every schedule field of the
    ``algorithm`` config section (a plain, non-frozen dataclass, so that OmegaConf can merge overrides
    into it; treat it as a value)."""
    name: str = "constant"
    """constant | hold_linear | cosine | step (see the module docstring)."""
    start: float = 1.0
    """Value before and during the hold (the peak: lambda_0 in TRACE)."""
    end: float = 0.0
    """Value the decay reaches (hold_linear, cosine) or approaches (step)."""
    hold_steps: int = 0
    """Steps at ``start`` before decaying."""
    decay_steps: int = 0
    """Length of the decay (hold_linear, cosine); 0 = jump to ``end`` after the hold."""
    step_size: int = 1
    """step: steps between two multiplications by gamma."""
    gamma: float = 0.5
    """step: factor in [0, 1] applied to (value - end) every step_size steps."""

    def __post_init__(self) -> None:
        lookup(SCHEDULES, "schedule", self.name)  # unknown name -> error listing the known ones
        for f in ("start", "end", "gamma"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"schedule {f} must be a finite number >= 0, got {v!r}")
        if self.gamma > 1:
            raise ValueError(f"schedule gamma must be in [0, 1], got {self.gamma!r}")
        for f, lo in (("hold_steps", 0), ("decay_steps", 0), ("step_size", 1)):
            v = getattr(self, f)
            try:
                ok = not isinstance(v, bool) and operator.index(v) >= lo
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"schedule {f} must be an int >= {lo}, got {v!r}")

    @classmethod
    def from_spec(cls, spec: Any, what: str = "schedule") -> "Schedule":
        """A Schedule from a number (constant), a mapping ``{"name": ..., <fields>}`` or a Schedule.
        ``what`` names the parameter in error messages."""
        if isinstance(spec, Schedule):
            return spec
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls(name="constant", start=float(spec))
        if isinstance(spec, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = set(spec) - known
            if unknown:
                raise ValueError(f"{what}: unknown schedule fields {sorted(unknown)}; known: {sorted(known)}")
            try:
                return cls(**dict(spec))
            except ValueError as e:
                raise ValueError(f"{what}: {e}") from None
        raise TypeError(f"{what} must be a number or a mapping like {{'name': 'hold_linear', 'start': 0.5, "
                        f"'hold_steps': 10, 'decay_steps': 30}}, got {type(spec).__name__}")

    def value(self, step: int) -> float:
        """The coefficient at ``step`` (an int >= 0)."""
        try:
            step = operator.index(step)
        except TypeError:
            raise ValueError(f"step must be an int >= 0, got {step!r}") from None
        if step < 0:
            raise ValueError(f"step must be an int >= 0, got {step}")
        return float(SCHEDULES[self.name].value(self, step))

    @property
    def peak(self) -> float:
        """The largest value the schedule takes (every formula stays between start and end)."""
        return float(max(self.start, self.end))

    def is_zero_from(self) -> Optional[int]:
        """The first step from which the value is 0 at every later step, or None if there is none."""
        settle = SCHEDULES[self.name].settles(self)
        if settle is None or self.value(settle) != 0:
            return None
        while settle > 0 and self.value(settle - 1) == 0:
            settle -= 1
        return settle


def schedule_defaults(name: str = "constant", **kw: Any) -> dict[str, Any]:
    """Every field of a :class:`Schedule` as a plain dict (for a method's ``defaults``)."""
    return asdict(Schedule(name=name, **kw))


def _fraction(s: Schedule, step: int) -> float:
    return 1.0 if s.decay_steps == 0 else min(1.0, (step - s.hold_steps) / s.decay_steps)


def _settles_after_decay(s: Schedule) -> int:
    return 0 if s.start == s.end else s.hold_steps + s.decay_steps


@register_schedule("constant", settles=lambda s: 0)
def _constant(s: Schedule, step: int) -> float:
    return s.start


@register_schedule("hold_linear", settles=_settles_after_decay)
def _hold_linear(s: Schedule, step: int) -> float:
    if step < s.hold_steps:
        return s.start
    f = _fraction(s, step)
    return s.end if f >= 1 else s.start * (1 - f) + s.end * f


@register_schedule("cosine", settles=_settles_after_decay)
def _cosine(s: Schedule, step: int) -> float:
    if step < s.hold_steps:
        return s.start
    f = _fraction(s, step)
    return s.end if f >= 1 else s.end + (s.start - s.end) * 0.5 * (1 + math.cos(math.pi * f))


def _step_settles(s: Schedule) -> Optional[int]:
    if s.start == s.end or s.gamma == 1:
        return 0  # constant
    return s.hold_steps + s.step_size if s.gamma == 0 else None  # 0 < gamma < 1: approaches end forever


@register_schedule("step", settles=_step_settles)
def _step(s: Schedule, step: int) -> float:
    if step < s.hold_steps:
        return s.start
    return s.end + (s.start - s.end) * s.gamma ** ((step - s.hold_steps) // s.step_size)
