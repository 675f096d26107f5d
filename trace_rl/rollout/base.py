"""What every rollout engine promises (vLLM or HF generate), and the pieces they share."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch


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
