"""Does asynchronous training (trainer.max_staleness=k) learn as well as lockstep? One table from a sweep.

    python -m trace_rl.train -m trainer.max_staleness=0,1 rollout.seed=0,1,2 'trainer.seed=${rollout.seed}' \
        trainer.total_steps=20 eval.before=false logger.wandb=false hydra.sweep.dir=/tmp/sweeps/async
    python scripts/async_parity.py /tmp/sweeps/async

Every run directory below the sweep (one holding ``summary.json`` and ``.hydra/overrides.yaml``) is grouped
by its ``trainer.max_staleness`` and paired with the other arms by its seed (``rollout.seed``). Per arm:
the mean over seeds and a 95% Student-t interval of the held-out accuracies after training (avg@k on the
in-distribution and OOD sets), the training reward over steps 1-10 (the rising part of the curve:
the held-out accuracy saturates on the demo task) and over the last five steps, the training-loop time and
the async statistics (staleness, truncated-IS weights); then the paired difference of each arm from
``max_staleness=0`` with its own 95% t interval. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

# two-sided 95% Student-t quantiles by degrees of freedom (normal beyond the table)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    if df in _T95:
        return _T95[df]
    below = [d for d in _T95 if d < df]
    return _T95[max(below)] if df < 30 else 1.96


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval); half-width nan with fewer than two values."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, t95(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def overrides(run: Path) -> dict[str, str]:
    out = {}
    path = run / ".hydra" / "overrides.yaml"
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, val = line.lstrip("- ").partition("=")
            out[key.strip()] = val.strip()
    return out


def run_figures(run: Path) -> dict[str, float]:
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "train/reward_mean" in r]
    ev = summary.get("eval_after") or {}
    out = {"id_acc": ev.get("id_accuracy"), "ood_acc": ev.get("ood_accuracy"),
           "reward_1_10": statistics.fmean(r["train/reward_mean"] for r in steps[:10]),
           "reward_last5": statistics.fmean(r["train/reward_mean"] for r in steps[-5:]),
           "loop_s": summary.get("train_loop_s")}
    for key, name in (("async/staleness_mean", "staleness"), ("actor/async/is_weight_mean", "is_weight"),
                      ("actor/async/is_clipped_frac", "is_clipped")):
        vals = [float(r[key]) for r in steps if key in r]
        out[name] = statistics.fmean(vals) if vals else None
    return {k: float(v) for k, v in out.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path)
    args = ap.parse_args(argv)
    arms: dict[int, dict[str, dict[str, float]]] = {}
    for summary in sorted(args.sweep.rglob("summary.json")):
        run = summary.parent
        ov = overrides(run)
        k = int(ov.get("trainer.max_staleness", 0))
        seed = ov.get("rollout.seed", ov.get("trainer.seed", run.name))
        arms.setdefault(k, {})[seed] = run_figures(run)
    if 0 not in arms:
        print(f"no max_staleness=0 runs under {args.sweep}", file=sys.stderr)
        return 1
    cols = ["id_acc", "ood_acc", "reward_1_10", "reward_last5", "loop_s", "staleness", "is_weight", "is_clipped"]
    print("| max_staleness | seeds | " + " | ".join(cols) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in cols) + " |")
    for k in sorted(arms):
        cells = []
        for c in cols:
            xs = [f[c] for f in arms[k].values() if c in f]
            if not xs:
                cells.append("-")
                continue
            m, h = mean_ci(xs)
            cells.append(f"{m:.3f} ± {h:.3f}" if h == h else f"{m:.3f}")
        print(f"| {k} | {len(arms[k])} | " + " | ".join(cells) + " |")
    print()
    print("paired difference (arm - lockstep, same seed), mean ± 95% t half-width:")
    for k in sorted(arms):
        if k == 0:
            continue
        seeds = sorted(set(arms[k]) & set(arms[0]))
        parts = []
        for c in ("id_acc", "ood_acc", "reward_1_10", "reward_last5", "loop_s"):
            d = [arms[k][s][c] - arms[0][s][c] for s in seeds if c in arms[k][s] and c in arms[0][s]]
            if d:
                m, h = mean_ci(d)
                parts.append(f"{c} {m:+.3f} ± {h:.3f}")
        print(f"  max_staleness={k} ({len(seeds)} seeds): " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
