"""Flat buckets: how a model's weights travel through a collective in a few large messages.

A collective broadcast has a fixed cost per call, so sending hundreds of small tensors one by one
wastes most of the time on latency. The sender flattens consecutive tensors of one dtype into a
single 1-D buffer of about ``bucket_bytes`` and broadcasts that; every receiver allocates the same
buffer, receives into it and cuts it back into views. Both sides work from the same :class:`Bucket`
plan (names, shapes, dtypes), computed once by the driver and handed to every participant at
group creation, so a sync moves nothing but the flat buffers.

Pure torch and the standard library (no Ray, no distributed state): unit-tested against a naive
reference in tests/sync/test_buckets.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

__all__ = ["TensorSpec", "Bucket", "plan_buckets", "flatten_bucket", "unflatten_bucket", "dtype_name",
           "dtype_from_name"]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (plain strings travel through every RPC layer)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    """One full (unsharded) tensor: its HF name, shape and dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_from_name(self.dtype).itemsize


@dataclass(frozen=True)
class Bucket:
    """Consecutive tensors of one dtype sent as one flat buffer, in this order."""

    dtype: str
    specs: tuple[TensorSpec, ...]

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.specs)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_from_name(self.dtype).itemsize

    def to_plain(self) -> tuple:
        """Builtins only (for RPC layers that refuse dataclasses, e.g. vLLM's multiprocess executor)."""
        return (self.dtype, tuple((s.name, tuple(s.shape)) for s in self.specs))

    @staticmethod
    def from_plain(plain: Sequence) -> "Bucket":
        dtype, specs = plain
        return Bucket(str(dtype), tuple(TensorSpec(str(n), tuple(int(d) for d in shape), str(dtype))
                                        for n, shape in specs))


def plan_buckets(specs: Iterable[TensorSpec], bucket_bytes: int) -> list[Bucket]:
    """Cut ``specs`` into buckets of at most ``bucket_bytes`` each, one dtype per bucket.

    Tensors keep their order within a dtype. A bucket is closed when the next tensor of its dtype
    would overflow it, so a tensor larger than ``bucket_bytes`` travels alone in its own bucket.
    Buckets are listed in the order they are closed (the last one of each dtype at the end, in the
    order the dtypes first appeared).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be > 0")
    out: list[Bucket] = []
    open_specs: dict[str, list[TensorSpec]] = {}
    open_bytes: dict[str, int] = {}
    for spec in specs:
        cur = open_specs.setdefault(spec.dtype, [])
        size = open_bytes.get(spec.dtype, 0)
        if cur and size + spec.nbytes > bucket_bytes:
            out.append(Bucket(spec.dtype, tuple(cur)))
            cur.clear()
            size = 0
        cur.append(spec)
        open_bytes[spec.dtype] = size + spec.nbytes
    out.extend(Bucket(dtype, tuple(cur)) for dtype, cur in open_specs.items() if cur)
    return out


def flatten_bucket(bucket: Bucket, tensors: Sequence[torch.Tensor], device: torch.device | str | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """One 1-D tensor of ``bucket.dtype`` holding ``tensors`` (in ``bucket.specs`` order) back to back.

    Shapes are checked against the plan; values are cast to the bucket's dtype. ``out``: a
    preallocated buffer of ``bucket.numel`` elements to fill instead of allocating one.
    """
    if len(tensors) != len(bucket.specs):
        raise ValueError(f"bucket has {len(bucket.specs)} tensors, got {len(tensors)}")
    dtype = dtype_from_name(bucket.dtype)
    if out is None:
        device = device if device is not None else (tensors[0].device if tensors else "cpu")
        out = torch.empty(bucket.numel, dtype=dtype, device=device)
    elif out.numel() != bucket.numel or out.dtype != dtype:
        raise ValueError(f"out holds {out.numel()} {out.dtype}, the bucket needs {bucket.numel} {dtype}")
    offset = 0
    for spec, t in zip(bucket.specs, tensors):
        if tuple(t.shape) != tuple(spec.shape):
            raise ValueError(f"{spec.name}: shape {tuple(t.shape)} differs from the plan's {spec.shape}")
        out[offset:offset + spec.numel].copy_(t.reshape(-1))
        offset += spec.numel
    return out


def unflatten_bucket(bucket: Bucket, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``(name, view)`` pairs cut from ``flat`` by the plan (views share ``flat``'s memory)."""
    if flat.dim() != 1 or flat.numel() != bucket.numel:
        raise ValueError(f"flat buffer has shape {tuple(flat.shape)}, the bucket needs ({bucket.numel},)")
    out, offset = [], 0
    for spec in bucket.specs:
        out.append((spec.name, flat[offset:offset + spec.numel].view(spec.shape)))
        offset += spec.numel
    return out
