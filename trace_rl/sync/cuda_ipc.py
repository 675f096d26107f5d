"""``cuda_ipc``: colocated engines map the learners' GPU buffers directly (GPU only).

Each sync, every learner rank flattens the full weights into buckets on its own GPU (ZeRO-3
gathers them: a collective among the learners) and exports them as CUDA IPC handles; each engine
takes the handles of the learner rank on its GPU (matched by UUID), loads from them with no copy
through the host, and the learners then free the buffers. No process group and no network: the
right path for ``cluster.placement=colocated``. On a machine without CUDA it refuses at once.
"""
from __future__ import annotations

import time
from typing import Any

from trace_rl.sync.base import WeightSync, WeightSyncError, rate
from trace_rl.sync.buckets import plan_buckets

__all__ = ["CudaIpcSync"]


class CudaIpcSync(WeightSync):
    kind = "cuda_ipc"

    def __init__(self, learners: Any, pool: Any, *, bucket_mb: float = 256.0):
        super().__init__(learners, pool)
        if not bucket_mb > 0:
            raise ValueError(f"rollout.sync_bucket_mb={bucket_mb} must be > 0")
        if not float(learners.lc.gpus_per_rank) > 0:
            raise RuntimeError("rollout.weight_sync=cuda_ipc needs the learners on GPUs (learner.gpus_per_rank > 0); "
                               "on CPU use rollout.weight_sync=collective (gloo) or object_store")
        infos = pool.weight_sync_info()
        cpu = [i for i, info in enumerate(infos) if info["device"] != "cuda"]
        if cpu:
            raise RuntimeError(f"rollout.weight_sync=cuda_ipc needs every engine on a learner's GPU, but engine(s) "
                               f"{cpu} run on the CPU; set cluster.placement=colocated with GPUs, or use "
                               "rollout.weight_sync=collective")
        self.buckets = plan_buckets(learners.weight_specs(), max(int(bucket_mb * 2**20), 1))
        self.nbytes = float(sum(b.nbytes for b in self.buckets))

    def sync(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        shared = self.learners.share_weights_ipc(self.buckets)
        t1 = time.perf_counter()
        by_gpu = {s["gpu_uuid"]: s["handles"] for s in shared}
        try:
            stats = self.pool.load_ipc_weights(by_gpu, self.buckets, version)
        except Exception as err:
            raise WeightSyncError(f"cuda_ipc: an engine could not load the shared weights: {err}") from err
        finally:
            self.learners.release_weights_ipc()
        seconds = time.perf_counter() - t0
        self.syncs += 1
        return {"seconds": seconds, "share_s": t1 - t0, "engine_s": float(stats["engine_seconds"]),
                "bytes": self.nbytes, "mb_per_s": rate(self.nbytes, seconds)}
