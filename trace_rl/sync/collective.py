"""``collective``: a torch.distributed group of learner rank 0 and every engine worker; flat buckets broadcast.

Set-up (once): the driver asks rank 0 for the weights' names, full shapes and dtypes, cuts them
into buckets of about ``bucket_mb`` MiB (trace_rl/sync/buckets.py) and gives that plan to every
member while they join a private group (trace_rl/sync/group.py; gloo on CPU, NCCL on GPUs).
Each sync: all learner ranks walk the plan (ZeRO-3 gathers each bucket's parameters, a
collective among the learners), rank 0 flattens the bucket and broadcasts it; every engine
receives into a fresh buffer and streams the views straight into its loader (vLLM's in-place
reload, HF ``load_state_dict``). Nothing goes through the object store, and an engine holds at
most the model plus the buckets its loader keeps.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from trace_rl.sync.base import WeightSync, WeightSyncError, rate, wait_sides
from trace_rl.sync.buckets import plan_buckets

log = logging.getLogger(__name__)

__all__ = ["CollectiveSync", "resolve_backend"]


def resolve_backend(backend: str, *, learner_on_gpu: bool, engines_on_gpu: bool) -> str:
    """``auto`` -> NCCL when learner rank 0 and every engine are on GPUs, gloo otherwise."""
    if backend == "auto":
        return "nccl" if learner_on_gpu and engines_on_gpu else "gloo"
    if backend == "nccl" and not (learner_on_gpu and engines_on_gpu):
        raise ValueError("rollout.sync_backend=nccl needs the learners and every engine on GPUs "
                         "(learner.gpus_per_rank > 0, rollout.gpus_per_engine > 0); use gloo or auto")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"rollout.sync_backend={backend!r}; use auto, gloo or nccl")
    return backend


class CollectiveSync(WeightSync):
    kind = "collective"

    def __init__(self, learners: Any, pool: Any, *, bucket_mb: float = 256.0, backend: str = "auto",
                 timeout_s: float = 600.0):
        super().__init__(learners, pool)
        if not bucket_mb > 0:
            raise ValueError(f"rollout.sync_bucket_mb={bucket_mb} must be > 0")
        t0 = time.perf_counter()
        self.timeout_s = float(timeout_s)
        infos = pool.weight_sync_info()
        self.backend = resolve_backend(backend, learner_on_gpu=float(learners.lc.gpus_per_rank) > 0,
                                       engines_on_gpu=all(i["device"] == "cuda" for i in infos))
        self.buckets = plan_buckets(learners.weight_specs(), max(int(bucket_mb * 2**20), 1))
        self.nbytes = float(sum(b.nbytes for b in self.buckets))
        ranks = [int(i["ranks"]) for i in infos]
        offsets = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        self.world_size = 1 + sum(ranks)
        self.name = f"weights-{uuid.uuid4().hex[:8]}"
        self._open = True
        try:
            host, port = learners.open_weight_port(self.name)
            self.address = f"{host}:{port}"
            wait_sides({
                "learner": learners.init_weight_group(self.name, host=host, port=port, world_size=self.world_size,
                                                      backend=self.backend, buckets=self.buckets,
                                                      timeout_s=self.timeout_s),
                "engine": pool.init_weight_group(host=host, port=port, rank_offsets=offsets,
                                                 world_size=self.world_size, backend=self.backend,
                                                 buckets=self.buckets, timeout_s=self.timeout_s),
            }, self.timeout_s, "joining the weight-sync group")
        except BaseException:
            self.close()
            raise
        self.setup_s = time.perf_counter() - t0
        log.info("weight sync: %s group of %d ranks at %s, %d bucket(s), %.1f MiB, set up in %.2f s",
                 self.backend, self.world_size, self.address, len(self.buckets), self.nbytes / 2**20, self.setup_s)

    def sync(self, version: int) -> dict[str, float]:
        return self.submit(version)()

    def submit(self, version: int):
        """Queue the broadcast on the learner ranks and the receive on every engine (behind a rollout in
        flight); the returned function waits for both sides."""
        if not self._open:
            raise WeightSyncError("this CollectiveSync was closed; make a new one")
        t0 = time.perf_counter()
        sides = {"learner": self.learners.broadcast_weights(self.name), "engine": self.pool.receive_weights(version)}
        return lambda: self._finish(sides, t0)

    def _finish(self, sides: dict, t0: float) -> dict[str, float]:
        out = wait_sides(sides, self.timeout_s, "the weight broadcast")
        seconds = time.perf_counter() - t0
        sent = out["learner"][0]
        self.syncs += 1
        return {"seconds": seconds, "send_s": float(sent["seconds"]),
                "engine_s": max(float(e["seconds"]) for e in out["engine"]), "bytes": float(sent["bytes"]),
                "buckets": float(len(self.buckets)), "mb_per_s": rate(float(sent["bytes"]), seconds)}

    def close(self) -> None:
        if not getattr(self, "_open", False):
            return
        self._open = False
        self.learners.close_weight_group(self.name)
        self.pool.close_weight_group()
