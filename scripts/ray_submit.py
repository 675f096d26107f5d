#!/usr/bin/env python
"""Submit one trace_rl training job to a running Ray cluster with ``ray job submit``.

    python scripts/ray_submit.py [launcher options] -- [Hydra overrides of trace_rl.train]

    python scripts/ray_submit.py --address http://HEAD:8265 -- \\
        experiment=<recipe> model.path=/shared/models/Qwen3-1.7B data.task=/shared/data/train.jsonl \\
        trainer.run_dir=/shared/runs/trace-1p7b

What it runs (``--dry-run`` prints it and exits):

    ray job submit --address <dashboard> --submission-id <id> --runtime-env-json '<json>' \\
        -- python -m trace_rl.train <overrides>

The job's driver (trace_rl/train.py) starts on the head node, in a copy of the working directory
that Ray unpacks there; ``ray job submit`` sets ``RAY_ADDRESS`` for it, and
``trace_rl.cluster.init_ray`` joins that cluster instead of starting a private one.

Notes (docs/cluster.md says the same, with the whole cluster path):

* **Token authentication** (Ray 2.60). A cluster started while a token exists (``~/.ray/auth_token``,
  or ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``) or with ``RAY_AUTH_MODE=token`` requires the token
  on every client request. ``ray get-auth-token --generate`` creates one; the head and every worker
  node need the same token (copy ``~/.ray/auth_token`` or export ``RAY_AUTH_TOKEN``). Client commands
  send it only when ``RAY_AUTH_MODE=token`` is in *their* environment: without it they get
  ``401 Unauthorized``. ``--auth auto`` (the default) sets ``RAY_AUTH_MODE=token`` for the ``ray job
  submit`` it runs whenever a token is found; ``--auth disabled`` for clusters started with
  ``RAY_AUTH_MODE=disabled``.
* **Environment propagation.** The job's ``runtime_env.env_vars`` carry the variables named by
  ``--env`` (default: ``WANDB_API_KEY WANDB_MODE WANDB_ENTITY WANDB_PROJECT HF_HOME HF_TOKEN
  TRACE_RL_CACHE TRACE_RL_LOG HF_HUB_OFFLINE TRANSFORMERS_OFFLINE``) when they are set here, plus
  ``--env KEY=VALUE`` pairs. Ray gives them to the driver and to every actor of the job, on every node.
  The driver then adds ``trace_rl.cluster.actor_env()`` (zero-copy tensors, quiet logs, ...) for the
  keys the job does not set (``init_ray`` leaves the job's own values alone, so Ray has nothing to
  merge and no conflict to refuse). Whatever is in the runtime
  env is readable through the job API by anyone holding the cluster token: put long-lived secrets
  (``WANDB_API_KEY``) in the nodes' environment instead if that matters (``--no-env`` drops the
  defaults).
* **Working directory.** The project directory is zipped and uploaded (``--working-dir``, default:
  this repository) so that the cluster runs exactly the code and ``conf/`` you have. Ray caps the
  package at 512 MiB (the gRPC message size) and warns on files over 10 MiB; it honours
  ``.gitignore`` / ``.rayignore``, and the launcher excludes ``.git``, ``.venv``, ``runs/``,
  ``outputs/``, ``multirun/``, ``wandb/`` and caches on top. Models, data and checkpoints never go in
  it: they are paths on a filesystem every node mounts. ``--no-working-dir`` runs the code installed
  in the nodes' environment (the Docker image) instead.
* **Where the run goes.** The uploaded copy is temporary and lives on the head node only: give an
  absolute ``trainer.run_dir=`` (or ``hydra.run.dir=``) on a shared filesystem, or the run (summary,
  checkpoints, W&B files) ends up in a directory that is deleted with the job's resources. The
  launcher warns when neither is given.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Variables forwarded from the submitting shell into the job's runtime_env (when set).
DEFAULT_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY", "WANDB_PROJECT", "HF_HOME", "HF_TOKEN",
               "TRACE_RL_CACHE", "TRACE_RL_LOG", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

#: Never uploaded with the working directory (gitignore-style patterns, on top of .gitignore).
DEFAULT_EXCLUDES = (".git", ".venv", "venv", "runs/", "outputs/", "multirun/", "wandb/", ".pytest_cache/",
                    "__pycache__/", "*.egg-info/", "*.safetensors", "*.bin", "*.pt")


def token_available(env: dict[str, str]) -> bool:
    """Whether a Ray auth token can be found the way Ray looks for one (env var, path, default file)."""
    if env.get("RAY_AUTH_TOKEN"):
        return True
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return Path(path).expanduser().is_file()
    return (Path.home() / ".ray" / "auth_token").is_file()


def client_env(auth: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the ``ray job submit`` process: ``RAY_AUTH_MODE`` according to ``auth``."""
    env = dict(os.environ if base is None else base)
    if auth == "token" or (auth == "auto" and "RAY_AUTH_MODE" not in env and token_available(env)):
        env["RAY_AUTH_MODE"] = "token"
    elif auth == "disabled":
        env["RAY_AUTH_MODE"] = "disabled"
    return env


def parse_env_args(items: list[str], defaults: bool, environ: dict[str, str]) -> dict[str, str]:
    """``--env`` values (``NAME`` copies the variable from here if set, ``NAME=VALUE`` sets it)."""
    names = list(DEFAULT_ENV) if defaults else []
    out: dict[str, str] = {}
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            out[key] = value
        else:
            names.append(item)
    for name in names:
        if name in environ and name not in out:
            out[name] = environ[name]
    return out


