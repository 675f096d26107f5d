"""gather_log_softmax / gather_logprobs_from_hidden (K ids per row) against naive dense references."""
from __future__ import annotations

import math

import pytest
import torch

from trace_rl.algo.logprobs import gather_log_softmax, gather_logprobs_from_hidden, token_logprobs_from_hidden

from .test_logprobs import MaxTensorSize, saved_bytes


def naive_gather_loop(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) at every id, one row at a time with Python floats."""
    V, K = logits.shape[-1], ids.shape[-1]
    out = []
    for row, row_ids in zip(logits.double().reshape(-1, V).tolist(), ids.reshape(-1, K).tolist()):
        row = [v / temperature for v in row]
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        out.append([row[i] - lse for i in row_ids])
    return torch.tensor(out, dtype=torch.float64).view(ids.shape)


def dense_gather(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(logits / temperature, -1).gather(-1, ids)


# ------------------------------------------------------------------------------ gather_log_softmax
@pytest.mark.parametrize("chunk", [1, 3, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gather_log_softmax_matches_loop(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 6, 11, generator=g) * 3
    logits = full[:, 1:]  # non-contiguous, like the learner's [:, P-1:-1] slice
    ids = torch.randint(0, 11, (3, 5, 4), generator=g)
    ids[0, 0] = torch.tensor([2, 2, 7, 2])  # repeated ids are allowed
    out = gather_log_softmax(logits, ids, chunk_size=chunk, temperature=temperature)
    assert out.dtype == torch.float32 and out.shape == (3, 5, 4)
    torch.testing.assert_close(out.double(), naive_gather_loop(logits, ids, temperature), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_gather_log_softmax_gradient_matches_dense_autograd_and_gradcheck(chunk):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 9, (2, 5, 3), generator=g)
    ids[1, 2] = torch.tensor([4, 4, 4])
    w = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    x1 = base.clone().requires_grad_()
    (gather_log_softmax(x1, ids, chunk_size=chunk, temperature=0.6) * w).sum().backward()
    x2 = base.clone().requires_grad_()
    (dense_gather(x2, ids, 0.6) * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda t: gather_log_softmax(t, ids, chunk_size=chunk, temperature=1.3),
                                    (base.clone().requires_grad_(),))


def test_gather_log_softmax_bf16_and_k1_equals_selective():
    from trace_rl.algo.logprobs import selective_log_softmax

    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(4, 7, 33, generator=g) * 4).bfloat16()
    ids = torch.randint(0, 33, (4, 7, 5), generator=g)
    out = gather_log_softmax(logits, ids, chunk_size=5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive_gather_loop(logits.float(), ids), atol=1e-5, rtol=0)
    x = logits.clone().requires_grad_()
    gather_log_softmax(x, ids, chunk_size=5).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    one = gather_log_softmax(logits, ids[..., :1], chunk_size=5)[..., 0]
    torch.testing.assert_close(one, selective_log_softmax(logits, ids[..., 0], chunk_size=5), atol=0, rtol=0)


def test_gather_log_softmax_saves_only_its_inputs_and_stays_chunked():
    N, V, K, chunk = 64, 256, 4, 8
    logits = torch.randn(N, V, requires_grad=True)
    ids = torch.randint(0, V, (N, K))
    out, nbytes, ptrs = saved_bytes(lambda: gather_log_softmax(logits, ids, chunk_size=chunk))
    assert logits.data_ptr() in ptrs and nbytes <= logits.numel() * 4 + ids.numel() * 8
    with MaxTensorSize() as probe:
        out.sum().backward()
    assert probe.max_numel <= N * V  # the gradient itself; no other full-size float tensor
    frozen = logits.detach()  # (a view: the probe would count it)
    with MaxTensorSize() as probe:
        gather_log_softmax(frozen, ids, chunk_size=chunk)
    assert probe.max_numel <= chunk * V


# ------------------------------------------------------------------------- gather_logprobs_from_hidden
def _hw(N=13, H=6, V=17, K=4, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    ids = torch.randint(0, V, (N, K), generator=g)
    return hidden, weight, ids


@pytest.mark.parametrize("chunk", [1, 4, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gather_from_hidden_values_and_gradients_match_dense(chunk, temperature):
    hidden, weight, ids = _hw()
    ids[3] = torch.tensor([5, 5, 1, 5])
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = gather_logprobs_from_hidden(h1, w1, ids, chunk_size=chunk, temperature=temperature)
    torch.testing.assert_close(out, naive_gather_loop(hidden @ weight.T, ids, temperature), atol=1e-10, rtol=0)
    (out * w).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (dense_gather(h2 @ w2.T, ids, temperature) * w).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-10, rtol=0)


def test_gather_from_hidden_gradcheck():
    hidden, weight, ids = _hw(N=5, H=3, V=7, K=3)
    assert torch.autograd.gradcheck(
        lambda h, w: gather_logprobs_from_hidden(h, w, ids, chunk_size=2, temperature=0.8),
        (hidden.clone().requires_grad_(), weight.clone().requires_grad_()))


def test_gather_from_hidden_with_one_id_equals_token_logprobs_from_hidden():
    hidden, weight, ids = _hw(dtype=torch.float32, K=1)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    a = gather_logprobs_from_hidden(h1, w1, ids, chunk_size=4, temperature=0.9)[:, 0]
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b, _ = token_logprobs_from_hidden(h2, w2, ids[:, 0], chunk_size=4, temperature=0.9)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    up = torch.randn(len(a), generator=torch.Generator().manual_seed(4))
    (a * up).sum().backward()
    (b * up).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-6, rtol=1e-5)


def test_gather_from_hidden_leading_dims_bf16_and_memory():
    hidden, weight, ids = _hw(N=24, H=8, V=64, K=3, dtype=torch.float32)
    out = gather_logprobs_from_hidden(hidden.view(4, 6, 8), weight, ids.view(4, 6, 3), chunk_size=5)
    assert out.shape == (4, 6, 3)
    torch.testing.assert_close(out.view(24, 3).double(), naive_gather_loop(hidden @ weight.T, ids), atol=1e-5,
                               rtol=0)
    hb, wb = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    ob = gather_logprobs_from_hidden(hb, wb, ids, chunk_size=5)
    assert ob.dtype == torch.float32
    ob.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with MaxTensorSize() as probe:
        gather_logprobs_from_hidden(h, w, ids, chunk_size=5).sum().backward()
    # chunk x V logits, the [V, H] weight gradient, never N x V
    assert probe.max_numel <= max(5 * 64, 64 * 8) < 24 * 64


def test_bad_ids_are_named():
    hidden, weight, ids = _hw(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"ids has shape \(13,\), expected \(13, 'K'\)"):
        gather_logprobs_from_hidden(hidden, weight, ids[:, 0])
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 17\)"):
        gather_logprobs_from_hidden(hidden, weight, ids.clone().fill_(17))
    with pytest.raises(TypeError, match="integer token ids"):
        gather_log_softmax(torch.randn(3, 5), torch.zeros(3, 2))
    with pytest.raises(TypeError, match="share a dtype"):
        gather_logprobs_from_hidden(hidden.double(), weight, ids)
    with pytest.raises(ValueError, match="chunk_size"):
        gather_log_softmax(torch.randn(3, 5), torch.zeros(3, 2, dtype=torch.long), chunk_size=0)
