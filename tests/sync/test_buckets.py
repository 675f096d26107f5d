"""Bucketing of the collective weight sync (trace_rl/sync/buckets.py) against a naive reference."""
from __future__ import annotations

import random

import pytest
import torch

from trace_rl.sync.buckets import (Bucket, TensorSpec, dtype_name, flatten_bucket, plan_buckets,
                                   unflatten_bucket)

DTYPES = (torch.float32, torch.bfloat16, torch.int64)


def naive_plan(specs: list[TensorSpec], cap: int) -> dict[str, list[list[str]]]:
    """Per dtype, the tensor names of each bucket: walk that dtype's tensors in order and start a new
    bucket whenever the next one would push the current bucket past ``cap`` bytes."""
    by_dtype: dict[str, list[TensorSpec]] = {}
    for s in specs:
        by_dtype.setdefault(s.dtype, []).append(s)
    out: dict[str, list[list[str]]] = {}
    for dtype, items in by_dtype.items():
        buckets, cur, size = [], [], 0
        for s in items:
            n = 1
            for d in s.shape:
                n *= d
            nbytes = n * {"float32": 4, "bfloat16": 2, "int64": 8}[dtype]
            if cur and size + nbytes > cap:
                buckets.append(cur)
                cur, size = [], 0
            cur.append(s.name)
            size += nbytes
        if cur:
            buckets.append(cur)
        out[dtype] = buckets
    return out


def random_specs(seed: int, n: int = 40) -> list[TensorSpec]:
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        shape = tuple(rng.choice([1, 3, 8, 17, 64]) for _ in range(rng.randint(0, 3)))
        if i % 13 == 5:
            shape = (0, 4)  # empty tensors exist (e.g. unused adapters)
        if i % 11 == 3:
            shape = (300, 50)  # larger than every bucket size below
        specs.append(TensorSpec(f"t{i}", shape, dtype_name(rng.choice(DTYPES))))
    return specs


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cap", [256, 4096, 50_000, 10**9])
def test_plan_matches_naive_reference(seed, cap):
    specs = random_specs(seed)
    plan = plan_buckets(specs, cap)
    got: dict[str, list[list[str]]] = {}
    for b in plan:
        assert {s.dtype for s in b.specs} == {b.dtype}, "one dtype per bucket"
        got.setdefault(b.dtype, []).append([s.name for s in b.specs])
    assert got == naive_plan(specs, cap)
    # every tensor exactly once
    assert sorted(s.name for b in plan for s in b.specs) == sorted(s.name for s in specs)


@pytest.mark.parametrize("cap", [256, 4096, 50_000])
def test_bucket_sizes_respect_the_cap_and_large_tensors_travel_alone(cap):
    specs = random_specs(3, n=60)
    plan = plan_buckets(specs, cap)
    for b in plan:
        if len(b.specs) > 1:
            assert b.nbytes <= cap
        else:
            assert b.nbytes <= cap or b.specs[0].nbytes > cap
    large = [s for s in specs if s.nbytes > cap]
    assert large, "the case must be exercised"
    for s in large:
        (bucket,) = [b for b in plan if s in b.specs]
        assert bucket.specs == (s,)
    # buckets are full: the first tensor of the next bucket of the same dtype would not have fit
    for dtype in {b.dtype for b in plan}:
        same = [b for b in plan if b.dtype == dtype]
        for a, b in zip(same, same[1:]):
            assert a.nbytes + b.specs[0].nbytes > cap


def test_flatten_unflatten_round_trip_is_exact():
    g = torch.Generator().manual_seed(0)
    specs = random_specs(4, n=30)
    tensors = {}
    for s in specs:
        dtype = getattr(torch, s.dtype)
        t = torch.randn(s.shape, generator=g) * 100 if dtype.is_floating_point else \
            torch.randint(-2**40, 2**40, s.shape, generator=g)
        tensors[s.name] = t.to(dtype)
    back = {}
    for b in plan_buckets(specs, 3000):
        flat = flatten_bucket(b, [tensors[s.name] for s in b.specs])
        assert flat.dtype == getattr(torch, b.dtype) and flat.shape == (b.numel,)
        naive = torch.cat([tensors[s.name].reshape(-1) for s in b.specs])
        assert torch.equal(flat, naive)
        for name, view in unflatten_bucket(b, flat.clone()):
            back[name] = view
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].shape == t.shape and back[name].dtype == t.dtype
        assert torch.equal(back[name], t)


def test_flatten_casts_and_checks_shapes():
    b = Bucket("bfloat16", (TensorSpec("a", (2, 2), "bfloat16"), TensorSpec("b", (3,), "bfloat16")))
    flat = flatten_bucket(b, [torch.ones(2, 2), torch.full((3,), 2.0)])  # float32 in, bf16 out
    assert flat.dtype == torch.bfloat16 and flat.tolist() == [1, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="b: shape"):
        flatten_bucket(b, [torch.ones(2, 2), torch.ones(4)])
    with pytest.raises(ValueError, match="needs"):
        unflatten_bucket(b, torch.zeros(6, dtype=torch.bfloat16))
    assert Bucket.from_plain(b.to_plain()) == b
    with pytest.raises(ValueError, match="> 0"):
        plan_buckets([], 0)
