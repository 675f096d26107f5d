"""The one prepared GPU check (issue 11): run it first on the first GPU machine; it needs no network.

    bash scripts/gpu_check.sh [--out DIR]        # on a machine with >= 1 CUDA GPU (~8 min on one H100)
    bash scripts/gpu_check.sh --cpu-smoke        # the same plumbing on CPU, small shapes, no `pytest -m gpu`

1. builds Qwen3-shaped random models locally, vocabulary 151,936, tied and untied (0.5B shape on a GPU:
   hidden 896, 24 layers, 14 / 2 heads, MLP 4,864; a narrow 2-layer shape with the same vocabulary for
   ``--cpu-smoke``), with the project's tokenizer;
2. runs ``pytest -m gpu`` (vLLM CUDA engines, NCCL / CUDA-IPC sync, sleep / wake, ZeRO offload);
3. runs a 5-step TRACE job on the tied model (vLLM engine, vLLM teacher, one DeepSpeed rank, the engine,
   teacher and learner sharing one GPU by fractions), polling every process's GPU memory (``nvidia-smi``);
4. writes ``DIR/gpu_check.json``: the pytest summary, per-stage seconds and tokens/s (steps 2-5), weight-
   sync seconds, the peak GPU memory of each process, the machine; and prints it.

Put the figures in docs/performance.md ("GPU figures") with the command line used.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 151_936


def model_specs(smoke: bool) -> dict[str, dict]:
    if smoke:
        shape = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                     max_position_embeddings=1024)
    else:  # Qwen2.5/Qwen3-0.5B-like
        shape = dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                     max_position_embeddings=4096)
    return {"tied": {**shape, "vocab_size": VOCAB, "tie_word_embeddings": True},
            "untied": {**shape, "vocab_size": VOCAB, "tie_word_embeddings": False}}


def build_models(out: Path, smoke: bool) -> dict[str, str]:
    from trace_rl.models.cache import tiny_model_path
    from trace_rl.models.tiny import TinyModelSpec, build_tiny_model
    from trace_rl.models.tokenizer import load_pretrained_tokenizer

    tok = load_pretrained_tokenizer(str(tiny_model_path(stage="base")))
    paths = {}
    for name, spec in model_specs(smoke).items():
        path = out / f"qwen3-{name}"
        if not (path / "config.json").exists():
            build_tiny_model(TinyModelSpec(**spec), tok, path)
        paths[name] = str(path)
    return paths


class MemoryPoller:
    """Peak GPU memory (MiB) per process id, from ``nvidia-smi`` every ``every`` seconds."""

    def __init__(self, every: float = 2.0):
        self.peak: dict[str, float] = {}
        self.every, self._stop = every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
                for line in out.stdout.splitlines():
                    pid, name, used = (x.strip() for x in line.split(","))
                    key = f"{pid} {name}"
                    self.peak[key] = max(self.peak.get(key, 0.0), float(used))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.every)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


def run_gpu_tests(out: Path) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "--junitxml",
                        str(out / "gpu_tests.xml")], cwd=ROOT, capture_output=True, text=True)
    (out / "gpu_tests.log").write_text(r.stdout + r.stderr)
    last = [ln for ln in r.stdout.splitlines() if ln.strip()][-1:] or [""]
    return {"returncode": r.returncode, "summary": last[0], "seconds": time.perf_counter() - t0,
            "log": str(out / "gpu_tests.log")}


def trace_overrides(model: str, run_dir: Path, smoke: bool) -> list[str]:
    common = ["algorithm=trace", f"model.path={model}", "trainer.total_steps=5", "rollout.n=4",
              "eval.before=false", "eval.after=false", "trainer.save_final=false", "logger.wandb=false",
              "algorithm.lr=1e-5", "learner.num_ranks=1", f"trainer.run_dir={run_dir}",
              f"hydra.run.dir={run_dir}/hydra"]
    if smoke:
        return common + ["data.prompts_per_step=4", "rollout.max_new_tokens=32", "learner.micro_batch_size=4",
                         "teacher.top_k=8"]
    # one GPU shared by fractions: engine 0.35 (KV budget 0.25 of the memory), teacher 0.25 (0.15), learner 0.4
    return common + ["data.prompts_per_step=32", "rollout.max_new_tokens=512", "learner.micro_batch_size=8",
                     "model.dtype=bfloat16", "rollout.gpus_per_engine=0.35", "rollout.gpu_memory_utilization=0.25",
                     "teacher.engine=vllm", "teacher.gpus_per_actor=0.25", "teacher.gpu_memory_utilization=0.15",
                     "learner.gpus_per_rank=0.4", "rollout.weight_sync=collective", "rollout.sync_backend=nccl"]


def run_trace(model: str, out: Path, smoke: bool) -> dict:
    run_dir = out / "trace_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    with MemoryPoller() as mem:
        r = subprocess.run([sys.executable, "-m", "trace_rl.train", *trace_overrides(model, run_dir, smoke)],
                           cwd=ROOT, capture_output=True, text=True, env=env)
    (out / "trace_run.log").write_text(r.stdout + r.stderr)
    res: dict = {"returncode": r.returncode, "seconds": time.perf_counter() - t0, "log": str(out / "trace_run.log"),
                 "gpu_peak_mib_by_process": mem.peak}
    metrics = run_dir / "metrics.jsonl"
    if r.returncode != 0 or not metrics.exists():
        res["error"] = (r.stderr or r.stdout)[-3000:]
        return res
    steps = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    steps = [m for m in steps if "timing_s/step" in m]
    later = steps[1:] or steps  # step 1 carries one-off costs
    keys = sorted({k for m in later for k in m if k.startswith(("timing_s/", "perf/", "sync/"))})
    res["steps"] = len(steps)
    res["median_over_steps_2_on"] = {k: statistics.median(m[k] for m in later if k in m) for k in keys}
    summary = run_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        res["startup_s"] = s.get("startup_s")
        res["train_loop_s"] = s.get("train_loop_s")
    return res


def machine() -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": []}
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
    try:
        import vllm

        out["vllm"] = vllm.__version__
    except ImportError:
        out["vllm"] = None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "gpu_check")
    ap.add_argument("--cpu-smoke", action="store_true", help="small shapes on CPU, no pytest -m gpu")
    args = ap.parse_args()
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; run it on a GPU machine (or --cpu-smoke for the plumbing)",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict = {"command": " ".join(sys.argv), "cpu_smoke": args.cpu_smoke, "machine": machine()}
    results["models"] = build_models(args.out, args.cpu_smoke)
    results["gpu_tests"] = {"skipped": "cpu-smoke"} if args.cpu_smoke else run_gpu_tests(args.out)
    results["trace_run"] = run_trace(results["models"]["tied"], args.out, args.cpu_smoke)
    results["seconds"] = time.perf_counter() - t0
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    failed = results["trace_run"]["returncode"] != 0 or (
        not args.cpu_smoke and results["gpu_tests"]["returncode"] != 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
