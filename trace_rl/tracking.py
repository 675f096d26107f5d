"""Metrics out: one console line per step, a ``metrics.jsonl`` in the run directory, and W&B
(offline unless the user configures it online). Names follow the stage convention of DESIGN.md."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, run_dir: str | Path, *, config: dict[str, Any], use_wandb: bool = True,
                 wandb_mode: str = "offline", project: str = "trace_rl", entity: str | None = None,
                 run_name: str | None = None, tags: list[str] | None = None, console: str = "line",
                 resume: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console = console
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a" if resume else "w")
        self.wandb = None
        if use_wandb and wandb_mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb = wandb.init(
                    project=project, entity=entity, name=run_name, tags=tags or None, config=config,
                    dir=str(self.run_dir), mode=wandb_mode, resume="allow" if resume else None,
                    id=_wandb_id(self.run_dir) if resume else None,
                )
                (self.run_dir / "wandb_id.txt").write_text(self.wandb.id)
            except Exception as e:  # logging must never stop training
                log.warning("W&B disabled: %s", e)
                self.wandb = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: _plain(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(clean, step=step)

    def print_step(self, step: int, total: int, m: dict[str, Any]) -> None:
        if self.console == "none":
            return
        stages = " ".join(f"{k.split('/')[-1]}={m[k]:.1f}" for k in m if k.startswith("timing_s/") and k != "timing_s/step")
        line = (f"step {step:>4}/{total} | reward {m.get('train/reward_mean', float('nan')):.3f} "
                f"acc {m.get('train/accuracy', float('nan')):.3f} | entropy {m.get('train/entropy', float('nan')):.3f} "
                f"| len {m.get('train/response_length', float('nan')):.1f} "
                f"| {m.get('perf/throughput_tokens_per_s', 0):.0f} tok/s | {m.get('timing_s/step', 0):.1f} s ({stages})")
        print(line, file=sys.stdout, flush=True)

    def finish(self) -> None:
        self._jsonl.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:
                log.warning("W&B finish failed: %s", e)


def _wandb_id(run_dir: Path) -> str | None:
    p = run_dir / "wandb_id.txt"
    return p.read_text().strip() if p.exists() else None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
