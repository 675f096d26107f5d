"""``python -m trace_rl.algo``: list the registered methods (with the inputs each needs and its
parameters), schedules, advantage estimators, aggregation modes and policy losses."""
from __future__ import annotations

import inspect
import textwrap

from . import ADVANTAGE_ESTIMATORS, METHODS, POLICY_LOSSES, SCHEDULES
from .aggregation import AGG_MODE_DOCS, AGG_MODES


def _first_line(obj) -> str:
    return (inspect.getdoc(obj) or "").split("\n")[0]


def _options(fn) -> str:
    """The keyword-only arguments of ``fn`` with their defaults, e.g. ``eps=1e-06``."""
    opts = [f"{p.name}={p.default!r}" for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return ", ".join(opts) or "none"


def _value(v) -> str:
    """A parameter default; a schedule shows only the fields its formula uses."""
    if isinstance(v, dict) and "name" in v:
        used = {"constant": ("start",), "hold_linear": ("start", "end", "hold_steps", "decay_steps"),
                "cosine": ("start", "end", "hold_steps", "decay_steps"),
                "step": ("start", "end", "hold_steps", "step_size", "gamma")}.get(v["name"], tuple(v))
        return v["name"] + "(" + ", ".join(f"{k}={v[k]!r}" for k in used if k in v) + ")"
    return repr(v)


def describe() -> str:
    """The registries as readable text."""
    lines = ["Methods (algorithm.name):"]
    for name in sorted(METHODS):
        spec = METHODS[name]
        needs = ", ".join(n + "*" * (n in spec.gated_needs) for n in sorted(spec.needs)) or "rewards only"
        note = " (*: only while the teacher is active)" if spec.gated_needs else ""
        lines.append(f"  {name}  [needs: {needs}]{note}")
        lines += textwrap.wrap(spec.description, width=96, initial_indent="      ", subsequent_indent="      ")
        params = ", ".join(f"{k}={_value(v)}" for k, v in spec.defaults.items()) or "none"
        lines += textwrap.wrap(f"params: {params}", width=96, initial_indent="      ", subsequent_indent="        ")
        if spec.overrides:
            lines.append("      overrides: " + ", ".join(f"{k}={v!r}" for k, v in spec.overrides.items()))
    lines += ["", "Schedules (a coefficient parameter: a number, or {name: ..., start, end, hold_steps, "
              "decay_steps, step_size, gamma}):", "  " + ", ".join(sorted(SCHEDULES))]
    lines += ["", "Advantage estimators (algorithm.adv_estimator):"]
    for name in sorted(ADVANTAGE_ESTIMATORS):
        fn = ADVANTAGE_ESTIMATORS[name]
        lines.append(f"  {name}  [options: {_options(fn)}]")
        lines.append(f"      {_first_line(fn)}")
    lines += ["", "Aggregation modes (algorithm.loss_agg_mode; a channel with norm 'agg' uses it):"]
    for name in AGG_MODES:
        lines.append(f"  {name}")
        lines.append(f"      {AGG_MODE_DOCS[name]}")
    lines += ["", "Policy losses (algorithm.policy_loss):"]
    for name in sorted(POLICY_LOSSES):
        fn = POLICY_LOSSES[name]
        lines.append(f"  {name}  [options: {_options(fn)}]")
        lines.append(f"      {_first_line(fn)}")
    return "\n".join(lines)


def main() -> None:
    """Print :func:`describe`."""
    print(describe())


if __name__ == "__main__":
    main()
