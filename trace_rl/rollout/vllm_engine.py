"""The default rollout engine: a vLLM ``LLM`` living inside one Ray actor.

The engine core runs in the actor's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a weight
update hands tensors to the model runner without serialising them. New weights are loaded in place
through vLLM's layer-wise reload; afterwards every tied / packed embedding is re-processed, because
on the CPU backend a tied ``lm_head`` keeps its own packed copy of the embedding matrix that the
reload does not touch (STACK_NOTES.md: logits are silently wrong otherwise), and the prefix cache is
dropped so no KV computed with the old weights is reused. The weights arrive by one of the paths of
trace_rl/sync (a dict from the object store, buckets from a collective group, CUDA IPC handles); all
of them end in ``WeightSyncExtension.trace_rl_load_weights``.
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterable

import numpy as np
import torch

from trace_rl.placement import ColocationLog, wake_event
from trace_rl.rollout.base import Sample, chunk_stats, samples_to_batch, stream_min_groups


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt ``index`` of a call seeded with ``seed`` (distinct per prompt, 32-bit)."""
    return (int(seed) * 1_000_003 + int(index)) % (2**31 - 1)


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): methods callable by collective_rpc.

    Every load goes through :meth:`trace_rl_load_weights` (vLLM's in-place reload, then the
    embedding re-pack of the module docstring), whichever way the tensors arrived: a dict from the
    object store, a stream of buckets from a trace_rl.sync collective group (joined by each worker
    of the engine, rank ``rank_offset + worker rank``), or CUDA IPC handles.
    """

    def trace_rl_load_weights(self, items: Iterable[tuple[str, torch.Tensor]]) -> int:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        count = 0

        def counted():
            nonlocal count
            for item in items:
                count += 1
                yield item

        with set_current_vllm_config(self.vllm_config):
            self.model_runner.reload_weights(weights_iterator=counted())
        # Refresh embedding-derived kernels (the tied lm_head's packed copy on CPU, see module doc).
        for module in self.model_runner.model.modules():
            if isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
                module.quant_method.process_weights_after_loading(module)
        return count

    def trace_rl_weight_sync_info(self) -> dict[str, Any]:
        device = torch.device(getattr(self, "device", "cpu"))
        uuid = None
        if device.type == "cuda":
            from trace_rl.sync.ipc import gpu_uuid

            uuid = gpu_uuid(device)
        return {"rank": int(getattr(self, "rank", 0)), "device": device.type, "gpu_uuid": uuid}

    def trace_rl_init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                                   buckets: list, local_ip: str, timeout_s: float) -> int:
        from trace_rl.sync.buckets import Bucket
        from trace_rl.sync.group import create_weight_group

        self.trace_rl_close_weight_group()
        rank = int(rank_offset) + int(getattr(self, "rank", 0))
        device = torch.device(getattr(self, "device", "cpu")) if backend == "nccl" else torch.device("cpu")
        self._trace_rl_group = create_weight_group(
            host, port, rank, world_size, backend, local_ip=local_ip, device=device, timeout_s=timeout_s,
            buckets=[Bucket.from_plain(b) for b in buckets])
        return rank

    def trace_rl_receive_weights(self) -> dict[str, float]:
        from trace_rl.sync.group import drain_buckets, receive_buckets

        group = getattr(self, "_trace_rl_group", None)
        if group is None:
            raise RuntimeError("receive_weights before init_weight_group")
        stats: dict[str, float] = {}
        stream = receive_buckets(group, stats)
        try:
            stats["tensors"] = float(self.trace_rl_load_weights(stream))
        finally:
            drain_buckets(stream)  # a loader that stopped early must not leave the sender blocked
        return stats

    def trace_rl_load_ipc_weights(self, shared: dict[str, list], buckets: list) -> int:
        from trace_rl.sync.buckets import Bucket
        from trace_rl.sync.ipc import import_buckets

        items = import_buckets(shared, [Bucket.from_plain(b) for b in buckets])
        n = self.trace_rl_load_weights(items)
        torch.cuda.synchronize()
        del items  # views of the learner's buffers
        return n

    def trace_rl_close_weight_group(self) -> None:
        group = getattr(self, "_trace_rl_group", None)
        if group is not None:
            group.close()
        self._trace_rl_group = None


class VLLMEngine(ColocationLog):
    """One vLLM engine. Methods are called through Ray (see ``RolloutPool``)."""

    def __init__(self, model_path: str, *, dtype: str = "float32", seed: int = 0,
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = False,
                 tensor_parallel_size: int = 1, max_model_len: int | None = None,
                 trust_remote_code: bool = False, engine_index: int = 0, max_logprobs: int = 20,
                 enable_sleep_mode: bool = False, distributed_executor_backend: str | None = None,
                 pad_token_id: int = 0, detokenize: bool = False, **engine_options: Any):
        """``engine_options``: further ``vllm.LLM`` arguments (``rollout.engine_options``, e.g.
        ``max_num_seqs``, ``max_num_batched_tokens``, ``enable_prefix_caching``)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        from vllm import LLM

        t0 = time.perf_counter()
        kwargs: dict[str, Any] = dict(
            model=model_path, dtype=dtype, seed=seed + 1000 * engine_index,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code,
            worker_extension_cls=f"{WeightSyncExtension.__module__}.{WeightSyncExtension.__qualname__}",
            # behaviour logprobs must describe the distribution actually sampled (after temperature)
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=engine_options.pop("enable_prefix_caching", True),
            # the teacher asks for prompt_logprobs=top_k; vLLM refuses more than max_logprobs
            max_logprobs=max(int(max_logprobs), 20),
        )
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(engine_options)
        if enable_sleep_mode and torch.cuda.is_available():  # colocated: vLLM refuses sleep mode on CPU
            kwargs["enable_sleep_mode"] = True
        if distributed_executor_backend:  # a placement's tensor-parallel bundle (trace_rl.placement)
            kwargs["distributed_executor_backend"] = distributed_executor_backend
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.pad_token_id, self.detokenize = int(pad_token_id), bool(detokenize)
        self._version = 0
        self._warm_up()
        self.startup_s = time.perf_counter() - t0

    def _warm_up(self) -> None:
        """A small generation at start-up (16 sequences of 8 tokens): the engine's first calls pay one-off
        costs (about 2.5 s on a 2-core CPU) that would otherwise land in the first training step."""
        from vllm import SamplingParams

        t0 = time.perf_counter()
        prompts = [{"prompt_token_ids": [(7 * i + j) % 8 + 1 for j in range(24 + 4 * i)]} for i in range(4)]
        self.llm.generate(prompts, SamplingParams(n=4, max_tokens=8, logprobs=0, detokenize=False), use_tqdm=False)
        self.warmup_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ generation
    def _sampling_params(self, spec: dict[str, Any], n_prompts: int):
        """One SamplingParams, or one per prompt when ``spec["seed"]`` is set: prompt i gets the seed
        :func:`prompt_seed` (seed, i), so that the prompts of a call draw independent samples (one seed for
        all of them would give every prompt the same random stream)."""
        seed = spec.get("seed")
        if seed is not None and not torch.cuda.is_available():
            # vLLM's CPU sampler cannot use per-request generators with top-p/top-k ("CPU Generator
            # does not use offset"); the engine-level seed still makes a run reproducible.
            seed = None
        params = self._params(spec)
        if seed is None:
            return params
        out = []
        for i in range(n_prompts):
            p = params.clone()
            p.seed = prompt_seed(int(seed), i)
            out.append(p)
        return out

    def _params(self, spec: dict[str, Any]):
        from vllm import SamplingParams

        return SamplingParams(
            n=spec.get("n", 1), temperature=spec.get("temperature", 1.0), top_p=spec.get("top_p", 1.0),
            top_k=spec.get("top_k", -1) if spec.get("top_k", -1) > 0 else 0,
            max_tokens=spec.get("max_new_tokens", 128), logprobs=0,
            # token ids are all the trainer reads: no incremental detokenisation per step
            detokenize=self.detokenize,
        )

    @staticmethod
    def _samples(index: int, out: Any) -> list[Sample]:
        samples = []
        for comp in out.outputs:
            ids = list(comp.token_ids)
            lps = [float(step[tok].logprob) for tok, step in zip(ids, comp.logprobs or [])]
            if len(lps) != len(ids):
                raise RuntimeError(f"vLLM returned {len(lps)} logprobs for {len(ids)} tokens")
            samples.append(Sample(index, ids, lps, "length" if comp.finish_reason == "length" else "stop"))
        return samples

    def generate(self, prompts: list[list[int]], spec: dict[str, Any]) -> list[Sample]:
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                    self._sampling_params(spec, len(prompts)), use_tqdm=False)
        return [smp for i, out in enumerate(outputs) for smp in self._samples(i, out)]

    def generate_stream(self, prompts: list[list[int]], spec: dict[str, Any], meta: dict[str, list[Any]] | None = None,
                        group_offset: int = 0, chunks: int = 4):
        """Generate ``spec["n"]`` samples per prompt and yield the groups as they finish, alternately a
        :class:`~trace_rl.batch.Batch` of whole groups (group id = ``group_offset`` + prompt index, policy
        version = this engine's) and its :func:`~trace_rl.rollout.base.chunk_stats`; a chunk is handed on
        once at least ``ceil(len(prompts) / chunks)`` groups are finished. Called through Ray as a streaming
        generator: reward, annotation and teacher scoring start on the first chunks while the engine goes
        on with the rest. A weight update arriving meanwhile waits for the whole call (the actor runs one
        call at a time), so every sample of a call comes from one policy version."""
        engine = self.llm.llm_engine
        if engine.has_unfinished_requests():
            raise RuntimeError("generate_stream called while the engine still has unfinished requests")
        params = self._sampling_params(spec, len(prompts))
        min_groups = stream_min_groups(len(prompts), chunks)
        t_chunk, busy = time.time(), 0.0
        t0 = time.perf_counter()
        ids = self.llm.enqueue([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        # enqueue returns vLLM's internal ids ("<request id>-<random suffix>"); outputs carry the request id
        index = {}
        for i, rid in enumerate(ids):
            index[str(rid)] = index[str(rid).rsplit("-", 1)[0]] = i
        finished: list[Sample] = []
        groups = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished.extend(self._samples(index[str(out.request_id)], out))
                    groups += 1
            if groups and (groups >= min_groups or not engine.has_unfinished_requests()):
                busy += time.perf_counter() - t0
                finished.sort(key=lambda smp: smp.prompt_index)  # stable: keeps sample order within a group
                yield samples_to_batch(prompts, finished, pad_token_id=self.pad_token_id, version=self._version,
                                       meta=meta, group_offset=group_offset)
                yield chunk_stats(finished, t_chunk, time.time(), busy, self._version)
                finished, groups, busy, t_chunk = [], 0, 0.0, time.time()
                t0 = time.perf_counter()

    def score(self, sequences: list[list[int]], start: list[int], temperature: float = 1.0) -> list[list[float]]:
        """log p(seq[t] | seq[:t]) for t >= start[i] (the prompt-logprob path of vLLM)."""
        from vllm import SamplingParams

        if temperature != 1.0:
            raise ValueError("VLLMEngine.score supports temperature=1.0 only (prompt logprobs are raw)")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        result = []
        for seq, st, out in zip(sequences, start, outputs):
            pl = out.prompt_logprobs
            result.append([float(pl[t][seq[t]].logprob) for t in range(max(st, 1), len(seq))])
        return result

    def score_topk(self, sequences: list[list[int]], start: list[int], k: int) -> list[dict[str, np.ndarray]]:
        """Teacher scoring through vLLM's ``prompt_logprobs`` (temperature 1): for each sequence and
        every position ``t >= start[i]``, ``log p(seq[t] | seq[:t])`` and the ``k`` most likely tokens
        with their log-probs, in decreasing order. Returns arrays per sequence (``n = len(seq) - start``):
        ``{"logprobs": float32 [n], "topk_ids": int64 [n, k], "topk_logprobs": float32 [n, k]}`` (no token
        strings: detokenisation off; arrays, not nested lists, cross the object store)."""
        from vllm import SamplingParams

        k = int(k)
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=1.0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        result = []
        for seq, st, out in zip(sequences, start, outputs):
            pl = out.prompt_logprobs
            first = max(st, 1)
            n = max(len(seq) - first, 0)
            lps = np.empty(n, dtype=np.float32)
            ids = np.empty((n, k), dtype=np.int64)
            tlps = np.empty((n, k), dtype=np.float32)
            for j, t in enumerate(range(first, len(seq))):
                entries = pl[t]
                lps[j] = entries[seq[t]].logprob
                seen = np.zeros(k, dtype=bool)
                for tok, e in entries.items():  # the sampled token (any rank) and the top k (ranks 1..k)
                    r = e.rank
                    if r is not None and 1 <= r <= k:
                        ids[j, r - 1], tlps[j, r - 1], seen[r - 1] = tok, e.logprob, True
                if not seen.all():
                    raise RuntimeError(f"vLLM returned {int(seen.sum())} of the top {k} logprobs at position {t}")
            result.append({"logprobs": lps, "topk_ids": ids, "topk_logprobs": tlps})
        return result

    # ------------------------------------------------------------------ weights
    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        n = self.llm.collective_rpc("trace_rl_load_weights", args=(list(state_dict.items()),))[0]
        self.llm.reset_prefix_cache()
        self._version = int(version)
        return {"tensors": float(n), "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ weight sync (trace_rl/sync)
    def weight_sync_info(self) -> dict[str, Any]:
        """Group ranks this engine takes (one per vLLM worker), its node IP, device and GPU UUIDs."""
        from trace_rl.sync.group import local_node_ip

        workers = self.llm.collective_rpc("trace_rl_weight_sync_info")
        return {"ranks": len(workers), "node_ip": local_node_ip(), "device": workers[0]["device"],
                "gpu_uuids": [w["gpu_uuid"] for w in workers if w["gpu_uuid"]]}

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                          buckets: list, timeout_s: float = 600.0) -> dict[str, float]:
        """Every worker joins the weight-sync group (ranks ``rank_offset ..``); blocks until all joined."""
        from trace_rl.sync.group import local_node_ip

        t0 = time.perf_counter()
        self.llm.collective_rpc("trace_rl_init_weight_group", args=(
            host, port, rank_offset, world_size, backend, [b.to_plain() for b in buckets], local_node_ip(),
            float(timeout_s)))
        return {"seconds": time.perf_counter() - t0}

    def receive_weights(self, version: int) -> dict[str, float]:
        """Receive the buckets broadcast by learner rank 0 straight into vLLM's reload."""
        t0 = time.perf_counter()
        stats = self.llm.collective_rpc("trace_rl_receive_weights")[0]
        self.llm.reset_prefix_cache()
        self._version = int(version)
        return {**stats, "seconds": time.perf_counter() - t0}

    def load_ipc_weights(self, shared: dict[str, list], buckets: list, version: int) -> dict[str, float]:
        """Load weights exported as CUDA IPC handles by the learner rank(s) on this engine's GPU(s)."""
        t0 = time.perf_counter()
        n = self.llm.collective_rpc("trace_rl_load_ipc_weights", args=(shared, [b.to_plain() for b in buckets]))[0]
        self.llm.reset_prefix_cache()
        self._version = int(version)
        return {"tensors": float(n), "seconds": time.perf_counter() - t0}

    def close_weight_group(self) -> None:
        self.llm.collective_rpc("trace_rl_close_weight_group")

    def version(self) -> int:
        return self._version

    def info(self) -> dict[str, Any]:
        return {"engine": "vllm", "startup_s": self.startup_s, "warmup_s": self.warmup_s, "version": self._version,
                "pid": os.getpid(), "compiled": not self.llm.llm_engine.vllm_config.model_config.enforce_eager}

    # ------------------------------------------------------------------ colocation (trace_rl.placement)
    def sleep(self, level: int = 1) -> dict[str, Any]:
        """Colocated: give the accelerator to the learners. vLLM level-1 sleep moves the weights to CPU
        memory and drops the KV cache; it needs an LLM built with ``enable_sleep_mode`` on CUDA.
        Elsewhere (CPU) a no-op that is still counted (:meth:`colocation_log`)."""
        acted = self._sleep_mode_on()
        if acted:
            self.llm.sleep(level=int(level))
        return self._colocation_event("sleep", acted)

    def wake_up(self, tags: list[str] | None = None) -> dict[str, Any]:
        """Colocated: take the accelerator back: everything (``tags=None``, before generating), or only
        ``["weights"]`` (before a weight sync, the KV cache still released) / ``["kv_cache"]`` (after it)."""
        acted = self._sleep_mode_on()
        if acted:
            self.llm.wake_up(tags=list(tags) if tags else None)
        return self._colocation_event(wake_event(tags), acted)

    def _sleep_mode_on(self) -> bool:
        if not torch.cuda.is_available():
            return False
        on = bool(getattr(self.llm.llm_engine.vllm_config.model_config, "enable_sleep_mode", False))
        if not on and not getattr(self, "_warned_sleep", False):
            import logging

            logging.getLogger(__name__).warning(
                "colocated vLLM engine built without enable_sleep_mode: sleep/wake keep the GPU memory")
            self._warned_sleep = True
        return on

