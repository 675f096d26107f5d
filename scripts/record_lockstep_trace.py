"""Record (or check) the fixed-seed lockstep trace that ``tests/integration/test_lockstep_trace.py`` compares.

A lockstep run (``trainer.max_staleness=0``) on the HF engine with one learner rank is bitwise
deterministic on a given machine: the same seed gives the same samples, rewards, losses and
gradient norms. The trace in ``tests/fixtures/lockstep_trace.json`` was recorded with the driver as
it was BEFORE the pipeline restructuring (commit 072e783), so the test proves that the pipelined
driver at ``max_staleness=0`` reproduces the old lockstep loop exactly.

    .venv/bin/python scripts/record_lockstep_trace.py --out tests/fixtures/lockstep_trace.json   # record
    .venv/bin/python scripts/record_lockstep_trace.py --check tests/fixtures/lockstep_trace.json # compare

Re-record only when a change is MEANT to alter the numbers (say why in the commit).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# The runs of the trace: (name, overrides). Small, so that the test costs about a minute each.
COMMON = [
    "rollout=hf", "learner.num_ranks=1", "learner.micro_batch_size=8", "data.prompts_per_step=8", "rollout.n=4",
    "rollout.max_new_tokens=48", "trainer.total_steps=4", "eval.before=false", "eval.after=false",
    "trainer.save_final=false", "algorithm.lr=1e-4", "logger.wandb=false", "logger.console=none",
    "trainer.seed=3", "data.seed=3",
]
# Options added after the trace was recorded whose default changes float rounding only; the check runs with
# the old behaviour (tests/pipeline/test_route.py checks that they do not change the loss).
CHECK_ONLY = ["learner.sort_by_length=false"]
RUNS = {
    "grpo": ["algorithm=grpo"],
    "trace": ["algorithm=trace", "annotator=oracle", "teacher=self", "teacher.resync_every=2",
              "algorithm.trace_lambda.hold_steps=2", "algorithm.trace_lambda.decay_steps=2"],
}
# Metrics that are wall-clock, machine state or bookkeeping rather than the computation itself.
VOLATILE = ("timing_s/", "perf/", "sync/", "idle_s/", "async/", "buffer/", "teacher/calls", "teacher/syncs",
            "teacher/version", "teacher/tokens")


def model_digest(path: str) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run(name: str, extra: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "trace_rl.train", *COMMON, *RUNS[name], *extra, f"trainer.run_dir={tmp}/run"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
        if r.returncode != 0:
            raise SystemExit(f"{name} run failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows if "timing_s/step" in row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the trace here")
    ap.add_argument("--check", help="compare a fresh run against this trace (exit 1 on a difference)")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    ap.add_argument("extra", nargs="*", help="extra overrides for every run (e.g. trainer.max_staleness=0)")
    args = ap.parse_args()
    from trace_rl.models.cache import tiny_model_path

    digest = model_digest(str(tiny_model_path(stage="sft")))
    extra = list(args.extra) + (CHECK_ONLY if args.check else [])
    trace = {"model_digest": digest, "common": COMMON,
             "runs": {name: run(name, extra) for name in args.runs.split(",")}}
    if args.out:
        Path(args.out).write_text(json.dumps(trace, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.out}")
    if args.check:
        want = json.loads(Path(args.check).read_text())
        bad = [f"{name} step {i + 1} {k}: {a.get(k)} != {b.get(k)}"
               for name, rows in trace["runs"].items() for i, (a, b) in enumerate(zip(rows, want["runs"][name]))
               for k in sorted(b) if a.get(k) != b.get(k)]  # new metrics may be added
        print("\n".join(bad) or "identical")
        raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
