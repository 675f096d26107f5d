"""Bytes that pass through the driver process per training step, for any checkout of trace_rl.

Runs ``trace_rl.train`` in this process with ``ray.get`` / ``ray.put`` wrapped to add up the payload of
every value the driver fetches or stores (``trace_rl.pipeline.payload_bytes``'s rule: tensor buffers,
string lengths, 8 bytes per other scalar), then prints the totals over the run divided by the number of
steps. Evaluation is switched off so that only training steps (and start-up) are counted.

    .venv/bin/python scripts/bench/driver_bytes.py                          # this checkout
    .venv/bin/python scripts/bench/driver_bytes.py --src /tmp/old_checkout   # e.g. the lockstep loop (072e783)
    .venv/bin/python scripts/bench/driver_bytes.py -- algorithm=trace       # extra overrides after --

Make an old checkout with ``git worktree add /tmp/old_checkout 072e783``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def payload_bytes(obj, depth: int = 0) -> int:
    """The same estimate as trace_rl.pipeline.payload_bytes (copied so that an old checkout can be measured)."""
    import dataclasses

    if depth > 12:
        return 8
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return int(obj.numel() * obj.element_size())
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int) and not isinstance(obj, type):
        return nbytes
    if isinstance(obj, (str, bytes, bytearray)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(payload_bytes(k, depth + 1) + payload_bytes(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(payload_bytes(v, depth + 1) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(payload_bytes(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj))
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and depth < 4:
        return payload_bytes(vars(obj), depth + 1)
    return 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[2]), help="the trace_rl checkout to run")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    src = str(Path(args.src).resolve())
    sys.path.insert(0, src)
    os.chdir(src)
    import ray

    counts = {"fetched": 0, "put": 0, "largest_fetch": 0}
    get, put = ray.get, ray.put

    def counted_get(refs, *a, **k):
        out = get(refs, *a, **k)
        n = payload_bytes(out)
        counts["fetched"] += n
        counts["largest_fetch"] = max(counts["largest_fetch"], n)
        return out

    def counted_put(value, *a, **k):
        counts["put"] += payload_bytes(value)
        return put(value, *a, **k)

    ray.get, ray.put = counted_get, counted_put
    import trace_rl.train as train

    assert train.__file__.startswith(src), (train.__file__, src)
    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = ["trace_rl.train", f"trainer.total_steps={args.steps}", "eval.before=false", "eval.after=false",
                    "trainer.save_final=false", "logger.wandb=false", "logger.console=none",
                    f"trainer.run_dir={tmp}/run", *args.overrides]
        train.main()
        steps = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    per_step = [m.get("driver/fetched_bytes") for m in steps if "timing_s/step" in m]
    print(json.dumps({"src": src, "steps": args.steps, "fetched_bytes_per_step": counts["fetched"] / args.steps,
                      "put_bytes_per_step": counts["put"] / args.steps, "largest_fetch": counts["largest_fetch"],
                      "loop_fetched_bytes_per_step": per_step if any(v is not None for v in per_step) else None,
                      "batch_bytes": [m.get("pipeline/batch_bytes") for m in steps if "timing_s/step" in m]},
                     indent=1))


if __name__ == "__main__":
    main()
