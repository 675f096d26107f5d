"""Compare finished training runs: one markdown table and a few plots.

    python -m trace_rl.report <dir> [<dir> ...] [--out <dir>]

Each ``<dir>`` is a run directory (``trace_rl.train`` writes ``summary.json`` there when a run ends)
or any directory above run directories, such as a Hydra sweep ``multirun/<date>/<time>`` whose jobs
``0/``, ``1/``, ... are run directories. Every directory holding a ``summary.json`` is one run; a
directory with only a ``metrics.jsonl`` is a run that did not finish, and is listed but left out.

A run is labelled by its algorithm plus the Hydra overrides (``.hydra/overrides.yaml``) that differ
between the runs compared, or, without that file, by its directory name. ``--out`` (default: the
first directory given) receives ``report.md`` (the table, what each column means, the runs and
their directories, the plots) and the plots as PNG files; the path of ``report.md`` is printed.

What is read: ``summary.json`` for steps, accuracy before / after, cumulative exposure and wall
time; ``metrics.jsonl`` (one JSON object per logged step, non-finite floats written as strings such
as ``"nan"``) for the curves and the final entropy and response length. A value a run lacks is
``-`` in the table and no line in a plot; nothing here imports torch.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

__all__ = ["Run", "find_run_dirs", "load_runs", "markdown_table", "write_plots", "write_report", "main"]

# folders inside a run directory that never hold runs (and can be large): not searched
_NOT_RUNS = {"checkpoints", "final_model", "wandb"}

# curves with one line per run: file, metric, title, y label
CURVES = (
    ("reward.png", "train/reward_mean", "Training reward", "mean reward"),
    ("entropy.png", "train/entropy", "Policy entropy", "entropy"),
    ("response_length.png", "train/response_length", "Response length", "tokens"),
)
EXPOSURE_CURVES = (  # the panels of teacher_exposure.png
    ("exposure/teacher_token_frac_cum", "Cumulative teacher-token fraction", "fraction of response tokens"),
    ("exposure/privileged_grad_cum", "Cumulative privileged-gradient tokens", "tokens"),
)


# ---------------------------------------------------------------------------------------------
# reading runs
def _number(v: Any) -> float | None:
    """A finite float from a JSON value (numbers, or strings such as "0.5"); None otherwise."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _as_float(v: Any) -> float | None:
    """A metric value as float, keeping NaN / inf (``Tracker`` writes them as "nan", "inf")."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


@dataclass
class Run:
    """One finished training run: its directory, ``summary.json``, ``metrics.jsonl`` and overrides."""

    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, float]]       # one dict per metrics.jsonl line, values as floats
    overrides: list[str] | None = None    # .hydra/overrides.yaml; None when the run has none
    label: str = ""

    @property
    def algorithm(self) -> str:
        return str(self.summary.get("algorithm") or "?")

    @property
    def steps(self) -> int | None:
        s = _number(self.summary.get("steps"))
        return int(s) if s is not None else None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, finite values only, in step order. A step logged twice
        (a resumed run appends to metrics.jsonl from its checkpoint) keeps its last value."""
        by_step: dict[int, float] = {}
        for m in self.metrics:
            if key in m and "step" in m:
                by_step[int(m["step"])] = m[key]
        steps = [s for s in sorted(by_step) if math.isfinite(by_step[s])]
        return steps, [by_step[s] for s in steps]

    def final(self, key: str) -> float | None:
        """The metric's last finite value (None if it never had one)."""
        _, values = self.series(key)
        return values[-1] if values else None

    def exposure(self, key: str) -> float | None:
        """A cumulative ``exposure/...`` value: from summary.json, else the last logged one (the
        summaries of older runs have no ``exposure``)."""
        v = _number((self.summary.get("exposure") or {}).get(key))
        return v if v is not None else self.final(key)

    def accuracy(self, when: str, split: str) -> float | None:
        """``when``: "before" / "after"; ``split``: "id" / "ood" (summary's ``<split>_accuracy``)."""
        return _number((self.summary.get(f"eval_{when}") or {}).get(f"{split}_accuracy"))

    def channels(self) -> list[str]:
        """Channel names with a ``route/<channel>_token_frac`` metric, e.g. ``pg``, ``fkl:key``."""
        pre, post = "route/", "_token_frac"
        return sorted({k[len(pre):-len(post)] for m in self.metrics for k in m
                       if k.startswith(pre) and k.endswith(post)})


