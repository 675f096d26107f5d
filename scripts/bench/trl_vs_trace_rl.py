#!/usr/bin/env python
"""trace_rl vs TRL's GRPOTrainer on identical work, in one invocation; prints a markdown table.

    .venv/bin/python scripts/bench/trl_vs_trace_rl.py                       # the full benchmark
    .venv/bin/python scripts/bench/trl_vs_trace_rl.py --shapes 2x2x16 --steps 2 --staleness none   # smoke

Run it with the project's own python (it imports trace_rl to render the prompts). For each shape
(prompts x samples x max_tokens) and repeat it runs, each in its own process:

  * TRL: ``scripts/bench/_trl_job.py`` under a separate virtual environment (created on first use,
    default ~/.cache/trace_rl/bench/trl-venv: torch==2.13.0 from local disk first, then trl 1.16.*,
    transformers / accelerate pinned to this environment's versions, datasets, math-verify; torch is
    held at 2.13.0 with a pip constraint so no CUDA build is pulled);
  * trace_rl: ``python -m trace_rl.train`` with the matched overrides, once per ``--staleness`` value
    (``trainer.max_staleness=K``; ``none`` leaves the key out).

Both see the same tiny SFT model and the same prompts in the same order: the arith task's training
prompts, rendered as trace_rl renders them and taken in trace_rl's PromptSampler order; TRL gets the
prompt text as a plain-text ``prompt`` column (no chat template re-applied) with ``shuffle_dataset=False``.

Throughput = samples (steps x prompts x samples) and generated tokens over the training loop (TRL:
first optimizer step's start to last step's end; trace_rl: ``summary["train_loop_s"]`` when present,
else the sum of ``timing_s/step``). "whole-process s" is the wall time of the job's process, measured
here around the subprocess (imports, Ray / vLLM / DeepSpeed start-up, model loading, shutdown).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as md
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_VENV = Path.home() / ".cache" / "trace_rl" / "bench" / "trl-venv"
TORCH_PIN = "torch==2.13.0"
TRL_SPEC = "trl==1.16.*"
TRL_FALLBACK_SPEC = "trl>=1,<2"
READY_MARKER = ".bench_ready.json"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# the TRL virtual environment
def _pip(py: Path, args: list[str], logfile: Path) -> subprocess.CompletedProcess:
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *args]
    log("$ " + " ".join(cmd))
    with open(logfile, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)


def _venv_report(py: Path) -> dict:
    code = ("import json, torch, trl, transformers, accelerate, datasets, importlib.metadata as md;"
            "nv=[d.metadata['Name'] for d in md.distributions() if (d.metadata['Name'] or '').lower().startswith('nvidia')];"
            "print(json.dumps({'torch': torch.__version__, 'torch_cuda': torch.version.cuda, 'trl': trl.__version__,"
            "'transformers': transformers.__version__, 'accelerate': accelerate.__version__,"
            "'datasets': datasets.__version__, 'math_verify': md.version('math-verify'), 'nvidia_packages': nv}))")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the TRL venv at {py.parent.parent} is broken:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_trl_venv(venv: Path, rebuild: bool = False) -> dict:
    """Create (once) the TRL venv; returns its package versions (and notes on what was installed)."""
    py = venv / "bin" / "python"
    marker = venv / READY_MARKER
    if rebuild and venv.exists():
        shutil.rmtree(venv)
    if py.exists() and marker.exists():
        info = json.loads(marker.read_text())
        log(f"TRL venv ready: {venv} (trl {info.get('trl')}, torch {info.get('torch')})")
        return info
    venv.parent.mkdir(parents=True, exist_ok=True)
    logfile = venv.parent / f"{venv.name}-install.log"
    log(f"creating the TRL venv at {venv} (log: {logfile})")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    notes = []
    # 1. torch first, from local disk (PIP_FIND_LINKS); the CPU build
    if _pip(py, [TORCH_PIN], logfile).returncode != 0:
        raise RuntimeError(f"pip install {TORCH_PIN} failed; see {logfile}")
    # 2. TRL and its companions, torch held at the same version by a constraint (no CUDA torch)
    constraints = venv / "bench-constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    pins = []
    for dist in ("transformers", "accelerate"):  # the same versions as trace_rl's environment, if TRL accepts them
        try:
            pins.append(f"{dist}=={md.version(dist)}")
        except md.PackageNotFoundError:
            pins.append(dist)
    extras = ["datasets", "math-verify"]
    attempts = [([TRL_SPEC, *pins, *extras], None),
                ([TRL_SPEC, *[p.split("==")[0] for p in pins], *extras],
                 "transformers/accelerate could not be pinned to trace_rl's versions; pip chose them"),
                ([TRL_FALLBACK_SPEC, *[p.split("==")[0] for p in pins], *extras],
                 f"{TRL_SPEC} could not be installed; took the newest TRL 1.x")]
    for reqs, note in attempts:
        if _pip(py, ["-c", str(constraints), *reqs], logfile).returncode == 0:
            if note:
                notes.append(note)
            break
    else:
        raise RuntimeError(f"could not install TRL into {venv}; see {logfile}")
    info = _venv_report(py)
    if info["torch_cuda"] or info["nvidia_packages"] or not info["torch"].startswith("2.13.0"):
        raise RuntimeError(f"the TRL venv did not keep the CPU torch 2.13.0 ({info}); "
                           f"remove {venv} and check {logfile}")
    info["notes"] = notes
    marker.write_text(json.dumps(info, indent=2))
    log(f"TRL venv ready: {json.dumps(info)}")
    return info


# ---------------------------------------------------------------------------------------------
# trace_rl's configuration, prompts and prompt order
def trace_env(trace_src: Path | None) -> dict:
    """Environment of every trace_rl subprocess: ``--trace-src`` first on PYTHONPATH when given."""
    env = dict(os.environ)
    if trace_src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(trace_src), *filter(None, [env.get("PYTHONPATH")])])
    return env


def compose_trace_cfg(trace_py: str, overrides: list[str], cwd: Path, env: dict) -> tuple[str | None, str]:
    """``python -m trace_rl.train --cfg job <overrides>`` -> (the composed config as YAML, "") or (None, error)."""
    out = subprocess.run([trace_py, "-m", "trace_rl.train", "--cfg", "job", *overrides],
                         capture_output=True, text=True, cwd=str(cwd), env=env)
    if out.returncode != 0:
        return None, (out.stderr or out.stdout)[-4000:]
    return out.stdout, ""


def trace_prompts(trace_py: str, cfg_yaml: str, P: int, steps: int, work: Path, env: dict) -> dict:
    """Run :func:`build_prompts` under trace_rl's python (this file, ``--internal-prompts``)."""
    cfg_path, out_path = work / "trace_cfg.yaml", work / f"prompts-{P}x{steps}.json"
    cfg_path.write_text(cfg_yaml)
    cmd = [trace_py, str(Path(__file__).resolve()), "--internal-prompts", str(cfg_path), str(P), str(steps),
           str(out_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=str(work), env=env)
    if out.returncode != 0 or not out_path.exists():
        raise SystemExit("building the prompts with trace_rl failed:\n" + (out.stderr or out.stdout)[-4000:])
    sys.stdout.write(out.stdout)
    return json.loads(out_path.read_text())


def build_prompts(cfg: dict, P: int, steps: int) -> tuple[str, list[dict]]:
    """The model path and the ``steps * P`` prompts trace_rl's first ``steps`` steps take, in order:
    ``[{prompt (text), answer, ids (trace_rl's prompt token ids)}]``. Runs under trace_rl's python."""
    from transformers import AutoTokenizer

    from trace_rl.models.cache import tiny_model_path
    from trace_rl.tasks import instruction_for
    from trace_rl.tasks.base import build_messages, render_prompt
    from trace_rl.train import PromptSampler, load_split, tokenize_prompts

    model_cfg, data = cfg["model"], cfg["data"]
    if model_cfg.get("path", "tiny") != "tiny":
        raise SystemExit(f"the composed config's model.path is {model_cfg.get('path')!r}; this benchmark uses 'tiny'")
    model_path = str(tiny_model_path(stage="sft"))
    tok = AutoTokenizer.from_pretrained(model_cfg.get("tokenizer_path") or model_path)
    kwargs = dict(model_cfg.get("chat_template_kwargs") or {})
    problems = load_split(data["task"], "train", data["train_size"], data["seed"])
    kept, ids, dropped = tokenize_prompts(problems, tok, data["max_prompt_length"], data["task"],
                                          chat_template_kwargs=kwargs)
    sampler = PromptSampler(len(kept), data["seed"], data["shuffle"])
    instruction = instruction_for(data["task"])
    rows = []
    for _ in range(steps):
        for i in sampler.next(P):
            p = kept[i]
            if kwargs:
                text = tok.apply_chat_template(build_messages(p, instruction=instruction),
                                               add_generation_prompt=True, tokenize=False, **kwargs)
            else:
                text = render_prompt(p, tok, instruction=instruction)
            if tok(text, add_special_tokens=False)["input_ids"] != ids[i]:
                raise SystemExit(f"prompt {p.uid}: re-rendered text does not give trace_rl's token ids")
            rows.append({"uid": p.uid, "prompt": text, "answer": p.answer, "ids": ids[i]})
    log(f"prompts: {len(rows)} ({steps} steps x {P}) from {len(kept)} training prompts "
        f"({dropped} dropped as too long), order = trace_rl PromptSampler(seed={data['seed']}, "
        f"shuffle={data['shuffle']})")
    return model_path, rows


# ---------------------------------------------------------------------------------------------
def parse_shape(s: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"shape {s!r}: use PROMPTSxSAMPLESxMAX_TOKENS, e.g. 8x8x64")
    P, N, T = map(int, m.groups())
    if N < 2:
        raise argparse.ArgumentTypeError(f"shape {s!r}: GRPO needs at least 2 samples per prompt")
    return P, N, T


def pick_micro_batch(want: int, batch: int, ranks: int) -> tuple[int, int]:
    """(trace_rl learner.micro_batch_size, TRL per_device_train_batch_size): ``want`` if it divides the
    batch (per rank for trace_rl), else the largest divisor below it."""
    def largest_divisor(n: int, cap: int) -> int:
        return max(d for d in range(1, min(cap, n) + 1) if n % d == 0)

    per_rank = batch // max(ranks, 1)
    return largest_divisor(per_rank, want), largest_divisor(batch, want)


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all CPUs' time that was busy over ``seconds`` (from /proc/stat; 0 where unavailable)."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)  # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_until_idle(limit: float = 0.1, max_wait_s: float = 120.0) -> float:
    """Wait (at most ``max_wait_s``) until the CPUs were less than ``limit`` busy for a second: the previous
    job's shutdown must not run into the next job's timing. Returns the busy fraction last seen."""
    t_end = time.time() + max_wait_s
    busy = cpu_busy_fraction()
    while busy > limit and time.time() < t_end:
        busy = cpu_busy_fraction()
    return busy


def run_logged(cmd: list[str], logfile: Path, cwd: Path, env: dict, timeout: float) -> tuple[int, float]:
    busy = wait_until_idle()
    if busy > 0.1:
        log(f"WARNING: the CPUs are still {100 * busy:.0f}% busy before this job; its timing is unreliable")
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(cwd), env=env,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -9
            f.write(f"\n[bench] killed after {timeout} s\n")
    return rc, time.perf_counter() - t0


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def last_error(text: str) -> str:
    """The last 'SomeError: message' line of a traceback, if any."""
    hits = re.findall(r"^(?:[\w.]+(?:Error|Exception|Exit)|KeyboardInterrupt)\b.*$", text, re.M)
    return hits[-1][:300] if hits else ""


def run_trl(trl_py: Path, shape, steps: int, micro: int, model_path: str, prompts: list[dict],
            job_dir: Path, timeout: float) -> dict:
    P, N, T = shape
    job_dir.mkdir(parents=True, exist_ok=True)
    job = {"model_path": model_path, "prompts": prompts, "prompts_per_step": P, "samples": N,
           "max_tokens": T, "steps": steps, "micro_batch": micro, "work_dir": str(job_dir)}
    (job_dir / "job.json").write_text(json.dumps(job))
    result_path = job_dir / "result.json"
    env = {**os.environ, "WANDB_DISABLED": "true", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # nothing of trace_rl's environment leaks into TRL's
    cmd = [str(trl_py), str(HERE / "_trl_job.py"), str(job_dir / "job.json"), str(result_path)]
    log(f"TRL {P}x{N}x{T}: {' '.join(cmd)}")
    rc, wall = run_logged(cmd, job_dir / "log.txt", job_dir, env, timeout)
    if rc != 0 or not result_path.exists():
        err = last_error(tail(job_dir / "log.txt", 60))
        return {"framework": "TRL", "ok": False, "error": f"exit {rc}" + (f": {err}" if err else ""),
                "log": str(job_dir / "log.txt"),
                "log_tail": tail(job_dir / "log.txt"), "process_s": wall}
    r = json.loads(result_path.read_text())
    r.update({"framework": "TRL", "process_s": wall, "log": str(job_dir / "log.txt")})
    print("    TRL effective config: " + json.dumps(r["effective_config"]), flush=True)
    if r["steps_done"] != steps:
        r["warning"] = f"TRL ran {r['steps_done']} optimizer steps, not {steps}"
    return r


def trace_overrides(shape, steps: int, staleness: str, micro: int, run_dir: Path, extra: list[str]) -> list[str]:
    P, N, T = shape
    ov = [f"data.prompts_per_step={P}", f"rollout.n={N}", f"rollout.max_new_tokens={T}",
          f"trainer.total_steps={steps}", "eval.before=false", "eval.after=false", "trainer.save_final=false",
          "algorithm.lr=1e-6", "algorithm.clip_eps_low=0.2", "algorithm.clip_eps_high=0.2",
          "rollout.temperature=1.0", "logger.wandb=false", f"learner.micro_batch_size={micro}",
          f"trainer.run_dir={run_dir}", f"hydra.run.dir={run_dir / 'hydra'}"]
    if staleness != "none":
        ov.append(f"trainer.max_staleness={staleness}")
    return ov + list(extra)


def read_trace_run(run_dir: Path, shape, steps: int) -> dict:
    P, N, _ = shape
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            m = json.loads(line)
            if "timing_s/step" in m or "train/response_length" in m:  # a training step's line
                rows.append(m)

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    if "train_loop_s" in summary:
        loop_s, loop_src = float(summary["train_loop_s"]), 'summary["train_loop_s"]'
    else:
        loop_s, loop_src = sum(num(m.get("timing_s/step")) for m in rows), "sum of timing_s/step"
    token_keys = [k for k in ("train/response_tokens", "perf/response_tokens", "train/num_response_tokens",
                              "train/tokens") if any(k in m for m in rows)]
    if token_keys:
        tokens, tok_src = sum(num(m.get(token_keys[0], 0)) for m in rows), token_keys[0]
    else:
        tokens = sum(num(m.get("train/response_length")) * P * N for m in rows)
        tok_src = "sum of train/response_length x prompts x samples"
    breakdown, asyncm = {}, {}
    for m in rows:
        for k, v in m.items():
            if k.startswith(("idle_s/", "timing_s/")):
                breakdown[k] = breakdown.get(k, 0.0) + num(v)
            elif k.startswith("async/"):
                asyncm.setdefault(k, []).append(num(v))
    step_s = [num(m.get("timing_s/step")) for m in rows]
    return {"steps_done": len(rows), "samples": len(rows) * P * N, "completion_tokens": tokens, "step_s": step_s,
            "train_loop_s": loop_s, "train_loop_source": loop_src, "tokens_source": tok_src,
            "stage_sums_s": dict(sorted(breakdown.items())),
            "async_means": {k: statistics.fmean(v) for k, v in sorted(asyncm.items())},
            "reward_mean": statistics.fmean(num(m.get("train/reward_mean")) for m in rows) if rows else None,
            "learn_sequences": sum(num(m.get("train/learn_sequences", float("nan"))) for m in rows),
            "job_wall_time_s": summary.get("wall_time_s"), "summary_keys": sorted(summary)}


def run_trace(trace_py: str, shape, steps: int, staleness: str, micro: int, job_dir: Path, extra: list[str],
              timeout: float, env: dict) -> dict:
    job_dir.mkdir(parents=True, exist_ok=True)
    run_dir = job_dir / "run"
    cmd = [trace_py, "-m", "trace_rl.train", *trace_overrides(shape, steps, staleness, micro, run_dir, extra)]
    env = {**env, "WANDB_MODE": "disabled"}
    log(f"trace_rl {'x'.join(map(str, shape))} staleness={staleness}: {' '.join(cmd)}")
    rc, wall = run_logged(cmd, job_dir / "log.txt", job_dir, env, timeout)
    base = {"framework": "trace_rl", "staleness": staleness, "process_s": wall, "log": str(job_dir / "log.txt"),
            "command": cmd}
    if rc != 0 or not (run_dir / "summary.json").exists():
        text = tail(job_dir / "log.txt", 60)
        err = f"exit {rc}" + (f": {last_error(text)}" if last_error(text) else "")
        if "max_staleness" in text and ("not in" in text or "Could not override" in text):
            err = "trainer.max_staleness is not a key of this trace_rl's config (not added yet?)"
        return {**base, "ok": False, "error": err, "log_tail": text}
    r = {**base, "ok": True, **read_trace_run(run_dir, shape, steps)}
    if r["steps_done"] != steps:
        r["warning"] = f"metrics.jsonl has {r['steps_done']} training steps, not {steps}"
    return r


# ---------------------------------------------------------------------------------------------
def median_row(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return {"ok": False, "error": runs[-1].get("error", "failed") if runs else "not run"}
    med = lambda k: statistics.median(r[k] for r in ok)  # noqa: E731
    loop, whole = med("train_loop_s"), med("process_s")
    samples, tokens = med("samples"), med("completion_tokens")
    return {"ok": True, "n": len(ok), "samples": samples, "tokens": tokens, "train_loop_s": loop,
            "process_s": whole, "samples_per_s": samples / loop if loop else float("nan"),
            "tokens_per_s": tokens / loop if loop else float("nan"),
            "samples_per_process_s": samples / whole if whole else float("nan")}


def fmt(x, nd=2):
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:,.{nd}f}"


def render_table(header: list[str], table_rows: list[dict]) -> str:
    lines = header + ["",
                      "| shape | framework | samples/s | tokens/s | training-loop s | whole-process s "
                      "| ratio trace_rl/TRL (samples/s) | whole-process ratio |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in table_rows:
        a = t["agg"]
        if not a.get("ok"):
            err = str(a.get("error")).replace("|", "/").replace("\n", " ")
            lines.append(f"| {t['shape']} | {t['label']} | FAILED: {err} | | | | | |")
            continue
        lines.append(f"| {t['shape']} | {t['label']} | {fmt(a['samples_per_s'])} | {fmt(a['tokens_per_s'], 0)} | "
                     f"{fmt(a['train_loop_s'])} | {fmt(a['process_s'], 1)} | {fmt(t.get('ratio'))} | "
                     f"{fmt(t.get('whole_ratio'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--internal-prompts"]:  # helper mode, under trace_rl's python
        import yaml

        cfg_path, P, steps, out = argv[1], int(argv[2]), int(argv[3]), argv[4]
        model_path, rows = build_prompts(yaml.safe_load(Path(cfg_path).read_text()), P, steps)
        Path(out).write_text(json.dumps({"model_path": model_path, "rows": rows}))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8x8x64,32x8x128",
                    help="comma-separated PROMPTSxSAMPLESxMAX_TOKENS (default 8x8x64,32x8x128)")
    ap.add_argument("--steps", type=int, default=10, help="training steps per job (default 10)")
    ap.add_argument("--staleness", default="0,1",
                    help="comma-separated trainer.max_staleness values for trace_rl; 'none' leaves the key out")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each job (the table shows medians)")
    ap.add_argument("--skip-trl", action="store_true", help="do not run TRL")
    ap.add_argument("--skip-trace", action="store_true", help="do not run trace_rl")
    ap.add_argument("--micro-batch", type=int, default=16,
                    help="sequences per forward/backward: trace_rl learner.micro_batch_size (per rank) and TRL "
                         "per_device_train_batch_size (default 16, trace_rl's default; lowered to a divisor)")
    ap.add_argument("--trl-venv", type=Path, default=DEFAULT_VENV, help=f"TRL's virtual environment (default {DEFAULT_VENV})")
    ap.add_argument("--rebuild-trl-venv", action="store_true", help="delete and re-create the TRL venv")
    ap.add_argument("--setup-only", action="store_true", help="create the TRL venv and exit")
    ap.add_argument("--trace-python", default=None,
                    help="python of trace_rl's environment (default: <repo>/.venv/bin/python, else this python)")
    ap.add_argument("--trace-src", type=Path, default=None,
                    help="put this source tree first on trace_rl's PYTHONPATH (e.g. a clean checkout of a commit)")
    ap.add_argument("--trace-override", action="append", default=[],
                    help="extra Hydra override for trace_rl (repeatable)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where job files, logs and run dirs go (default ~/.cache/trace_rl/bench/runs/<time>)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default <work-dir>/results.json)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per job before it is killed")
    args = ap.parse_args(argv)

    trl_py = args.trl_venv / "bin" / "python"
    if not args.skip_trl or args.setup_only:
        venv_info = ensure_trl_venv(args.trl_venv, rebuild=args.rebuild_trl_venv)
    else:
        venv_info = None
    if args.setup_only:
        return 0

    shapes = [parse_shape(s) for s in args.shapes.split(",") if s.strip()]
    stale = [s.strip() for s in args.staleness.split(",") if s.strip()]
    for s in stale:
        if s != "none" and not s.isdigit():
            ap.error(f"--staleness {s!r}: use non-negative integers or 'none'")
    trace_py = args.trace_python or (str(REPO / ".venv" / "bin" / "python")
                                     if (REPO / ".venv" / "bin" / "python").exists() else sys.executable)
    work = args.work_dir or (Path.home() / ".cache" / "trace_rl" / "bench" / "runs"
                             / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    work.mkdir(parents=True, exist_ok=True)
    out_path = args.out or work / "results.json"

    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        usable = cores
    busy = wait_until_idle()
    load = os.getloadavg()
    header = [f"# trace_rl vs TRL GRPOTrainer ({_dt.datetime.now().isoformat(timespec='seconds')})", "",
              f"- machine: {cores} cores ({usable} usable), {100 * busy:.0f}% busy at start; every job starts once "
              f"the CPUs were under 10% busy for a second (load average at start {load[0]:.2f} / {load[1]:.2f} / "
              f"{load[2]:.2f}: 1 / 5 / 15-minute averages, which lag)",
              f"- {args.steps} steps per job, repeats {args.repeats} (medians shown); samples = steps x prompts "
              "x samples; tokens = generated completion tokens",
              "- training-loop s: TRL first step start -> last step end; trace_rl summary train_loop_s or "
              "sum of timing_s/step. whole-process s: the job's process wall time (start-up included)",
              "- ratio columns: trace_rl / TRL of samples/s over the training loop, and over the whole "
              "process (> 1 = trace_rl faster)"]
    if venv_info:
        header.append(f"- TRL {venv_info.get('trl')}, transformers {venv_info.get('transformers')}, "
                      f"torch {venv_info.get('torch')} (TRL venv {args.trl_venv})")
    warn = None
    if busy > 0.1:
        warn = (f"WARNING: the CPUs stayed {100 * busy:.0f}% busy for two minutes before the first job: something "
                "else is using them, timings are unreliable")
        header.append(f"- **{warn}**")
        log(warn)

    # trace_rl's composed config: prompts settings, learner ranks, and whether max_staleness is known
    tenv = trace_env(args.trace_src)
    base_cfg, err = compose_trace_cfg(trace_py, list(args.trace_override), work, tenv)
    if base_cfg is None:
        log("could not compose trace_rl's config:\n" + err)
        return 2
    m = re.search(r"^learner:\n(?:  .*\n)*?  num_ranks: (\d+)", base_cfg, re.M)
    ranks = int(m.group(1)) if m else 2
    stale_ok = {}
    if not args.skip_trace:
        for s in stale:
            if s == "none":
                stale_ok[s] = ""
                continue
            cfg_s, err = compose_trace_cfg(trace_py, [*args.trace_override, f"trainer.max_staleness={s}"], work, tenv)
            stale_ok[s] = "" if cfg_s is not None else (
                "trainer.max_staleness is not a key of this trace_rl's config (not added yet?)"
                if "max_staleness" in err else "config error: " + err.strip().splitlines()[-1])
            if stale_ok[s]:
                log(f"staleness {s}: {stale_ok[s]}\n{err.strip()[-1500:]}")

    results = {"header": header, "machine": {"cores": cores, "usable_cores": usable, "loadavg_start": load},
               "warning": warn, "args": {k: str(v) for k, v in vars(args).items()}, "trl_venv": venv_info,
               "jobs": [], "table": []}
    table_rows = []
    for shape in shapes:
        P, N, T = shape
        sname = f"{P}x{N}x{T}"
        micro_trace, micro_trl = pick_micro_batch(args.micro_batch, P * N, ranks)
        if (P * N) % ranks:
            log(f"{sname}: {P * N} sequences do not split over {ranks} learner ranks; trace_rl will refuse it")
        built = trace_prompts(trace_py, base_cfg, P, args.steps, work, tenv)
        model_path, prompts = built["model_path"], built["rows"]
        runs: dict[str, list[dict]] = {}
        for rep in range(args.repeats):
            if not args.skip_trl:
                r = run_trl(trl_py, shape, args.steps, micro_trl, model_path, prompts,
                            work / f"{sname}-trl-r{rep}", args.timeout)
                r.update(shape=sname, repeat=rep)
                results["jobs"].append(r)
                runs.setdefault("TRL", []).append(r)
                log(f"  -> {_brief(r)}")
            if not args.skip_trace:
                for s in stale:
                    label = "trace_rl" if s == "none" else f"trace_rl staleness {s}"
                    if stale_ok.get(s):
                        r = {"framework": "trace_rl", "staleness": s, "ok": False, "error": stale_ok[s]}
                    else:
                        r = run_trace(trace_py, shape, args.steps, s, micro_trace, work / f"{sname}-trace-s{s}-r{rep}",
                                      args.trace_override, args.timeout, tenv)
                    r.update(shape=sname, repeat=rep)
                    results["jobs"].append(r)
                    runs.setdefault(label, []).append(r)
                    log(f"  -> {_brief(r)}")
            _write(out_path, results)
        trl_agg = median_row(runs["TRL"]) if "TRL" in runs else None
        for label, rs in runs.items():
            agg = median_row(rs)
            row = {"shape": sname, "label": label, "agg": agg, "micro_batch": micro_trl if label == "TRL" else micro_trace}
            if label != "TRL" and agg.get("ok") and trl_agg and trl_agg.get("ok"):
                row["ratio"] = agg["samples_per_s"] / trl_agg["samples_per_s"]
                row["whole_ratio"] = agg["samples_per_process_s"] / trl_agg["samples_per_process_s"]
            table_rows.append(row)
    results["table"] = table_rows
    table = render_table(header, table_rows)
    results["markdown"] = table
    _write(out_path, results)

    print("\n" + table + "\n")
    for j in results["jobs"]:
        if not j.get("ok"):
            where = f"; log {j['log']}" if j.get("log") else ""
            print(f"{j['shape']} {j['framework']} {j.get('staleness', '')}: FAILED ({j.get('error')}){where}\n"
                  f"{j.get('log_tail', '')[-2500:]}\n")
        elif j["framework"] == "trace_rl" and (j.get("stage_sums_s") or j.get("async_means")):
            print(f"{j['shape']} trace_rl staleness {j['staleness']} (repeat {j['repeat']}): stage time summed "
                  f"over {j['steps_done']} steps: " + ", ".join(f"{k} {v:.2f}" for k, v in j["stage_sums_s"].items()))
            if j.get("async_means"):
                print("    async/ means: " + ", ".join(f"{k} {v:.3g}" for k, v in j["async_means"].items()))
            print(f"    loop time from {j['train_loop_source']}; tokens from {j['tokens_source']}; sequences "
                  f"learned on (after zero-variance filtering): {fmt(j.get('learn_sequences'), 0)} of {j['samples']}")
        if j.get("warning"):
            print(f"{j['shape']} {j['framework']}: {j['warning']}")
    print("\nper-step times (s; step 1 includes warm-up):")
    for j in results["jobs"]:
        if j.get("ok") and j.get("step_s"):
            st = j["step_s"]
            rest = sum(st[1:])
            extra = (f"; steps 2..{len(st)}: {rest:.2f} s, {(j['samples'] - j['samples'] / len(st)) / rest:.2f} samples/s"
                     if len(st) > 1 and rest > 0 else "")
            label = j["framework"] + (f" staleness {j['staleness']}" if j["framework"] == "trace_rl" else "")
            print(f"  {j['shape']} {label}: " + " ".join(f"{x:.2f}" for x in st) + extra)
    print(f"\nresults: {out_path}\nlogs and run dirs: {work}")
    if warn:
        print(warn)
    return 0 if all(j.get("ok") for j in results["jobs"]) else 1


def _brief(r: dict) -> str:
    if not r.get("ok"):
        return f"FAILED: {r.get('error')}" + (f" (log {r['log']})" if r.get("log") else "")
    return (f"{r['steps_done']} steps, {r['samples']} samples, {r['completion_tokens']:.0f} tokens, "
            f"loop {r['train_loop_s']:.2f} s, process {r['process_s']:.1f} s")


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
