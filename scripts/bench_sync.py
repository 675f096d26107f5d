"""Weight-sync benchmark: time per sync and MiB/s for each path the machine offers, per parameter count.

For each model size it builds a random Qwen3 checkpoint locally (trace_rl.models.tiny), starts a
DeepSpeed learner group and a rollout pool on a private loopback Ray cluster, and times
``WeightSync.sync`` for every path available here: object_store and collective (gloo) always;
with ``--gpu``, cuda_ipc (one learner rank and the engine share GPU 0) or, with ``--gpu
--disaggregated``, collective over NCCL (learner on GPU 0, engine on GPU 1). After the timed
syncs of each path it reports the largest difference between the engine's and the learner's
log-probs on one sequence, so a fast but wrong path shows in the table.

    .venv/bin/python scripts/bench_sync.py                       # 1M, 10M, 50M params, HF engine, CPU
    .venv/bin/python scripts/bench_sync.py --sizes 1M,10M --engine vllm --repeats 5
    .venv/bin/python scripts/bench_sync.py --gpu --sizes 10M,50M,500M   # on a GPU node (cuda_ipc)
    .venv/bin/python scripts/bench_sync.py --gpu --disaggregated          # 2 GPUs (NCCL)

Prints one markdown table (docs/performance.md, "Weight sync", holds the figures and commands).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Model shapes per nominal size: (hidden, layers, heads, kv heads, intermediate); vocabulary 512, tied.
SHAPES = {
    "1M": (128, 4, 4, 2, 512),
    "10M": (256, 10, 4, 2, 1024),
    "50M": (512, 13, 8, 4, 2048),
    "200M": (1024, 14, 16, 8, 4096),
    "500M": (1024, 36, 16, 8, 4096),
}


def build_model(size: str, root: Path) -> tuple[str, int]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from trace_rl.models.tiny import TinyModelSpec, build_tiny_model, count_parameters
    from trace_rl.models.tokenizer import build_tokenizer, chat_template_samples

    hidden, layers, heads, kv, inter = SHAPES[size]
    corpus = [f"Tom has {i} apples and buys {i % 7} more: {i + i % 7}." for i in range(200)] + chat_template_samples()
    tok = build_tokenizer(corpus, vocab_size=512)
    spec = TinyModelSpec(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                         intermediate_size=inter, max_position_embeddings=512, seed=0)
    path = build_tiny_model(spec, tok, root / size)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return str(path), count_parameters(model)


def available_paths(args) -> list[tuple[str, str]]:
    """(kind, backend) pairs to time on this machine and placement."""
    paths = [("object_store", "auto"), ("collective", "gloo")]
    if args.gpu:
        # NCCL cannot join two ranks on one GPU; CUDA IPC needs exactly that
        paths.append(("collective", "nccl") if args.disaggregated else ("cuda_ipc", "auto"))
    return paths


def bench_size(size: str, path: str, args, paths) -> list[dict]:
    import torch

    from trace_rl.config import AlgorithmConfig, LearnerConfig, ModelConfig
    from trace_rl.learner.group import LearnerGroup
    from trace_rl.rollout.pool import RolloutPool
    from trace_rl.sync import make_weight_sync

    # --gpu: colocated (one rank and the engine share GPU 0: 0.5 each) or, with --disaggregated, one GPU each
    gpus = (1.0 if args.disaggregated else 0.5) if args.gpu else 0.0
    ranks = 1 if args.gpu else args.ranks
    lc = LearnerConfig(backend="deepspeed", num_ranks=ranks, zero_stage=args.zero_stage, micro_batch_size=1,
                       threads_per_rank=0 if args.gpu else 1, gpus_per_rank=gpus)
    rows = []
    pool = RolloutPool(path, engine=args.engine, max_model_len=256, gpus_per_engine=gpus,
                       gpu_memory_utilization=0.2 if args.gpu else 0.05)
    learners = None
    try:
        learners = LearnerGroup(lc, AlgorithmConfig(lr=1e-4), ModelConfig(path=path), path, seed=0)
        seq = [list(range(5, 37))]
        for kind, backend in paths:
            try:
                ws = make_weight_sync(kind, learners, pool, bucket_mb=args.bucket_mb, backend=backend)
            except Exception as err:  # a path this machine cannot run: say so in the table
                rows.append({"size": size, "path": _label(kind, backend), "error": str(err).splitlines()[0][:80]})
                continue
            try:
                ws.sync(version=1)  # warm-up (first-touch allocations, lazy connections)
                times, stats = [], {}
                for r in range(args.repeats):
                    stats = ws.sync(version=2 + r)
                    times.append(stats["seconds"])
                med = statistics.median(times)
                # correctness: the engine scores like the learner after the last sync
                learner = learners.logprobs(_score_batch(seq), temperature=1.0)[0]
                engine = torch.tensor(pool.score(seq, [1])[0])
                rows.append({"size": size, "path": _label(ws.kind, getattr(ws, "backend", "")),
                             "bytes": stats["bytes"], "median_s": med, "min_s": min(times),
                             "mb_per_s": stats["bytes"] / 2**20 / med, "setup_s": getattr(ws, "setup_s", 0.0),
                             "max_err": float((engine - learner).abs().max())})
            finally:
                ws.close()
    finally:
        if learners is not None:
            learners.shutdown()
        pool.shutdown()
    return rows


def _label(kind: str, backend: str) -> str:
    return f"{kind} ({backend})" if kind == "collective" else kind


def _score_batch(seq):
    """A one-row Batch whose 'response' is the whole sequence after its first token."""
    import torch

    from trace_rl.batch import Batch

    ids = torch.tensor(seq)
    n = ids.shape[1] - 1
    return Batch(prompt_ids=ids[:, :1], prompt_mask=torch.ones(1, 1, dtype=torch.bool), response_ids=ids[:, 1:],
                 response_mask=torch.ones(1, n, dtype=torch.bool), behaviour_logprobs=torch.zeros(1, n),
                 group_ids=torch.zeros(1, dtype=torch.long), policy_version=torch.zeros(1, dtype=torch.long))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,10M,50M", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="rollout engine (hf starts fastest)")
    ap.add_argument("--repeats", type=int, default=3, help="timed syncs per path (after one warm-up)")
    ap.add_argument("--bucket-mb", type=float, default=64.0, help="bucket size of collective / cuda_ipc (MiB)")
    ap.add_argument("--ranks", type=int, default=2, help="learner ranks")
    ap.add_argument("--zero-stage", type=int, default=3, help="DeepSpeed ZeRO stage of the learners")
    ap.add_argument("--gpu", action="store_true",
                    help="one learner rank and the engine share GPU 0 (adds cuda_ipc)")
    ap.add_argument("--disaggregated", action="store_true",
                    help="with --gpu: learner on GPU 0, engine on GPU 1 (adds collective over NCCL instead)")
    args = ap.parse_args()
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            ap.error("--gpu: no CUDA device here")
        if args.disaggregated and torch.cuda.device_count() < 2:
            ap.error("--gpu --disaggregated needs 2 GPUs")

    from trace_rl.cluster import init_ray

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    init_ray(num_cpus=8, log_to_driver=False)
    paths = available_paths(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sync_") as tmp:
        for size in args.sizes.split(","):
            t0 = time.perf_counter()
            path, n_params = build_model(size.strip(), Path(tmp))
            size_rows = bench_size(f"{size.strip()} ({n_params / 1e6:.1f}M)", path, args, paths)
            rows.extend(size_rows)
            print(f"# {size}: {n_params:,} parameters, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"\nengine={args.engine}, learners={args.ranks} x ZeRO-{args.zero_stage}, bucket={args.bucket_mb:g} MiB, "
          f"repeats={args.repeats} (median of the timed syncs)\n")
    print("| model (params) | path | MiB per engine | sync s (median) | sync s (min) | MiB/s | group set-up s | "
          "max abs(engine - learner) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | {r['path']} | - | - | - | - | - | not run: {r['error']} |")
            continue
        print(f"| {r['size']} | {r['path']} | {r['bytes'] / 2**20:.1f} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
              f"{r['mb_per_s']:.0f} | {r['setup_s']:.2f} | {r['max_err']:.1e} |")


if __name__ == "__main__":
    main()
