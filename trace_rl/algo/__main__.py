"""``python -m trace_rl.algo``: list the registered methods (with the inputs each needs),
advantage estimators and policy losses."""
from __future__ import annotations

import inspect
import textwrap

from . import ADVANTAGE_ESTIMATORS, METHODS, POLICY_LOSSES


def _first_line(obj) -> str:
    return (inspect.getdoc(obj) or "").split("\n")[0]


def _options(fn) -> str:
    """The keyword-only arguments of ``fn`` with their defaults, e.g. ``eps=1e-06``."""
    opts = [f"{p.name}={p.default!r}" for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return ", ".join(opts) or "none"


def describe() -> str:
    """The registries as readable text."""
    lines = ["Methods (algorithm.name):"]
    for name in sorted(METHODS):
        spec = METHODS[name]
        needs = ", ".join(sorted(spec.needs)) or "rewards only"
        lines.append(f"  {name}  [needs: {needs}]")
        lines += textwrap.wrap(spec.description, width=96, initial_indent="      ", subsequent_indent="      ")
    lines += ["", "Advantage estimators (algorithm.adv_estimator):"]
    for name in sorted(ADVANTAGE_ESTIMATORS):
        fn = ADVANTAGE_ESTIMATORS[name]
        lines.append(f"  {name}  [options: {_options(fn)}]")
        lines.append(f"      {_first_line(fn)}")
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
