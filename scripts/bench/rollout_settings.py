"""Rollout engine settings on this machine: one table of generation time per setting, measured side by side.

Each setting runs in a fresh process (its environment variables and engine arguments differ): the
engine is built as trace_rl builds it (``trace_rl.rollout.vllm_engine.VLLMEngine`` /
``trace_rl.rollout.hf_engine.HFEngine``), generates once to warm up (reported separately: the first
call pays one-off costs), then ``--repeats`` times; the median is reported, with samples/s and
generated tokens/s. Prompts are the arith task's, rendered as training renders them.

    .venv/bin/python scripts/bench/rollout_settings.py                         # 8x8x64 and 32x8x128
    .venv/bin/python scripts/bench/rollout_settings.py --shapes 8x8x64 --only vllm-default,hf

Keep the machine otherwise idle; docs/performance.md has the table this printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# name -> (engine, environment, engine kwargs)
SETTINGS = {
    "hf": ("hf", {}, {}),
    # vLLM as the job builds it: compiled (rollout.enforce_eager=false), the inductor cache without vLLM's AOT
    # artefacts (VLLM_USE_AOT_COMPILE=0, as RolloutPool sets it on CPU), all cores
    "vllm-default": ("vllm", {}, {}),
    "vllm-eager": ("vllm", {}, {"enforce_eager": True}),
    "vllm-1t-eager": ("vllm", {"OMP_NUM_THREADS": "1"}, {"enforce_eager": True}),
    "vllm-1t-aot": ("vllm", {"OMP_NUM_THREADS": "1", "VLLM_USE_AOT_COMPILE": "1"}, {}),
    "vllm-detokenize": ("vllm", {}, {"detokenize": True}),
    "vllm-no-prefix-cache": ("vllm", {}, {"enable_prefix_caching": False}),
    "vllm-1-thread": ("vllm", {"OMP_NUM_THREADS": "1"}, {}),
    "vllm-nobind": ("vllm", {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, {}),
    "vllm-async-sched": ("vllm", {}, {"async_scheduling": True}),
    "vllm-batched-tokens-2k": ("vllm", {}, {"max_num_batched_tokens": 2048}),
    "vllm-kv-1g": ("vllm", {"VLLM_CPU_KVCACHE_SPACE": "1"}, {}),
    "vllm-2-threads": ("vllm", {"OMP_NUM_THREADS": "2"}, {}),
    "vllm-1t-nobind": ("vllm", {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}, {}),
    "vllm-1t-nobind-async": ("vllm", {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
                             {"async_scheduling": True}),
    "vllm-1t-async": ("vllm", {"OMP_NUM_THREADS": "1"}, {"async_scheduling": True}),
}


def child(setting: str, shape: str, repeats: int) -> None:
    from trace_rl.models.cache import tiny_model_path
    from trace_rl.startup import load_split, tokenize_prompts

    P, N, T = (int(x) for x in shape.split("x"))
    engine, _, kwargs = SETTINGS[setting]
    path = str(tiny_model_path(stage="sft"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    _, ids, _ = tokenize_prompts(load_split("arith", "train", 2000, 0), tok, 256, "arith")
    t0 = time.perf_counter()
    if engine == "vllm":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from trace_rl.rollout.vllm_engine import VLLMEngine

        eng = VLLMEngine(path, max_model_len=256 + T, **kwargs)
    else:
        from trace_rl.rollout.hf_engine import HFEngine

        eng = HFEngine(path, **kwargs)
    startup = time.perf_counter() - t0
    spec = {"n": N, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": T}
    times, tokens = [], []
    for r in range(repeats + 1):  # the first call is reported apart (one-off costs)
        prompts = ids[r * P:(r + 1) * P]
        t0 = time.perf_counter()
        samples = eng.generate(prompts, spec)
        times.append(time.perf_counter() - t0)
        tokens.append(sum(len(s.response_ids) for s in samples))
    med = statistics.median(times[1:])
    print("RESULT " + json.dumps({"setting": setting, "shape": shape, "startup_s": startup, "first_s": times[0],
                                  "median_s": med, "samples_per_s": P * N / med,
                                  "tokens_per_s": statistics.median(tokens[1:]) / med}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8x8x64,32x8x128")
    ap.add_argument("--only", default=",".join(SETTINGS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.repeats)
        return
    rows = []
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    for shape in args.shapes.split(","):
        for setting in args.only.split(","):
            env = {**os.environ, "VLLM_USE_AOT_COMPILE": "0", **SETTINGS[setting][1], "VLLM_LOGGING_LEVEL": "ERROR",
                   "TQDM_DISABLE": "1"}
            r = subprocess.run([sys.executable, __file__, "--child", setting, shape, "--repeats", str(args.repeats)],
                               capture_output=True, text=True, env=env, timeout=1800)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{shape} {setting}: FAILED\n{r.stderr[-2000:]}", flush=True)
                continue
            rows.append(json.loads(line[7:]))
            x = rows[-1]
            print(f"{shape} {setting:24s} start {x['startup_s']:5.1f} s | first {x['first_s']:5.2f} s | median "
                  f"{x['median_s']:5.2f} s | {x['samples_per_s']:6.1f} samples/s | {x['tokens_per_s']:7.0f} tok/s",
                  flush=True)
    print("\n| shape | setting | engine start s | first call s | median s | samples/s | tokens/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for x in rows:
        print(f"| {x['shape']} | {x['setting']} | {x['startup_s']:.1f} | {x['first_s']:.2f} | {x['median_s']:.2f} | "
              f"{x['samples_per_s']:.1f} | {x['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