def _natural_key(path: Path) -> list:
    """Sort ``2`` before ``10`` (Hydra job directories are numbered)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def find_run_dirs(root: str | Path, unfinished: list[Path] | None = None) -> list[Path]:
    """Every directory at or below ``root`` holding a ``summary.json`` (not searched below a run
    directory, nor in hidden folders). Directories with a ``metrics.jsonl`` and no ``summary.json``
    (runs that did not finish) are appended to ``unfinished`` when it is given."""
    found: list[Path] = []
    seen: set[Path] = set()

    def visit(d: Path) -> None:
        real = d.resolve()
        if real in seen:  # a symlink loop
            return
        seen.add(real)
        if (d / "summary.json").is_file():
            found.append(d)
            return
        if unfinished is not None and (d / "metrics.jsonl").is_file():
            unfinished.append(d)
        try:
            children = sorted((c for c in d.iterdir() if c.is_dir()), key=_natural_key)
        except OSError as e:
            log.warning("cannot list %s: %s", d, e)
            return
        for c in children:
            if not c.name.startswith(".") and c.name not in _NOT_RUNS:
                visit(c)

    visit(Path(root))
    return found


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.jsonl as a list of {key: float}; non-numeric values are dropped, and so are lines
    that are not JSON (the last line of a killed run may be cut off)."""
    out, bad = [], 0
    if not path.is_file():
        return out
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                out.append({k: x for k, v in row.items() if (x := _as_float(v)) is not None})
    if bad:
        log.warning("%s: skipped %d line(s) that are not JSON", path, bad)
    return out


def read_overrides(run_dir: Path) -> list[str] | None:
    """The run's Hydra overrides (a YAML list of strings), or None without ``.hydra/overrides.yaml``."""
    p = run_dir / ".hydra" / "overrides.yaml"
    if not p.is_file():
        return None
    import yaml

    data = yaml.safe_load(p.read_text()) or []
    return [str(o) for o in data] if isinstance(data, list) else None


def read_run(run_dir: Path) -> Run:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{run_dir / 'summary.json'} is not valid JSON: {e}") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{run_dir / 'summary.json'} holds no JSON object")
    return Run(run_dir, summary, read_metrics(run_dir / "metrics.jsonl"), read_overrides(run_dir))


def _override_key(override: str) -> str:
    """``+trainer.x=1`` -> ``trainer.x`` (Hydra's append / delete prefixes dropped)."""
    return override.lstrip("+~").split("=", 1)[0]


def label_runs(runs: Sequence[Run]) -> None:
    """Set each run's ``label``: its algorithm plus what sets it apart from the others, namely the
    overrides whose value is not the same in every run that has overrides (``algorithm=<name>`` is
    left out, the algorithm is already there), or the directory name for a run without
    overrides. Labels still equal (the same settings in two sweeps) get the run's path appended."""
    with_overrides = [r for r in runs if r.overrides is not None]
    per_run = [{_override_key(o): o for o in r.overrides} for r in with_overrides]
    keys = {k for m in per_run for k in m}
    differing = {k for k in keys if len({m.get(k) for m in per_run}) > 1}
    for r in runs:
        if r.overrides is None:
            extra = [r.path.name]
        else:
            extra = [o for o in r.overrides if _override_key(o) in differing and o != f"algorithm={r.algorithm}"]
        r.label = " ".join([r.algorithm, *extra])
    counts = Counter(r.label for r in runs)
    for label, n in counts.items():
        if n < 2:
            continue
        same = [r for r in runs if r.label == label]
        common = os.path.commonpath([str(r.path.resolve()) for r in same])
        for r in same:
            r.label += f" ({os.path.relpath(r.path.resolve(), common)})"


