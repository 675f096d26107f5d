"""``RolloutPool``: N engine actors behind one interface.

Prompts are cut into contiguous chunks, one per engine, generated concurrently and put back in
order. New weights arrive as one object-store reference that every engine fetches itself
(``update_weights``), or, for the collective and cuda_ipc paths of trace_rl.sync, through the
weight-sync methods at the end of the class.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from trace_rl.batch import Batch
from trace_rl.rollout.base import Sample, SamplingSpec

log = logging.getLogger(__name__)

ENGINES = {
    "vllm": "trace_rl.rollout.vllm_engine:VLLMEngine",
    "hf": "trace_rl.rollout.hf_engine:HFEngine",
}


def engine_class(name: str):
    import importlib

    if name not in ENGINES:
        raise ValueError(f"rollout.engine={name!r} is unknown; use one of {sorted(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


class RolloutPool:
    def __init__(self, model_path: str, *, engine: str = "vllm", num_engines: int = 1, dtype: str = "float32",
                 seed: int = 0, max_model_len: int | None = None, gpu_memory_utilization: float = 0.3,
                 enforce_eager: bool = True, tensor_parallel_size: int = 1, cpus_per_engine: int = 1,
                 gpus_per_engine: float = 0.0, trust_remote_code: bool = False, pad_token_id: int = 0,
                 startup_timeout_s: float = 600.0, engine_kwargs: dict[str, Any] | None = None,
                 placement: Any = None, role: str = "rollout"):
        """``placement``: a :class:`trace_rl.placement.Placement` whose ``role`` slots pin engine i to its
        bundle (None: plain ``num_cpus`` / ``num_gpus`` requests, anywhere on the cluster)."""
        import ray

        from trace_rl.cluster import actor_env

        self.engine = engine
        self.pad_token_id = pad_token_id
        self.placement, self.role = placement, role
        env = actor_env()
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if gpus_per_engine == 0:
            # the engine runs while the learners wait: give it every core of the machine
            env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        cls = ray.remote(engine_class(engine))
        kwargs = dict(dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                      enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
                      max_model_len=max_model_len, trust_remote_code=trust_remote_code, **(engine_kwargs or {}))
        if placement is not None:
            kwargs.update(_placement_engine_kwargs(placement, role, engine, tensor_parallel_size))
        t0 = time.perf_counter()
        self.actors = [
            cls.options(**_engine_actor_options(placement, role, i, num_engines, cpus_per_engine, gpus_per_engine,
                                                env)).remote(model_path, engine_index=i, **kwargs)
            for i in range(num_engines)
        ]
        try:
            self.infos = ray.get([a.info.remote() for a in self.actors], timeout=startup_timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise RuntimeError(
                f"{num_engines} {engine} engine(s) did not start within {startup_timeout_s:.0f} s; check that the "
                f"cluster has {cpus_per_engine} CPU / {gpus_per_engine} GPU free per engine") from e
        self.startup_s = time.perf_counter() - t0
        log.info("rollout pool: %d %s engine(s) up in %.1f s", num_engines, engine, self.startup_s)

    def __len__(self) -> int:
        return len(self.actors)

    # ------------------------------------------------------------------ generation
    def generate_samples(self, prompts: list[list[int]], spec: SamplingSpec | dict[str, Any]) -> list[Sample]:
        """All samples, ordered by prompt index, then by sample index."""
        import ray

        spec_d = spec.to_dict() if isinstance(spec, SamplingSpec) else dict(spec)
        chunks = _chunks(len(prompts), len(self.actors))
        refs = []
        for actor, (s, e) in zip(self.actors, chunks):
            if e > s:
                refs.append((s, actor.generate.remote(prompts[s:e], spec_d)))
        samples: list[Sample] = []
        for offset, ref in refs:
            for smp in ray.get(ref):
                smp.prompt_index += offset
                samples.append(smp)
        samples.sort(key=lambda smp: smp.prompt_index)  # stable: keeps sample order within a prompt
        return samples

    def generate(self, prompts: list[list[int]], spec: SamplingSpec | dict[str, Any], *, version: int = 0,
                 meta: dict[str, list[Any]] | None = None) -> Batch:
        """Generate ``spec.n`` samples per prompt and return them as a Batch (group id = prompt index).
        ``meta`` holds per-prompt lists; each is repeated for the prompt's samples."""
        samples = self.generate_samples(prompts, spec)
        return samples_to_batch(prompts, samples, pad_token_id=self.pad_token_id, version=version, meta=meta)

    def score(self, sequences: list[list[int]], start: list[int], temperature: float = 1.0) -> list[list[float]]:
        import ray

        return ray.get(self.actors[0].score.remote(sequences, start, temperature))

    # ------------------------------------------------------------------ weights
    def update_weights(self, state_ref, version: int) -> dict[str, float]:
        """Every engine pulls the same object-store reference (a dict of full tensors)."""
        import ray

        t0 = time.perf_counter()
        stats = ray.get([a.update_weights.remote(state_ref, version) for a in self.actors])
        return {"seconds": time.perf_counter() - t0, "engine_seconds": max(s["seconds"] for s in stats)}

    def versions(self) -> list[int]:
        import ray

        return ray.get([a.version.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []

    # ------------------------------------------------------------------ weight sync (trace_rl/sync)
    # The engine side of trace_rl.sync's collective and cuda_ipc paths (object_store uses update_weights).
    def weight_sync_info(self, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """Per engine: group ranks it takes (its vLLM workers), node IP, device, GPU UUIDs."""
        import ray

        return ray.get([a.weight_sync_info.remote() for a in self.actors], timeout=timeout_s)

    def init_weight_group(self, *, host: str, port: int, rank_offsets: list[int], world_size: int, backend: str,
                          buckets: list, timeout_s: float = 600.0) -> list:
        """Start every engine joining the weight-sync group (engine i from rank ``rank_offsets[i]``).
        Returns the ObjectRefs without waiting: learner rank 0 joins at the same time."""
        import ray

        plan = ray.put(list(buckets))
        return [a.init_weight_group.remote(host, port, off, world_size, backend, plan, timeout_s)
                for a, off in zip(self.actors, rank_offsets)]

    def receive_weights(self, version: int) -> list:
        """Start every engine receiving the broadcast weights; the ObjectRefs (not waited for)."""
        return [a.receive_weights.remote(version) for a in self.actors]

    def load_ipc_weights(self, shared: dict[str, list], buckets: list, version: int) -> dict[str, float]:
        """Every engine maps the CUDA IPC buffers exported on its GPU and loads them."""
        import ray

        t0 = time.perf_counter()
        plan = ray.put(list(buckets))
        stats = ray.get([a.load_ipc_weights.remote(shared, plan, version) for a in self.actors])
        return {"seconds": time.perf_counter() - t0, "engine_seconds": max(s["seconds"] for s in stats)}

    def close_weight_group(self, timeout_s: float = 60.0) -> None:
        """Leave the weight-sync group on every engine (best effort)."""
        import ray

        if not self.actors:
            return
        try:
            ray.get([a.close_weight_group.remote() for a in self.actors], timeout=timeout_s)
        except Exception as err:  # closing must not mask the error that led here
            log.warning("closing the engines' weight-sync group: %s", err)


def _engine_actor_options(placement: Any, role: str, index: int, num_engines: int, cpus: float, gpus: float,
                          env: dict[str, str]) -> dict[str, Any]:
    """``.options()`` of engine ``index``: today's plain request without a placement, else its slot's
    bundle (a colocated tensor-parallel engine also learns which bundles hold its shards)."""
    if placement is None:
        return dict(num_cpus=cpus, num_gpus=gpus or None, runtime_env={"env_vars": env}, name=None)
    if placement.count(role) != num_engines:
        raise ValueError(f"the placement plan has {placement.count(role)} {role} slot(s) for {num_engines} "
                         f"engine(s); build the plan from the same config (trace_rl.placement.plan_from_config)")
    env = dict(env)
    slot = placement.slot(role, index)
    if slot.shard_bundles:
        # vLLM's Ray executor puts tensor-parallel worker k on bundle VLLM_RAY_BUNDLE_INDICES[k]
        env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, slot.shard_bundles))
        env["VLLM_RAY_PER_WORKER_GPUS"] = str(slot.accelerators)
    return dict(**placement.options(role, index), runtime_env={"env_vars": env}, name=None)


def _placement_engine_kwargs(placement: Any, role: str, engine: str,
                             tensor_parallel_size: int) -> dict[str, Any]:
    """Engine arguments a placement implies, passed only where the engine class accepts them: vLLM sleep
    mode when colocated on GPUs; with tensor parallelism, vLLM's executor (mp: the shards run on the
    devices the engine actor holds; ray: colocated shards on the bundles named above)."""
    import inspect

    accepted = inspect.signature(engine_class(engine).__init__).parameters
    on_gpus = (placement.plan.accelerator == "GPU" and placement.count(role) > 0
               and placement.slot(role, 0).accelerators > 0)
    out: dict[str, Any] = {}
    if placement.colocated and on_gpus and "enable_sleep_mode" in accepted:
        out["enable_sleep_mode"] = True
    if tensor_parallel_size > 1 and "distributed_executor_backend" in accepted:
        out["distributed_executor_backend"] = "ray" if placement.colocated else "mp"
    return out


def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, k)
    out, s = [], 0
    for i in range(k):
        e = s + base + (1 if i < extra else 0)
        out.append((s, e))
        s = e
    return out


