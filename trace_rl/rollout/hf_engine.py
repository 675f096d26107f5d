"""The fallback rollout engine: transformers ``generate`` in a Ray actor.

Slower than vLLM on GPUs but dependency-light; useful where vLLM is not installed. Behaviour
log-probs are recomputed by one forward pass over the generated sequences (logits / T), so they
are exactly the learner's log-probs on the same weights.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from trace_rl.placement import ColocationLog, wake_event
from trace_rl.rollout.base import (Sample, chunk_stats, left_pad, sampled_logprobs_from_logits, samples_to_batch,
                                   stream_min_groups)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCORE_CHUNK = 1024
"""Positions per vocabulary projection when scoring (teacher): [SCORE_CHUNK, V] float32 at a time."""


class HFEngine(ColocationLog):
    def __init__(self, model_path: str, *, dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, engine_index: int = 0, batch_size: int = 64,
                 pad_token_id: int | None = None, **_: Any):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batch_pad_id = self.pad_id if pad_token_id is None else int(pad_token_id)  # the Batch's padding
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])
        self.generator = torch.Generator(device="cpu").manual_seed(seed + 1000 * engine_index)
        self.batch_size = batch_size
        self._version = 0
        self._weight_group = None  # trace_rl.sync collective group, once joined
        self.startup_s = time.perf_counter() - t0

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], spec: dict[str, Any]) -> list[Sample]:
        n = int(spec.get("n", 1))
        flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        samples: list[Sample] = []
        for s in range(0, len(flat), self.batch_size):
            samples.extend(self._generate_chunk(flat[s:s + self.batch_size], spec))
        return samples

    def generate_stream(self, prompts: list[list[int]], spec: dict[str, Any], meta: dict[str, list[Any]] | None = None,
                        group_offset: int = 0, chunks: int = 4):
        """Generate ``spec["n"]`` samples per prompt and yield them as they finish, alternately a
        :class:`~trace_rl.batch.Batch` of whole groups (group id = ``group_offset`` + prompt index, policy
        version = this engine's) and its :func:`~trace_rl.rollout.base.chunk_stats`. Called through Ray as a
        streaming generator: the caller gets object refs while the engine keeps generating. The samples are
        exactly :meth:`generate`'s (same sub-batches, same seeds)."""
        n = int(spec.get("n", 1))
        flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        min_groups = stream_min_groups(len(prompts), chunks)
        pending: list[Sample] = []
        counts: dict[int, int] = {}
        t_chunk, busy = time.time(), 0.0
        for s in range(0, len(flat), self.batch_size):
            t0 = time.perf_counter()
            with torch.no_grad():
                new = self._generate_chunk(flat[s:s + self.batch_size], spec)
            busy += time.perf_counter() - t0
            pending.extend(new)
            for smp in new:
                counts[smp.prompt_index] = counts.get(smp.prompt_index, 0) + 1
            whole = {i for i, c in counts.items() if c == n}
            last = s + self.batch_size >= len(flat)
            if whole and (len(whole) >= min_groups or last):
                out = [smp for smp in pending if smp.prompt_index in whole]
                pending = [smp for smp in pending if smp.prompt_index not in whole]
                for i in whole:
                    del counts[i]
                yield samples_to_batch(prompts, out, pad_token_id=self.batch_pad_id, version=self._version, meta=meta,
                                       group_offset=group_offset)
                yield chunk_stats(out, t_chunk, time.time(), busy, self._version)
                t_chunk, busy = time.time(), 0.0

    def _generate_chunk(self, items: list[tuple[int, list[int]]], spec: dict[str, Any]) -> list[Sample]:
        ids, mask = left_pad([p for _, p in items], self.pad_id)
        P = ids.shape[1]
        seed = spec.get("seed")
        if seed is not None:
            torch.manual_seed(seed)
        else:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        top_k = spec.get("top_k", -1)
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=True,
            temperature=spec.get("temperature", 1.0), top_p=spec.get("top_p", 1.0),
            top_k=top_k if top_k and top_k > 0 else 0, max_new_tokens=spec.get("max_new_tokens", 128),
            pad_token_id=self.pad_id, eos_token_id=list(self.eos_ids),
        )
        resp = out[:, P:].cpu()
        # cut each response after its first eos; the rest is padding
        lengths, finish = [], []
        for row in resp.tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in self.eos_ids), None)
            lengths.append(cut if cut is not None else len(row))
            finish.append("stop" if cut is not None else "length")
        full = torch.cat([ids, resp], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(resp)], dim=1)
        lp = self._logprobs(full, full_mask, P, spec.get("temperature", 1.0))
        return [Sample(items[r][0], resp[r, :lengths[r]].tolist(), lp[r, :lengths[r]].tolist(), finish[r])
                for r in range(len(items))]

    def _logprobs(self, ids: torch.Tensor, mask: torch.Tensor, start: int, temperature: float) -> torch.Tensor:
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=pos.to(self.device)).logits
        return sampled_logprobs_from_logits(logits[:, start - 1:-1], ids[:, start:].to(self.device), temperature).cpu()

    @torch.no_grad()
    def score(self, sequences: list[list[int]], start: list[int], temperature: float = 1.0) -> list[list[float]]:
        result = []
        for seq, st in zip(sequences, start):
            ids = torch.tensor([seq])
            logits = self.model(input_ids=ids.to(self.device)).logits
            lp = sampled_logprobs_from_logits(logits[:, :-1], ids[:, 1:].to(self.device), temperature)[0]
            result.append(lp[max(st, 1) - 1:].cpu().tolist())
        return result

    @torch.no_grad()
    def score_topk(self, sequences: list[list[int]], start: list[int], k: int) -> list[dict[str, Any]]:
        """Teacher scoring (temperature 1), same contract as ``VLLMEngine.score_topk``: per sequence,
        for positions ``t >= start``, the log-prob of ``seq[t]`` and the top-``k`` ids / log-probs (numpy
        arrays)."""
        result = []
        head = self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        for seq, st in zip(sequences, start):
            ids = torch.tensor([seq], device=self.device)
            first = max(st, 1)
            # the vocabulary projection only at the scored positions (row j scores seq[first + j]), in chunks of
            # SCORE_CHUNK positions: never the full [T, V] logits of a long privileged prompt
            hidden = self.model.base_model(input_ids=ids).last_hidden_state[0, first - 1:-1]
            targets = ids[0, first:]
            lps, top_ids, top_lps = [], [], []
            for c in range(0, hidden.shape[0], SCORE_CHUNK):
                logits = head(hidden[c:c + SCORE_CHUNK]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                logp = torch.log_softmax(logits, dim=-1)
                top = logp.topk(int(k), dim=-1)
                lps.append(logp.gather(1, targets[c:c + SCORE_CHUNK, None]).squeeze(1))
                top_ids.append(top.indices)
                top_lps.append(top.values)
            if not lps:
                lps, top_ids, top_lps = [hidden.new_zeros(0)], [targets.new_zeros(0, int(k))], [hidden.new_zeros(0, int(k))]
            result.append({"logprobs": torch.cat(lps).cpu().numpy(), "topk_ids": torch.cat(top_ids).cpu().numpy(),
                           "topk_logprobs": torch.cat(top_lps).cpu().numpy()})
        return result

    @torch.no_grad()
    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        self._load(state_dict)
        self._version = int(version)
        return {"tensors": float(len(state_dict)), "seconds": time.perf_counter() - t0}

    def _load(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        # a tied lm_head is absent from a parameter dict; anything else missing is a bug
        missing = [k for k in missing if not (k == "lm_head.weight" and self.model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"weight update does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")

    # ------------------------------------------------------------------ weight sync (trace_rl/sync)
    def weight_sync_info(self) -> dict[str, Any]:
        """What the collective / cuda_ipc syncs need to know: group ranks this engine takes (1), its
        node IP, device and GPU UUIDs."""
        from trace_rl.sync.group import local_node_ip

        uuids = []
        if self.device.type == "cuda":
            from trace_rl.sync.ipc import gpu_uuid

            uuids = [gpu_uuid(self.device)]
        return {"ranks": 1, "node_ip": local_node_ip(), "device": self.device.type, "gpu_uuids": uuids}

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                          buckets: list, timeout_s: float = 600.0) -> dict[str, float]:
        """Join the weight-sync group as rank ``rank_offset`` (blocks until every member joined)."""
        from trace_rl.sync.group import create_weight_group, local_node_ip

        self.close_weight_group()
        t0 = time.perf_counter()
        device = self.device if backend == "nccl" else torch.device("cpu")
        self._weight_group = create_weight_group(host, port, rank_offset, world_size, backend,
                                                 local_ip=local_node_ip(), device=device, timeout_s=timeout_s,
                                                 buckets=buckets)
        return {"seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def receive_weights(self, version: int) -> dict[str, float]:
        """Receive every bucket broadcast by learner rank 0 and load the weights."""
        from trace_rl.sync.group import drain_buckets, receive_buckets

        group = self._weight_group
        if group is None:
            raise RuntimeError("receive_weights before init_weight_group")
        t0 = time.perf_counter()
        stats: dict[str, float] = {}
        stream = receive_buckets(group, stats)
        try:
            state = dict(stream)
        finally:
            drain_buckets(stream)
        t1 = time.perf_counter()
        self._load(state)
        self._version = int(version)
        return {"tensors": float(len(state)), "bytes": stats.get("bytes", 0.0), "receive_s": t1 - t0,
                "seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def load_ipc_weights(self, shared: dict[str, list], buckets: list, version: int) -> dict[str, float]:
        """Load weights exported as CUDA IPC handles by a learner rank on this engine's GPU."""
        from trace_rl.sync.ipc import import_buckets

        t0 = time.perf_counter()
        state = dict(import_buckets(shared, buckets))
        self._load(state)
        torch.cuda.synchronize(self.device)
        n = len(state)
        del state  # views of the learner's buffers: drop them before it releases them
        self._version = int(version)
        return {"tensors": float(n), "seconds": time.perf_counter() - t0}

    def close_weight_group(self) -> None:
        group = self._weight_group
        if group is not None:
            group.close()
        self._weight_group = None

    def version(self) -> int:
        return self._version

    def info(self) -> dict[str, Any]:
        return {"engine": "hf", "startup_s": self.startup_s, "version": self._version, "pid": os.getpid()}

    # ------------------------------------------------------------------ colocation (trace_rl.placement)
    def sleep(self, level: int = 1) -> dict[str, Any]:
        """Colocated: give the accelerator to the learners (on CUDA the model moves to CPU memory; on CPU a
        no-op that is still counted, see :meth:`colocation_log`). ``level`` is vLLM's; ignored here."""
        acted = self.device.type == "cuda"
        if acted:
            self.model.to("cpu")
            torch.cuda.empty_cache()
        return self._colocation_event("sleep", acted)

    def wake_up(self, tags: list[str] | None = None) -> dict[str, Any]:
        """Colocated: take the accelerator back (``tags`` as vLLM's: ``["weights"]`` moves the model back,
        ``["kv_cache"]`` has nothing to do here: generate allocates its cache per call)."""
        event = wake_event(tags)
        acted = self.device.type == "cuda" and (not tags or "weights" in tags)
        if acted:
            self.model.to(self.device)
        return self._colocation_event(event, acted)

