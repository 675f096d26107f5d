"""The default rollout engine: a vLLM ``LLM`` living inside one Ray actor.

The engine core runs in the actor's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a weight
update hands tensors to the model runner without serialising them. New weights are loaded in place
through vLLM's layer-wise reload; afterwards every tied / packed embedding is re-processed, because
on the CPU backend a tied ``lm_head`` keeps its own packed copy of the embedding matrix that the
reload does not touch (STACK_NOTES.md: logits are silently wrong otherwise), and the prefix cache is
dropped so no KV computed with the old weights is reused.
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterable

import torch

from trace_rl.rollout.base import Sample


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): methods callable by collective_rpc."""

    def trace_rl_load_weights(self, items: Iterable[tuple[str, torch.Tensor]]) -> int:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        items = list(items)
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.reload_weights(weights_iterator=iter(items))
        # Refresh embedding-derived kernels (the tied lm_head's packed copy on CPU, see module doc).
        repacked = 0
        for module in self.model_runner.model.modules():
            if isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
                module.quant_method.process_weights_after_loading(module)
                repacked += 1
        return len(items)


class VLLMEngine:
    """One vLLM engine. Methods are called through Ray (see ``RolloutPool``)."""

    def __init__(self, model_path: str, *, dtype: str = "float32", seed: int = 0,
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = True,
                 tensor_parallel_size: int = 1, max_model_len: int | None = None,
                 trust_remote_code: bool = False, engine_index: int = 0, max_logprobs: int = 20):
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
            enable_prefix_caching=True,
            # the teacher asks for prompt_logprobs=top_k; vLLM refuses more than max_logprobs
            max_logprobs=max(int(max_logprobs), 20),
        )
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._version = 0
        self.startup_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], spec: dict[str, Any]) -> list[Sample]:
        from vllm import SamplingParams

        seed = spec.get("seed")
        if seed is not None and not torch.cuda.is_available():
            # vLLM's CPU sampler cannot use per-request generators with top-p/top-k ("CPU Generator
            # does not use offset"); the engine-level seed still makes a run reproducible.
            seed = None
        params = SamplingParams(
            n=spec.get("n", 1), temperature=spec.get("temperature", 1.0), top_p=spec.get("top_p", 1.0),
            top_k=spec.get("top_k", -1) if spec.get("top_k", -1) > 0 else 0,
            max_tokens=spec.get("max_new_tokens", 128), logprobs=0, seed=seed,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        samples: list[Sample] = []
        for i, out in enumerate(outputs):
            for comp in out.outputs:
                ids = list(comp.token_ids)
                lps = [float(step[tok].logprob) for tok, step in zip(ids, comp.logprobs or [])]
                if len(lps) != len(ids):
                    raise RuntimeError(f"vLLM returned {len(lps)} logprobs for {len(ids)} tokens")
                samples.append(Sample(i, ids, lps, "length" if comp.finish_reason == "length" else "stop"))
        return samples

    def score(self, sequences: list[list[int]], start: list[int], temperature: float = 1.0) -> list[list[float]]:
        """log p(seq[t] | seq[:t]) for t >= start[i] (the prompt-logprob path of vLLM)."""
        from vllm import SamplingParams

        if temperature != 1.0:
            raise ValueError("VLLMEngine.score supports temperature=1.0 only (prompt logprobs are raw)")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        result = []
        for seq, st, out in zip(sequences, start, outputs):
            pl = out.prompt_logprobs
            result.append([float(pl[t][seq[t]].logprob) for t in range(max(st, 1), len(seq))])
        return result

    def score_topk(self, sequences: list[list[int]], start: list[int], k: int) -> list[dict[str, list]]:
        """Teacher scoring through vLLM's ``prompt_logprobs`` (temperature 1): for each sequence and
        every position ``t >= start[i]``, ``log p(seq[t] | seq[:t])`` and the ``k`` most likely tokens
        with their log-probs, in decreasing order. Returns ``{"logprobs": [n], "topk_ids": [n][k],
        "topk_logprobs": [n][k]}`` per sequence, ``n = len(seq) - start``."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=int(k), temperature=1.0)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        result = []
        for seq, st, out in zip(sequences, start, outputs):
            pl = out.prompt_logprobs
            lps, ids, tlps = [], [], []
            for t in range(max(st, 1), len(seq)):
                entries = pl[t]
                lps.append(float(entries[seq[t]].logprob))
                ranked = sorted(((e.rank, tok, e.logprob) for tok, e in entries.items() if e.rank is not None
                                 and e.rank <= k), key=lambda x: x[0])[:k]
                if len(ranked) < k:
                    raise RuntimeError(f"vLLM returned {len(ranked)} top logprobs at position {t}, asked for {k}")
                ids.append([tok for _, tok, _ in ranked])
                tlps.append([float(lp) for _, _, lp in ranked])
            result.append({"logprobs": lps, "topk_ids": ids, "topk_logprobs": tlps})
        return result

    # ------------------------------------------------------------------ weights
    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        n = self.llm.collective_rpc("trace_rl_load_weights", args=(list(state_dict.items()),))[0]
        self.llm.reset_prefix_cache()
        self._version = int(version)
        return {"tensors": float(n), "seconds": time.perf_counter() - t0}

    def version(self) -> int:
        return self._version

    def info(self) -> dict[str, Any]:
        return {"engine": "vllm", "startup_s": self.startup_s, "version": self._version,
                "pid": os.getpid()}
