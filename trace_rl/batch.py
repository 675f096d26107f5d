"""The batch schema: the contract between the services (DESIGN.md, "The shape").

Layout (as in verl): prompts are LEFT-padded to ``P`` tokens, responses RIGHT-padded to ``R``
tokens, and every per-token field is indexed over response positions, shape ``[B, R]``.
The full sequence fed to the model is ``cat([prompt_ids, response_ids], dim=1)``; the logits
that score ``response_ids[:, t]`` are those at sequence position ``P - 1 + t``.

Every producer fills the fields it owns and leaves the rest alone:

============================  ===========  ===========================================
field                         producer     shape / meaning
============================  ===========  ===========================================
prompt_ids                    rollout      [B, P] long, left-padded with ``pad_token_id``
prompt_mask                   rollout      [B, P] bool, True on real prompt tokens
response_ids                  rollout      [B, R] long, right-padded
response_mask                 rollout      [B, R] bool, True on generated tokens
behaviour_logprobs            rollout      [B, R] float32, logprob under the sampling policy
policy_version                rollout      [B] long, learner step whose weights sampled it
group_ids                     driver       [B] long, same id = same prompt (a GRPO group)
rewards                       reward       [B] float32, outcome reward
advantages                    advantage    [B, R] float32, per-token advantage
channel_weights               advantage    [C, B, R] float32, weight of each token in channel c
channel_names                 advantage    C names, e.g. ("pg",) or ("pg", "fkl:key")
channel_norms                 advantage    C normalisers in ("agg", "token", "seq"), or () = all "agg"
teacher_topk_ids              teacher      [B, R, K] long, the teacher's top-k token ids
teacher_topk_logprobs         teacher      [B, R, K] float32, their log-probs (full-vocab normalised)
teacher_logprobs              teacher      [B, R] float32, teacher log-prob of the sampled token
key_mask                      annotate     [B, R] bool, annotated key-span tokens (aligned, capped)
error_mask                    annotate     [B, R] bool, annotated error-span tokens (aligned, capped)
============================  ===========  ===========================================

``meta`` holds per-sequence Python values the services pass along (``uid``, ``answer``,
``finish_reason``, the annotator's ``label``); it never reaches the learner's math.

Only torch, the standard library and the pure-torch ``trace_rl.algo`` are imported here, so the
algorithm core and the tests can build batches without Ray.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from trace_rl.algo.channels import CHANNEL_NORMS


@dataclass
class Batch:
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    group_ids: torch.Tensor
    policy_version: torch.Tensor
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    channel_weights: torch.Tensor | None = None
    channel_names: tuple[str, ...] = ()
    channel_norms: tuple[str, ...] = ()
    teacher_topk_ids: torch.Tensor | None = None
    teacher_topk_logprobs: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    error_mask: torch.Tensor | None = None
    # Non-tensor, per-sequence information (problem ids, etc.); never sent to the learner's math.
    meta: dict[str, list[Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------ basic shape helpers
    def __len__(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_ids.shape[1])

    @property
    def response_len(self) -> int:
        return int(self.response_ids.shape[1])

    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def position_ids(self) -> torch.Tensor:
        """Positions that ignore the left padding (0 at the first real prompt token)."""
        mask = self.attention_mask().long()
        return (mask.cumsum(dim=1) - 1).clamp(min=0)

    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def nbytes(self) -> int:
        """Bytes held by the tensor fields (what moving the batch costs)."""
        return int(sum(v.numel() * v.element_size() for _, v in self._tensor_fields()))

    def replace(self, **fields: Any) -> "Batch":
        """A shallow copy with ``fields`` replaced (tensors are shared, not copied)."""
        return Batch(**{**self.to_dict(), **fields})

    # ------------------------------------------------------------------ slicing / merging
    def _tensor_fields(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                yield f.name, v

    def select(self, index: torch.Tensor | slice | list[int]) -> "Batch":
        """Rows ``index`` of every per-sequence field (channel_weights is indexed on dim 1)."""
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.long)
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            index = index.nonzero().flatten()
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "channel_weights" and v is not None:
                out[f.name] = v[:, index]
            elif isinstance(v, torch.Tensor):
                out[f.name] = v[index]
            elif f.name == "meta":
                idx = range(len(self))[index] if isinstance(index, slice) else index.tolist()
                out[f.name] = {k: [vals[i] for i in idx] for k, vals in v.items()}
            else:
                out[f.name] = v
        return Batch(**out)

    def split(self, n: int) -> list["Batch"]:
        """``n`` contiguous, equally sized parts (``len(self)`` must be divisible by ``n``)."""
        if len(self) % n:
            raise ValueError(f"cannot split a batch of {len(self)} sequences into {n} equal parts")
        size = len(self) // n
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(n)]

    @staticmethod
    def concat(batches: list["Batch"], pad_token_id: int = 0) -> "Batch":
        """Concatenate along the batch dim, re-padding prompts (left) and responses (right)."""
        P = max(b.prompt_len for b in batches)
        R = max(b.response_len for b in batches)
        out: dict[str, Any] = {}
        for f in dataclasses.fields(Batch):
            vals = [getattr(b, f.name) for b in batches]
            if f.name == "meta":
                keys = set().union(*[v.keys() for v in vals])
                out["meta"] = {k: sum((v.get(k, [None] * len(b)) for v, b in zip(vals, batches)), []) for k in keys}
            elif f.name in ("channel_names", "channel_norms"):
                if any(tuple(v) != tuple(vals[0]) for v in vals):
                    raise ValueError(f"cannot concatenate batches with different {f.name}: "
                                     f"{sorted({tuple(v) for v in vals})}")
                out[f.name] = vals[0]
            elif all(v is None for v in vals):
                out[f.name] = None
            elif any(v is None for v in vals):
                raise ValueError(f"field {f.name!r} is set in some batches and not others")
            elif f.name in ("prompt_ids", "prompt_mask"):
                fill = pad_token_id if f.name == "prompt_ids" else 0
                out[f.name] = torch.cat([_pad_to(v, P, dim=1, value=fill, left=True) for v in vals])
            elif f.name == "channel_weights":
                out[f.name] = torch.cat([_pad_to(v, R, dim=2) for v in vals], dim=1)
            elif vals[0].dim() == 3 and len({v.shape[2] for v in vals}) > 1:
                raise ValueError(f"cannot concatenate {f.name} with different K: {sorted({v.shape[2] for v in vals})}")
            elif vals[0].dim() >= 2:  # per-token response fields ([B, R] or [B, R, K])
                fill = pad_token_id if f.name == "response_ids" else 0
                out[f.name] = torch.cat([_pad_to(v, R, dim=1, value=fill) for v in vals])
            else:
                out[f.name] = torch.cat(vals)
        return Batch(**out)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self) -> None:
        """Raise ValueError naming the field whose shape breaks the schema."""
        B, R, P = len(self), self.response_len, self.prompt_len
        expect = {
            "prompt_ids": (B, P), "prompt_mask": (B, P), "response_ids": (B, R),
            "response_mask": (B, R), "behaviour_logprobs": (B, R), "group_ids": (B,),
            "policy_version": (B,), "rewards": (B,), "advantages": (B, R), "teacher_logprobs": (B, R),
            "key_mask": (B, R), "error_mask": (B, R),
        }
        for name, shape in expect.items():
            v = getattr(self, name)
            if v is not None and tuple(v.shape) != shape:
                raise ValueError(f"Batch.{name} has shape {tuple(v.shape)}, expected {shape}")
        if self.channel_weights is not None:
            C = len(self.channel_names)
            if tuple(self.channel_weights.shape) != (C, B, R):
                raise ValueError(
                    f"Batch.channel_weights has shape {tuple(self.channel_weights.shape)}, expected "
                    f"({C}, {B}, {R}) for channel_names={self.channel_names}")
        if self.channel_norms:
            if len(self.channel_norms) != len(self.channel_names):
                raise ValueError(f"Batch.channel_norms has {len(self.channel_norms)} entries for "
                                 f"{len(self.channel_names)} channel_names; give one per channel or () for all 'agg'")
            bad = [n for n in self.channel_norms if n not in CHANNEL_NORMS]
            if bad:
                raise ValueError(f"Batch.channel_norms has {bad}; each must be one of {CHANNEL_NORMS}")
        ids, lps = self.teacher_topk_ids, self.teacher_topk_logprobs
        if (ids is None) != (lps is None):
            raise ValueError("Batch.teacher_topk_ids and Batch.teacher_topk_logprobs must be set together")
        if ids is not None:
            for name, v in (("teacher_topk_ids", ids), ("teacher_topk_logprobs", lps)):
                if v.dim() != 3 or tuple(v.shape[:2]) != (B, R):
                    raise ValueError(f"Batch.{name} has shape {tuple(v.shape)}, expected ({B}, {R}, K)")
            if ids.shape != lps.shape:
                raise ValueError(f"Batch.teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs "
                                 f"{tuple(lps.shape)} must have the same shape")
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"Batch.teacher_topk_ids must hold integer token ids, got {ids.dtype}")


def _pad_to(t: torch.Tensor, size: int, dim: int, value: float = 0, left: bool = False) -> torch.Tensor:
    n = size - t.shape[dim]
    if n <= 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = n
    pad = torch.full(pad_shape, value, dtype=t.dtype)
    return torch.cat([pad, t] if left else [t, pad], dim=dim)