def build_runtime_env(working_dir: str | None, env_vars: dict[str, str], excludes: list[str]) -> dict:
    env_vars = dict(env_vars)
    env_vars.setdefault("PYTHONUNBUFFERED", "1")
    runtime_env: dict = {"env_vars": env_vars}
    if working_dir:
        runtime_env["working_dir"] = working_dir
        runtime_env["excludes"] = list(excludes)
    return runtime_env


def output_warning(overrides: list[str]) -> str | None:
    """A warning when the run directory would land in the job's temporary working directory."""
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in ("trainer.run_dir", "hydra.run.dir", "hydra.sweep.dir") and value:
            if os.path.isabs(value):
                return None
            return (f"{key}={value} is relative: it resolves inside the job's temporary copy of the working "
                    "directory on the head node. Use an absolute path on a filesystem shared by all nodes.")
    return ("no trainer.run_dir= given: the run (summary.json, checkpoints, W&B files) goes to the job's "
            "temporary working directory on the head node. Pass trainer.run_dir=/shared/runs/<name>.")


def redacted(cmd: list[str]) -> list[str]:
    """``cmd`` with the values of secret-looking env vars (``*KEY*``, ``*TOKEN*``, ``*SECRET*``,
    ``*PASSWORD*``) in the runtime-env JSON replaced by ``***``, for printing."""
    out = list(cmd)
    for i, part in enumerate(out[:-1]):
        if part == "--runtime-env-json":
            runtime_env = json.loads(out[i + 1])
            env_vars = runtime_env.get("env_vars", {})
            for key in env_vars:
                if any(s in key.upper() for s in ("KEY", "TOKEN", "SECRET", "PASSWORD")):
                    env_vars[key] = "***"
            out[i + 1] = json.dumps(runtime_env, sort_keys=True)
    return out


def ray_cli() -> str:
    """The ``ray`` executable of this Python environment (falls back to the PATH)."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def build_command(args: argparse.Namespace, overrides: list[str], environ: dict[str, str]) -> list[str]:
    env_vars = parse_env_args(args.env, defaults=not args.no_env, environ=environ)
    working_dir = None if args.no_working_dir else str(Path(args.working_dir).resolve())
    runtime_env = build_runtime_env(working_dir, env_vars, [*DEFAULT_EXCLUDES, *args.exclude])
    cmd = [ray_cli(), "job", "submit", "--address", args.address, "--submission-id", args.submission_id,
           "--runtime-env-json", json.dumps(runtime_env, sort_keys=True)]
    if args.entrypoint_num_cpus is not None:
        cmd += ["--entrypoint-num-cpus", str(args.entrypoint_num_cpus)]
    if args.no_wait:
        cmd.append("--no-wait")
    return [*cmd, "--", *shlex.split(args.python), "-m", "trace_rl.train", *overrides]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        own, overrides = argv[:i], argv[i + 1:]
    else:
        own, overrides = argv, []
    p = argparse.ArgumentParser(
        description="Submit a trace_rl training job to a Ray cluster (ray job submit). "
                    "Hydra overrides for trace_rl.train go after `--`.",
        epilog="Example: %(prog)s --address http://10.0.0.1:8265 -- experiment=<recipe> "
               "model.path=/shared/models/m trainer.run_dir=/shared/runs/r1")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
                   or "http://127.0.0.1:8265",
                   help="the head node's job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                        "$RAY_ADDRESS, then http://127.0.0.1:8265)")
    p.add_argument("--submission-id", default=None,
                   help="job id (default: trace_rl-<timestamp>); `ray job logs/status/stop <id>` use it")
    p.add_argument("--working-dir", default=str(REPO_ROOT), help="directory uploaded as the job's working dir")
    p.add_argument("--no-working-dir", action="store_true",
                   help="upload nothing: run the trace_rl installed on the nodes (the Docker image)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="more gitignore-style patterns left out of the upload")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="forward NAME from this shell (or set NAME=VALUE) in the job's runtime_env; repeatable")
    p.add_argument("--no-env", action="store_true", help=f"do not forward the defaults {', '.join(DEFAULT_ENV)}")
    p.add_argument("--auth", choices=("auto", "token", "disabled"), default="auto",
                   help="RAY_AUTH_MODE for the client: auto = token when a token is found (default)")
    p.add_argument("--python", default="python",
                   help="the entrypoint's interpreter on the head node (default: `python` on the PATH of `ray start`)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None,
                   help="CPUs reserved for the driver itself (default: none, as ray job submit)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting instead of streaming the logs")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    args = p.parse_args(own)
    if args.submission_id is None:
        args.submission_id = f"trace_rl-{time.strftime('%Y%m%d-%H%M%S')}"
    if not args.no_working_dir and not (Path(args.working_dir) / "trace_rl").is_dir():
        p.error(f"--working-dir {args.working_dir} has no trace_rl/ package: point it at the project root "
                "or pass --no-working-dir to use the installed package")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cmd = build_command(args, overrides, dict(os.environ))
    env = client_env(args.auth)
    warning = output_warning(overrides)
    if warning:
        print(f"ray_submit: warning: {warning}", file=sys.stderr)
    shown = shlex.join(redacted(cmd))
    if args.dry_run:
        print(shown)
        return 0
    print(f"ray_submit: RAY_AUTH_MODE={env.get('RAY_AUTH_MODE', '<unset>')} {shown}", file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
