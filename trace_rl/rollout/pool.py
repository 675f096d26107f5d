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


from trace_rl.batch import Batch
from trace_rl.rollout.base import Sample, SamplingSpec, samples_to_batch  # noqa: F401 (re-exported)

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


def default_engine_threads(*, shared_with: int = 0) -> int:
    """CPU threads of an engine on a machine without GPUs. Alone on the machine while it generates (lockstep
    training, evaluation) it takes every core; when it generates while ``shared_with`` other busy processes
    run (asynchronous training: the learner ranks, the other engines) it takes its share of the cores, at
    least one (oversubscribed threads only wait on each other; measured in docs/performance.md)."""
    cores = max(1, os.cpu_count() or 1)
    return cores if shared_with <= 0 else max(1, cores // (shared_with + 1))


class EngineClient:
    """Generation over a list of engine actor handles: picklable, so a stage actor (``annotator=self``)
    can generate through the rollout engines without the pool object."""

    def __init__(self, actors: list):
        self.actors = list(actors)

    def generate_samples(self, prompts: list[list[int]], spec: SamplingSpec | dict[str, Any]) -> list[Sample]:
        """All samples, ordered by prompt index, then by sample index."""
        import ray

        spec_d = spec.to_dict() if isinstance(spec, SamplingSpec) else dict(spec)
        refs = [(s, actor.generate.remote(prompts[s:e], spec_d))
                for actor, (s, e) in zip(self.actors, _chunks(len(prompts), len(self.actors))) if e > s]
        samples: list[Sample] = []
        for offset, ref in refs:
            for smp in ray.get(ref):
                smp.prompt_index += offset
                samples.append(smp)
        samples.sort(key=lambda smp: smp.prompt_index)  # stable: keeps sample order within a prompt
        return samples


class RolloutPool:
    def __init__(self, model_path: str, *, engine: str = "vllm", num_engines: int = 1, dtype: str = "float32",
                 seed: int = 0, max_model_len: int | None = None, gpu_memory_utilization: float = 0.3,
                 enforce_eager: bool = False, tensor_parallel_size: int = 1, cpus_per_engine: int = 1,
                 gpus_per_engine: float = 0.0, trust_remote_code: bool = False, pad_token_id: int = 0,
                 startup_timeout_s: float = 600.0, engine_kwargs: dict[str, Any] | None = None,
                 placement: Any = None, role: str = "rollout", engine_options: dict[str, Any] | None = None,
                 threads_per_engine: int = 0, extra_env: dict[str, str] | None = None):
        """``placement``: a :class:`trace_rl.placement.Placement` whose ``role`` slots pin engine i to its
        bundle (None: plain ``num_cpus`` / ``num_gpus`` requests, anywhere on the cluster).
        ``engine_options``: extra arguments of the engine (``rollout.engine_options``: for vLLM, any
        ``vllm.LLM`` argument). ``threads_per_engine``: CPU threads of an engine without a GPU (0: see
        :func:`default_engine_threads`); ``extra_env``: more environment variables of the engine actors."""
        import ray

        from trace_rl.cluster import actor_env

        self.engine = engine
        self.pad_token_id = pad_token_id
        self.placement, self.role = placement, role
        env = actor_env()
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if gpus_per_engine == 0:
            env["OMP_NUM_THREADS"] = str(threads_per_engine or default_engine_threads())
            # vLLM's ahead-of-time compile cache cannot be read back with this torch on CPU ("'function'
            # object has no attribute 'finalize_loading'": a full recompile, ~30 s, every start); its
            # inductor cache can (~7 s). Only matters with rollout.enforce_eager=false.
            env.setdefault("VLLM_USE_AOT_COMPILE", os.environ.get("VLLM_USE_AOT_COMPILE", "0"))
        env.update(extra_env or {})
        cls = ray.remote(engine_class(engine))
        kwargs = dict(dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                      enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
                      max_model_len=max_model_len, trust_remote_code=trust_remote_code, pad_token_id=pad_token_id,
                      **(engine_kwargs or {}), **dict(engine_options or {}))
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
        return EngineClient(self.actors).generate_samples(prompts, spec)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec | dict[str, Any], *, version: int = 0,
                 meta: dict[str, list[Any]] | None = None) -> Batch:
        """Generate ``spec.n`` samples per prompt and return them as a Batch (group id = prompt index).
        ``meta`` holds per-prompt lists; each is repeated for the prompt's samples."""
        samples = self.generate_samples(prompts, spec)
        return samples_to_batch(prompts, samples, pad_token_id=self.pad_token_id, version=version, meta=meta)

    def generate_stream(self, prompts: list[list[int]], spec: SamplingSpec | dict[str, Any], *,
                        meta: dict[str, list[Any]] | None = None, chunks: int = 4) -> list:
        """Start generating ``spec.n`` samples per prompt on every engine (contiguous prompt chunks, one per
        engine) and return one Ray streaming generator per engine. Each yields object refs, alternately a
        Batch of whole groups (group id = prompt index in ``prompts``) and that chunk's stats dict, as
        the groups finish (``chunks``: about how many chunks each engine cuts its share into). Nothing is
        fetched here: the refs go straight on to the next stage."""
        spec_d = spec.to_dict() if isinstance(spec, SamplingSpec) else dict(spec)
        streams = []
        for actor, (s, e) in zip(self.actors, _chunks(len(prompts), len(self.actors))):
            if e > s:
                part = {k: list(v[s:e]) for k, v in (meta or {}).items()}
                streams.append(actor.generate_stream.options(num_returns="streaming").remote(
                    prompts[s:e], spec_d, part, s, chunks))
        return streams

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


