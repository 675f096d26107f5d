"""Learner -> rollout weight sync, behind one interface.

``make_weight_sync(kind, learners, pool, bucket_mb=..., backend=...)`` returns a
:class:`WeightSync`; the driver calls ``sync(version)`` after each learning step and ``close()``
at the end. Three paths (``rollout.weight_sync``):

- ``object_store`` (default; object_store.py): rank 0 gathers full float32 weights into one Ray
  object that every engine fetches. No extra group; fine on CPU and for small models.
- ``collective`` (collective.py): a private torch.distributed group of learner rank 0 and every
  engine worker (gloo on CPU, NCCL on GPUs), weights broadcast in flat buckets of about
  ``rollout.sync_bucket_mb`` MiB (buckets.py, group.py).
- ``cuda_ipc`` (cuda_ipc.py): colocated GPU engines map the learners' buffers through CUDA IPC
  handles (ipc.py). GPU only; refuses clearly on CPU.

Every path ends in the engine's one load routine (vLLM in-place reload plus the tied-embedding
re-pack; HF ``load_state_dict``), and tests/sync checks for each that the engine's log-probs equal
the learner's after a sync. Timings per parameter count: scripts/bench_sync.py, docs/performance.md.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from trace_rl.sync.base import WeightSync, WeightSyncError
from trace_rl.sync.buckets import Bucket, TensorSpec, flatten_bucket, plan_buckets, unflatten_bucket

__all__ = ["KINDS", "BACKENDS", "WeightSync", "WeightSyncError", "make_weight_sync", "check_config", "Bucket",
           "TensorSpec", "plan_buckets", "flatten_bucket", "unflatten_bucket"]

KINDS = ("object_store", "collective", "cuda_ipc")
OBJECT_STORE_MAX_GIB = 4.0
"""Above this size per sync (the model in its dtype) the object-store path is refused on GPU runs: rank 0 would
put the whole model into the object store every step and each engine pickle it through vLLM's executor."""
BACKENDS = ("auto", "gloo", "nccl")


def make_weight_sync(kind: str, learners: Any, pool: Any, *, bucket_mb: float = 256.0, backend: str = "auto",
                     timeout_s: float = 600.0, dtype: str = "float32") -> WeightSync:
    """The ``kind`` weight sync from ``learners`` (a LearnerGroup) to ``pool`` (a RolloutPool).

    ``bucket_mb``: bucket size of the collective / cuda_ipc paths; ``backend``: the collective's
    auto | gloo | nccl; ``timeout_s``: how long a collective waits for a member before failing; ``dtype``: the
    engines' dtype, in which the object-store path ships the floating weights.
    A collective sync joins its group here (a few seconds at most).
    """
    if kind == "object_store":
        from trace_rl.sync.object_store import ObjectStoreSync

        return ObjectStoreSync(learners, pool, dtype=dtype)
    if kind == "collective":
        from trace_rl.sync.collective import CollectiveSync

        return CollectiveSync(learners, pool, bucket_mb=bucket_mb, backend=backend, timeout_s=timeout_s)
    if kind == "cuda_ipc":
        from trace_rl.sync.cuda_ipc import CudaIpcSync

        return CudaIpcSync(learners, pool, bucket_mb=bucket_mb)
    raise ValueError(f"rollout.weight_sync={kind!r} is unknown; use one of {', '.join(KINDS)}")


def check_config(cfg: Any, err: Callable[[str, str, str], None]) -> None:
    """Weight-sync checks of ``trace_rl.config.validate``: ``err(field, problem, fix)`` per problem."""
    r, lc = cfg.rollout, cfg.learner
    placement = getattr(cfg.cluster, "placement", "disaggregated")
    if r.weight_sync not in KINDS:
        err("rollout.weight_sync", f"unknown value {r.weight_sync!r}", f"use one of {', '.join(KINDS)}")
    if r.sync_backend not in BACKENDS:
        err("rollout.sync_backend", f"unknown value {r.sync_backend!r}", f"use one of {', '.join(BACKENDS)}")
    if not (isinstance(r.sync_bucket_mb, (int, float)) and math.isfinite(r.sync_bucket_mb) and r.sync_bucket_mb > 0):
        err("rollout.sync_bucket_mb", f"{r.sync_bucket_mb} is not a positive size in MiB",
            "use e.g. 256 (larger buckets: fewer collective calls, more memory per bucket)")
    gpus = lc.gpus_per_rank > 0 and r.gpus_per_engine > 0
    if r.weight_sync == "collective":
        if r.sync_backend == "nccl" and not gpus:
            err("rollout.sync_backend", "nccl needs the learners and the engines on GPUs "
                f"(learner.gpus_per_rank={lc.gpus_per_rank}, rollout.gpus_per_engine={r.gpus_per_engine})",
                "use rollout.sync_backend=auto or gloo on CPU machines")
        elif gpus and placement == "colocated" and r.sync_backend != "gloo":
            err("rollout.sync_backend", "NCCL cannot connect learner rank 0 and an engine that share one GPU "
                "(cluster.placement=colocated)", "use rollout.weight_sync=cuda_ipc (colocated engines), or "
                "rollout.sync_backend=gloo")
    elif r.weight_sync == "object_store" and gpus:
        size = estimated_weight_gib(getattr(cfg.model, "path", None), getattr(cfg.model, "dtype", "float32"))
        if size is not None and size > OBJECT_STORE_MAX_GIB:
            alternative = ("rollout.weight_sync=cuda_ipc (colocated engines)" if placement == "colocated" else
                           "rollout.weight_sync=collective (NCCL, in buckets of rollout.sync_bucket_mb)")
            err("rollout.weight_sync", f"object_store would put the whole model (~{size:.1f} GiB in "
                f"{cfg.model.dtype}) into the object store at every step, and every engine would copy it "
                f"(limit {OBJECT_STORE_MAX_GIB:g} GiB)", f"use {alternative}")
    elif r.weight_sync == "cuda_ipc":
        if not gpus:
            err("rollout.weight_sync", "cuda_ipc shares CUDA memory and needs the learners and the engines on GPUs "
                f"(learner.gpus_per_rank={lc.gpus_per_rank}, rollout.gpus_per_engine={r.gpus_per_engine})",
                "use rollout.weight_sync=collective (gloo on CPU) or object_store")
        elif placement != "colocated":
            err("rollout.weight_sync", f"cuda_ipc needs each engine on a learner's GPU, but cluster.placement="
                f"{placement!r}", "set cluster.placement=colocated, or use rollout.weight_sync=collective")


def estimated_weight_gib(model_path: str | None, dtype: str) -> float | None:
    """The size of a decoder-only checkpoint's weights in ``dtype``, in GiB, from its local ``config.json``
    (embeddings, untied head, attention and MLP of every layer); None when there is no local config."""
    import json
    import os

    if not model_path or not os.path.isfile(os.path.join(model_path, "config.json")):
        return None
    with open(os.path.join(model_path, "config.json")) as f:
        c = json.load(f)
    try:
        h, layers, vocab = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return None
    inter = int(c.get("intermediate_size") or 4 * h)
    heads = int(c.get("num_attention_heads") or 1)
    head_dim = int(c.get("head_dim") or h // heads)
    kv = int(c.get("num_key_value_heads") or heads)
    attention = h * head_dim * (2 * heads + 2 * kv)  # q and o, k and v
    params = vocab * h * (1 if c.get("tie_word_embeddings", False) else 2) + layers * (attention + 3 * h * inter)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
    return params * itemsize / 2**30
