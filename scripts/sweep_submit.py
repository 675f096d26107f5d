#!/usr/bin/env python
"""A Hydra sweep as one ``ray job submit`` per point (the alternative to ``hydra/launcher=ray_cluster``).

    python scripts/sweep_submit.py --sweep-dir /shared/sweeps/kl [launcher options] -- <overrides>

    python scripts/sweep_submit.py --address http://HEAD:8265 --sweep-dir /shared/sweeps/trace-vs-grpo -- \\
        experiment=<recipe> model.path=/shared/models/m data.task=/shared/data/train.jsonl \\
        algorithm=grpo,trace algorithm.trace_lambda.start=0.25,0.5

The overrides are expanded the way Hydra's basic sweeper does (Hydra's own override parser: comma
lists, ``range(...)``, ``choice(...)``, quoting; the cartesian product of every swept key) and each
point is submitted through scripts/ray_submit.py with ``hydra.run.dir=<sweep-dir>/<i>``, so the
sweep directory has the layout of a local ``-m`` run (``<i>/summary.json``, ``<i>/.hydra/``) and
``python -m trace_rl.report <sweep-dir>`` compares the points. ``--dry-run`` prints the points and
the commands and submits nothing.

Why one job per point rather than the Ray launcher: each point is a job of its own in the dashboard
(``ray job status/logs/stop <id>``), one point failing or being stopped leaves the others alone,
and nothing beyond ``ray[default]`` is needed anywhere (the launcher plugin pins cloudpickle<3 and
must be installed on every node). The price: Ray runs all submitted jobs at once (no queue), so a
sweep larger than the cluster waits in placement (``cluster.placement_timeout_s``); ``--max-jobs``
submits in waves, waiting for a wave to finish before the next.

Launcher options not listed by ``--help`` (``--address``, ``--env``, ``--auth``, ...) are passed to
scripts/ray_submit.py unchanged.
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# keys a point must not set itself: the sweep owns the run directory
_OWNED = ("hydra.run.dir", "trainer.run_dir", "hydra.sweep.dir")


def expand(overrides: list[str]) -> list[list[str]]:
    """Every point of the sweep, as override lists (Hydra's parser; product over swept keys in order)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    axes: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            if o.is_hydra_override():
                raise ValueError(f"{o.input_line}: sweeping hydra.* keys is not supported here")
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(p) for p in itertools.product(*axes)]


def check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key in _OWNED:
            raise SystemExit(f"sweep_submit: {key} is set per point by --sweep-dir (<sweep-dir>/<i>); "
                             f"remove {o!r} from the overrides")
        if o in ("-m", "--multirun"):
            raise SystemExit("sweep_submit: leave out -m: every point is submitted as a plain run")


def job_status(address_args: list[str], submission_id: str) -> str:
    """``ray job status`` of one job (SUCCEEDED, FAILED, STOPPED, RUNNING, ...) via the same launcher env."""
    sys.path.insert(0, str(HERE))
    import ray_submit

    own, _ = ray_submit.parse_args([*address_args, "--"])
    r = subprocess.run([ray_submit.ray_cli(), "job", "status", "--address", own.address, submission_id],
                       capture_output=True, text=True, env=ray_submit.client_env(own.auth))
    for status in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
        if status in r.stdout:
            return status
    return "UNKNOWN"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description="Submit each point of a Hydra sweep as its own Ray job.",
                                epilog="Other options (--address, --env, --auth, --python, ...) go to "
                                       "scripts/ray_submit.py.")
    p.add_argument("--sweep-dir", required=True,
                   help="absolute directory on the shared filesystem; point i runs in <sweep-dir>/<i>")
    p.add_argument("--name", default=None, help="submission id prefix (default: sweep-<timestamp>)")
    p.add_argument("--max-jobs", type=int, default=0,
                   help="submit at most this many points at a time and wait for them (0: all at once)")
    p.add_argument("--poll-s", type=float, default=30.0, help="status poll interval with --max-jobs")
    p.add_argument("--dry-run", action="store_true", help="print the points and commands, submit nothing")
    args, launcher_args = p.parse_known_args(own)
    if not Path(args.sweep_dir).is_absolute():
        p.error(f"--sweep-dir {args.sweep_dir}: must be absolute (a path every node sees)")
    check_overrides(overrides)
    points = expand(overrides)
    name = args.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"sweep_submit: {len(points)} point(s) -> {args.sweep_dir}", flush=True)

    sys.path.insert(0, str(HERE))
    import ray_submit

    jobs: list[str] = []
    for i, point in enumerate(points):
        if args.max_jobs and len(jobs) >= args.max_jobs and not args.dry_run:
            while any(job_status(launcher_args, j) in ("RUNNING", "PENDING") for j in jobs):
                time.sleep(args.poll_s)
            jobs = []
        sid = f"{name}-{i}"
        cmd = [*launcher_args, "--submission-id", sid, "--no-wait",
               *(["--dry-run"] if args.dry_run else []), "--", *point, f"hydra.run.dir={args.sweep_dir}/{i}"]
        print(f"[{i}] {sid}: {shlex.join(point)}", flush=True)
        rc = ray_submit.main(cmd)
        if rc != 0:
            print(f"sweep_submit: submitting point {i} failed (exit {rc}); points after it were not submitted",
                  file=sys.stderr)
            return rc
        jobs.append(sid)
    if not args.dry_run:
        print(f"sweep_submit: submitted {len(points)} job(s) {name}-0..{len(points) - 1}; "
              f"`ray job status <id>`, then `python -m trace_rl.report {args.sweep_dir}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
