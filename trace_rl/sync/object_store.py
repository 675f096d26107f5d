"""``object_store``: learner rank 0 gathers the full weights into one Ray object; every engine fetches it.

The simplest path and the default: no extra process group, works wherever Ray does, across
nodes. It costs a copy into the object store (in the engines' dtype) plus one fetch per engine node,
which is fine for small models and CPU runs; the collective path avoids both for large models.
"""
from __future__ import annotations

import time
from typing import Any

from trace_rl.sync.base import WeightSync, rate
from trace_rl.sync.buckets import dtype_from_name

__all__ = ["ObjectStoreSync"]


class ObjectStoreSync(WeightSync):
    kind = "object_store"

    def __init__(self, learners: Any, pool: Any, dtype: str = "float32"):
        """``dtype``: what the floating weights are shipped as: the engines' (``model.dtype``)."""
        super().__init__(learners, pool)
        self.dtype = dtype
        size = dtype_from_name(dtype).itemsize
        # gather_state_dict ships floating tensors in ``dtype`` and buffers as they are
        self.nbytes = float(sum(s.numel * size if dtype_from_name(s.dtype).is_floating_point else s.nbytes
                                for s in learners.weight_specs()))

    def sync(self, version: int) -> dict[str, float]:
        return self.submit(version)()

    def submit(self, version: int):
        """Gather (rank 0's full weights into the object store), queue one load per engine, and return the
        function that waits for the loads."""
        import ray

        t0 = time.perf_counter()
        ref = self.learners.state_dict_ref(self.dtype)
        t1 = time.perf_counter()
        loads = [a.update_weights.remote(ref, version) for a in self.pool.actors]
        del ref  # the engines' pending calls hold it; the object store frees it after the last load

        def finish() -> dict[str, float]:
            t2 = time.perf_counter()
            stats = ray.get(loads)
            seconds = (t1 - t0) + (time.perf_counter() - t2)  # the driver's share: gather + waiting for the loads
            self.syncs += 1
            engine_s = max(float(s["seconds"]) for s in stats)
            return {"seconds": seconds, "gather_s": t1 - t0, "load_s": engine_s, "engine_s": engine_s,
                    "bytes": self.nbytes, "mb_per_s": rate(self.nbytes, (t1 - t0) + engine_s)}
        return finish