def samples_to_batch(prompts: list[list[int]], samples: list[Sample], *, pad_token_id: int, version: int,
                     meta: dict[str, list[Any]] | None = None) -> Batch:
    """Left-pad prompts, right-pad responses (the schema of trace_rl/batch.py)."""
    B = len(samples)
    P = max(len(prompts[s.prompt_index]) for s in samples)
    R = max(max(len(s.response_ids) for s in samples), 1)
    prompt_ids = torch.full((B, P), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.bool)
    response_ids = torch.full((B, R), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.bool)
    logprobs = torch.zeros((B, R), dtype=torch.float32)
    for row, s in enumerate(samples):
        p = prompts[s.prompt_index]
        prompt_ids[row, P - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[row, P - len(p):] = True
        L = len(s.response_ids)
        if L:
            response_ids[row, :L] = torch.tensor(s.response_ids, dtype=torch.long)
            response_mask[row, :L] = True
            logprobs[row, :L] = torch.tensor(s.logprobs, dtype=torch.float32)
    out_meta = {k: [v[s.prompt_index] for s in samples] for k, v in (meta or {}).items()}
    out_meta["finish_reason"] = [s.finish_reason for s in samples]
    return Batch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask,
        behaviour_logprobs=logprobs, group_ids=torch.tensor([s.prompt_index for s in samples], dtype=torch.long),
        policy_version=torch.full((B,), version, dtype=torch.long), meta=out_meta,
    )