def load_runs(paths: Iterable[str | Path], unfinished: list[Path] | None = None) -> list[Run]:
    """Every run at or below the given directories (a run reached twice counts once), labelled.
    Raises ``FileNotFoundError`` for a path that is not a directory and ``ValueError`` for a
    directory without runs, naming it."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file() and p.name == "summary.json":
            p = p.parent
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such directory")
        left_out: list[Path] = []
        dirs = find_run_dirs(p, left_out)
        if unfinished is not None:
            unfinished.extend(d for d in left_out if d not in unfinished)
        if not dirs:
            hint = (f"; {len(left_out)} unfinished run(s) there have a metrics.jsonl but no summary.json"
                    if left_out else "")
            raise ValueError(f"no runs under {p}: no directory there holds a summary.json "
                             f"(trace_rl.train writes it when a run ends){hint}")
        for d in dirs:
            if d.resolve() not in seen:
                seen.add(d.resolve())
                runs.append(read_run(d))
    label_runs(runs)
    return runs


# ---------------------------------------------------------------------------------------------
# the table
def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _before_after(before: float | None, after: float | None) -> str:
    if before is None and after is None:
        return "-"
    return f"{_fmt(before, '.3f')} -> {_fmt(after, '.3f')}"


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


COLUMNS = ("run", "steps", "ID acc before -> after", "OOD acc before -> after", "final entropy",
           "final response length", "teacher token frac", "privileged-grad tokens", "sum lambda", "wall time")

COLUMN_NOTES = """\
- *ID / OOD acc*: avg@k on the `test` / `ood` evaluation sets before the first and after the last
  step (`summary.json`: `eval_before` / `eval_after`, `id_accuracy` / `ood_accuracy`).
- *final entropy*, *final response length*: the last finite `train/entropy` and
  `train/response_length` in `metrics.jsonl`.
- *teacher token frac*: response tokens under a teacher channel / response tokens, over the whole
  run (`exposure/teacher_token_frac_cum`).
- *privileged-grad tokens*: tokens that received teacher gradient, summed over the run
  (`exposure/privileged_grad_cum`).
