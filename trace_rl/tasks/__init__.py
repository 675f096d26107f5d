"""Tasks: where problems come from (the generated arith task, or local math files) and how they are prompted."""
from __future__ import annotations

from pathlib import Path

from trace_rl.tasks import arith
from trace_rl.tasks.base import DEFAULT_INSTRUCTION, Problem, build_messages, render_prompt
from trace_rl.tasks.math_data import LoadStats, load_problems

__all__ = ["DEFAULT_INSTRUCTION", "LoadStats", "Problem", "build_messages", "instruction_for",
           "load_problems", "load_task_problems", "render_prompt"]

BUILTIN_TASKS = ("arith",)
ARITH_DEFAULT_SIZES = {"train": 20000, "test": 200, "ood": 200}
"""Problems generated when ``n`` is not given."""


def _builtin(name_or_path: str) -> tuple[str, str | None] | None:
    """``"arith"`` -> ("arith", None); ``"arith:test"`` -> ("arith", "test"); anything else -> None."""
    name, _, split = str(name_or_path).partition(":")
    if name in BUILTIN_TASKS and not Path(str(name_or_path)).exists():
        return name, split or None
    return None


def load_task_problems(name_or_path: str, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
    """The problems of a task split.

    ``name_or_path`` is:
      * ``"arith"`` (the generated task; ``split`` is train/test/ood) or ``"arith:<split>"``, whose
        split wins over ``split``; ``n`` problems (default ``ARITH_DEFAULT_SIZES[split]``) from ``seed``;
      * a ``.jsonl``/``.json``/``.parquet`` file: its first ``n`` usable rows (all when ``n`` is None or 0);
      * a directory holding ``<split>.jsonl``, ``<split>.json`` or ``<split>.parquet``.
    File order is kept (``seed`` is unused for files; the driver shuffles).
    """
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"load_task_problems(n={n!r}): use an int >= 0, or None for the default size")
    builtin = _builtin(name_or_path)
    if builtin is not None:
        split = builtin[1] or split
        if split not in arith.SPLITS:
            raise ValueError(f"arith has no split {split!r}; use one of {', '.join(arith.SPLITS)} "
                             "(e.g. data.eval_test=arith:test)")
        return arith.generate(split, n or ARITH_DEFAULT_SIZES[split], seed=seed)
    path = Path(str(name_or_path))
    if path.is_dir():
        candidates = [path / f"{split}{ext}" for ext in (".jsonl", ".json", ".parquet")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ValueError(f"task directory {str(path)!r} has no file for split {split!r} (looked for "
                             f"{', '.join(c.name for c in candidates)}); add one or give the file path itself")
        path = found[0]
    elif not path.exists():
        raise ValueError(f"task {str(name_or_path)!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) "
                         "nor an existing file or directory; use data.task=arith or a local .jsonl/.parquet path")
    problems, _ = load_problems(path, limit=n or None, source=f"{path.stem}")
    return problems


def instruction_for(name_or_path: str) -> str:
    """The instruction to append to prompts of this task (short for arith, the usual one for math files)."""
    return arith.ARITH_INSTRUCTION if _builtin(name_or_path) is not None else DEFAULT_INSTRUCTION