def check_config(cfg: Any, err) -> None:
    """The ``rollout`` section (``trace_rl.config.validate``'s ``err(field, problem, fix)`` per problem)."""
    r, a = cfg.rollout, cfg.algorithm
    if r.engine not in ENGINES:
        err("rollout.engine", f"unknown value {r.engine!r}", f"use one of {', '.join(ENGINES)}")
    if r.n < 1:
        err("rollout.n", f"{r.n} < 1", "use 2 or more (GRPO needs a group)")
    elif r.n == 1 and getattr(a, "adv_estimator", None) in ("grpo", "dr_grpo"):
        err("rollout.n", "1 sample per prompt gives every GRPO advantage 0", "use rollout.n >= 2")
    if r.num_engines < 1:
        err("rollout.num_engines", f"{r.num_engines} < 1", "use 1 or more")
    if not (r.temperature > 0):
        err("rollout.temperature", f"{r.temperature} must be > 0", "use 1.0 for training rollouts")
    if not (0 < r.top_p <= 1):
        err("rollout.top_p", f"{r.top_p} is outside (0, 1]", "use 1.0 for training rollouts")
    if r.max_new_tokens < 1:
        err("rollout.max_new_tokens", f"{r.max_new_tokens} < 1", "use e.g. 128")
    if r.gpus_per_engine == 0 and r.tensor_parallel_size > 1:
        err("rollout.tensor_parallel_size", "tensor parallelism needs GPUs",
            "set rollout.gpus_per_engine >= 1 or tensor_parallel_size=1")
    if not (0 < r.gpu_memory_utilization <= 1):
        err("rollout.gpu_memory_utilization", f"{r.gpu_memory_utilization} is outside (0, 1]",
            "use 0.3 on CPU, 0.5-0.9 on GPUs")
    if r.threads_per_engine < 0:
        err("rollout.threads_per_engine", f"{r.threads_per_engine} < 0", "use 0 (automatic) or a number of threads")
    if r.stream_chunks < 1:
        err("rollout.stream_chunks", f"{r.stream_chunks} < 1",
            "use 1 (hand the batch on when it is complete) or more (stream finished groups in chunks)")


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
    options = placement.options(role, index)
    if slot.shard_bundles:
        # vLLM's Ray executor puts tensor-parallel worker k on bundle VLLM_RAY_BUNDLE_INDICES[k], each asking
        # VLLM_RAY_PER_WORKER_GPUS there; the engine actor itself only drives them: it takes CPUs on its
        # bundle and no accelerator (its share plus worker 0's would exceed bundle 0's, and never schedule)
        env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, slot.shard_bundles))
        env["VLLM_RAY_PER_WORKER_GPUS"] = str(slot.accelerators)
        options = {**options, "num_gpus": 0}
        options.pop("resources", None)
    return dict(**options, runtime_env={"env_vars": env}, name=None)


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