- *sum lambda*: the teacher coefficient summed over steps (`exposure/lambda_sum`).
- `-`: the run has no such value (no evaluation, no exposure accounting, ...)."""


def table_row(run: Run) -> list[str]:
    return [
        run.label.replace("|", "\\|"),
        _fmt(run.steps, "d"),
        _before_after(run.accuracy("before", "id"), run.accuracy("after", "id")),
        _before_after(run.accuracy("before", "ood"), run.accuracy("after", "ood")),
        _fmt(run.final("train/entropy"), ".4g"),
        _fmt(run.final("train/response_length"), ".1f"),
        _fmt(run.exposure("exposure/teacher_token_frac_cum"), ".3f"),
        _fmt(run.exposure("exposure/privileged_grad_cum"), ".0f"),
        _fmt(run.exposure("exposure/lambda_sum"), ".4g"),
        _fmt_seconds(_number(run.summary.get("wall_time_s"))),
    ]


def markdown_table(runs: Sequence[Run]) -> str:
    """One row per run (columns: :data:`COLUMNS`), as a markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in runs]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(i: int) -> dict[str, str]:
    """Run i's colour and line style, the same in every plot (10 colours, then dashed, ...)."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}


def _lines(ax, runs: Sequence[Run], key: str) -> int:
    """One line per run that has ``key`` (legend: those runs); returns how many were drawn."""
    n = 0
    for i, r in enumerate(runs):
        steps, values = r.series(key)
        if steps:
            ax.plot(steps, values, label=r.label, marker="o" if len(steps) == 1 else None, **_style(i))
            n += 1
    if n:
        ax.legend(fontsize="small")
    return n


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_plots(runs: Sequence[Run], out: Path) -> list[tuple[str, Path]]:
    """Write the plots into ``out``; returns (title, path) of each one written (a plot no run has
    data for is not written)."""
    plt = _pyplot()
    written: list[tuple[str, Path]] = []

    for file, key, title, ylabel in CURVES:
        fig, ax = plt.subplots(figsize=(7, 4))
        if _lines(ax, runs, key):
            ax.set(title=title, xlabel="step", ylabel=ylabel)
            written.append((title, _save(fig, out / file)))
        plt.close(fig)

    channels = sorted({c for r in runs for c in r.channels()})
    if channels:
        fig, axes = plt.subplots(len(channels), 1, figsize=(7, 2.6 * len(channels)), sharex=True, squeeze=False)
        for ax, c in zip(axes[:, 0], channels):
            _lines(ax, runs, f"route/{c}_token_frac")
            ax.set(title=f"channel {c}", ylabel="token fraction")
        axes[-1, 0].set_xlabel("step")
        written.append(("Per-channel token fractions", _save(fig, out / "token_fractions.png")))
        plt.close(fig)

    fig, axes = plt.subplots(len(EXPOSURE_CURVES), 1, figsize=(7, 6), sharex=True, squeeze=False)
    drawn = 0
    for ax, (key, title, ylabel) in zip(axes[:, 0], EXPOSURE_CURVES):
        drawn += _lines(ax, runs, key)
        ax.set(title=title, ylabel=ylabel)
    if drawn:
        axes[-1, 0].set_xlabel("step")
        written.append(("Cumulative teacher exposure", _save(fig, out / "teacher_exposure.png")))
    plt.close(fig)

    acc = {(split, when): [r.accuracy(when, split) for r in runs]
           for split in ("id", "ood") for when in ("before", "after")}
    if any(v is not None for vals in acc.values() for v in vals):
        fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.2 * len(runs) + 3), 4.5), sharey=True)
        x, width = list(range(len(runs))), 0.38
        for ax, split, title in zip(axes, ("id", "ood"), ("In-distribution (test)", "Out-of-distribution (ood)")):
            for i, when in enumerate(("before", "after")):
                heights = [math.nan if v is None else v for v in acc[(split, when)]]
                ax.bar([xi + (i - 0.5) * width for xi in x], heights, width, label=when)
            ax.set_xticks(x)
            ax.set_xticklabels([r.label for r in runs], rotation=30, ha="right", fontsize="small")
            ax.set(title=title, ylim=(0, 1))
        axes[0].set_ylabel("accuracy (avg@k)")
        axes[0].legend(fontsize="small")
        written.append(("Accuracy before / after", _save(fig, out / "accuracy.png")))
        plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------
def write_report(runs: Sequence[Run], out: str | Path, *, sources: Sequence[str | Path] = (),
                 unfinished: Sequence[Path] = ()) -> Path:
    """Write ``report.md`` and the plots into ``out``; returns the path of ``report.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out)
    parts = ["# Training report", ""]
    if sources:
        parts += [f"{len(runs)} run(s) from " + ", ".join(f"`{s}`" for s in sources) + ".", ""]
    parts += [markdown_table(runs), COLUMN_NOTES, "", "## Runs", ""]
    parts += [f"- **{r.label}**: `{r.path}`" for r in runs]
    if unfinished:
        parts += ["", "Left out, no `summary.json` (the run did not finish):", ""]
        parts += [f"- `{d}`" for d in unfinished]
    if plots:
        parts += ["", "## Plots", ""]
        for title, path in plots:
            parts += [f"### {title}", "", f"![{title}]({os.path.relpath(path, out)})", ""]
    report = out / "report.md"
    report.write_text("\n".join(parts).rstrip() + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trace_rl.report",
        description="Compare training runs: a markdown table (report.md) and PNG plots. Each DIR is a run "
                    "directory (with summary.json) or a directory above runs, e.g. a Hydra sweep "
                    "multirun/<date>/<time>.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run or sweep directories (searched recursively)")
    parser.add_argument("--out", default=None, help="where report.md and the plots go (default: the first DIR)")
    args = parser.parse_args(argv)

    unfinished: list[Path] = []
    try:
        runs = load_runs(args.dirs, unfinished)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for d in unfinished:
        print(f"note: {d} has no summary.json (unfinished run): left out", file=sys.stderr)
    out = Path(args.out) if args.out else Path(args.dirs[0])
    if out.is_file():  # the first "dir" was a summary.json
        out = out.parent
    print(write_report(runs, out, sources=args.dirs, unfinished=unfinished))
    return 0


if __name__ == "__main__":
    sys.exit(main())
