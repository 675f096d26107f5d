"""What every rollout engine promises (vLLM or HF generate), and the pieces they share."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from trace_rl.batch import Batch


@dataclass
class SamplingSpec:
    """Sampling settings of one ``generate`` call (training rollouts or evaluation)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Sample:
    """One generated response. ``logprobs[i]`` is log p(response_ids[i]) under the sampling policy
    (after temperature; top-p/top-k truncation is not applied to it)."""

    prompt_index: int
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (eos / stop token) or "length"


class Engine(Protocol):
    """The interface of a rollout engine actor. Weights arrive as a dict of full (unsharded)
    tensors with Hugging Face parameter names."""

    def generate(self, prompts: list[list[int]], spec: dict[str, Any]) -> list[Sample]: ...

    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> dict[str, float]: ...

    def score(self, sequences: list[list[int]], start: list[int], temperature: float = 1.0) -> list[list[float]]: ...

    def version(self) -> int: ...


def stream_min_groups(num_prompts: int, chunks: int) -> int:
    """Groups per streamed chunk: an engine hands on its finished groups in about ``chunks`` chunks
    (``rollout.stream_chunks``; 1 = everything at the end)."""
    return max(1, -(-int(num_prompts) // max(int(chunks), 1)))


def chunk_stats(samples: list[Sample], start: float, end: float, busy_s: float, version: int) -> dict[str, Any]:
    """The small record an engine's stream yields after each chunk (``generate_stream``): rows, groups,
    generated tokens, the wall-clock window of the work and the seconds it was busy on it."""
    return {"rows": len(samples), "groups": len({s.prompt_index for s in samples}),
            "tokens": sum(len(s.response_ids) for s in samples), "start": start, "end": end, "busy_s": busy_s,
            "version": int(version)}


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [n, P], attention_mask [n, P])`` of token lists left-padded to the longest (for HF generate)."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, P - len(s):] = 1
    return ids, mask


def sampled_logprobs_from_logits(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[ids] over the last dim, in float32."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def samples_to_batch(prompts: list[list[int]], samples: list[Sample], *, pad_token_id: int, version: int,
                     meta: dict[str, list[Any]] | None = None, group_offset: int = 0) -> Batch:
    """Left-pad prompts, right-pad responses (the schema of trace_rl/batch.py). Group id = ``group_offset``
    + the sample's prompt index; ``meta`` holds per-prompt lists, repeated for the prompt's samples."""
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
        behaviour_logprobs=logprobs, group_ids=torch.tensor([group_offset + s.prompt_index for s in samples], dtype=torch.long),
        policy_version=torch.full((B,), version, dtype=torch.long), meta=out_meta,
    )
