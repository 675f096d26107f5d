"""Token log-probabilities and entropies without materialising fp32 logits for the whole batch.

A policy's logits are ``[B, R, V]`` with ``V`` around 150k for Qwen3: one fp32 copy of a
64 x 4096-token batch is 160 GB. Everything here works on chunks of rows (flattened leading
dims) so at most one chunk of fp32 logits exists at a time, in forward *and* in backward:

- ``selective_log_softmax`` / ``entropy_from_logits`` take logits that already exist (maybe bf16)
  and never copy them whole; backward recomputes the softmax chunk by chunk from the saved input.
- ``token_logprobs_from_hidden`` goes one step further and never forms the full logits at all:
  it multiplies each chunk of last hidden states by the lm_head weight, and recomputes that
  product in backward (the fused-linear-cross-entropy idea), so the peak is one chunk of
  ``[chunk, V]`` fp32 logits.
- ``gather_log_softmax`` / ``gather_logprobs_from_hidden`` are the same with ``K`` ids per row
  (the student's log-probs at a teacher's top-k ids, for the vocabulary KL of on-policy distillation).

Arithmetic is done in float32 (float64 if the inputs are float64, which is what gradcheck uses);
results are float32 for bf16/fp16/fp32 inputs.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["selective_log_softmax", "entropy_from_logits", "token_logprobs_from_hidden", "gather_log_softmax",
           "gather_logprobs_from_hidden"]


# --------------------------------------------------------------------------------------------- helpers
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _row_blocks(lead: tuple[int, ...], chunk: int) -> Iterator[tuple]:
    """Index tuples over the leading dims ``lead``, each selecting at most ``chunk`` rows (>= 1).

    Blocks are taken along dim 0 where possible, so a non-contiguous slice such as
    ``logits[:, P - 1:-1]`` is never reshaped (= copied) as a whole: only one block at a time.
    """
    if len(lead) == 0:
        yield ()
        return
    if lead[0] == 0:
        return
    inner = math.prod(lead[1:])
    if inner == 0:
        return
    if inner <= chunk:
        step = max(1, chunk // inner)
        for s in range(0, lead[0], step):
            yield (slice(s, min(s + step, lead[0])),)
    else:
        for i in range(lead[0]):
            for rest in _row_blocks(lead[1:], chunk):
                yield (i,) + rest


def _check_chunk(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def _block(logits: Tensor, idx: tuple, V: int, cdt: torch.dtype, temperature: float) -> Tensor:
    """One block of rows as a [n, V] tensor in the compute dtype, divided by the temperature.
    Never modifies ``logits`` (for fp32 input the reshape may be a view of it)."""
    z = logits[idx].reshape(-1, V)
    if temperature == 1.0:
        return z.to(cdt)
    return z.to(cdt, copy=True).div_(temperature)  # one new buffer, whatever the input dtype


def _check_index(index: Tensor, lead: tuple[int, ...], vocab: int, name: str, logits_name: str) -> None:
    if not isinstance(index, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {index.dtype}; use .long()")
    if tuple(index.shape) != lead:
        raise ValueError(f"{name} has shape {tuple(index.shape)}, expected {lead} "
                         f"(the leading dims of {logits_name})")
    if index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} holds ids in [{lo}, {hi}], outside the vocabulary [0, {vocab}); "
                             f"replace padding ids (e.g. -100) by a valid id and mask them out instead")


def _check_hidden_weight(hidden: Tensor, weight: Tensor) -> None:
    if not isinstance(hidden, Tensor) or hidden.dim() < 1:
        raise ValueError("hidden must be a tensor of shape [N, H]")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be the lm_head weight of shape [V, H], got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but hidden's last dim is {hidden.shape[-1]}: "
                         f"weight must be [V, H] with H = hidden.shape[-1]")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype; cast one")
    if not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden must be floating point, got {hidden.dtype}")


# ----------------------------------------------------------------------- logprobs from existing logits
class _SelectiveLogSoftmax(torch.autograd.Function):
    """log_softmax(logits)[index], chunked; backward recomputes the softmax from the saved logits."""

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, chunk_size: int, temperature: float) -> Tensor:
        lead = tuple(logits.shape[:-1])
        V = logits.shape[-1]
        cdt = _compute_dtype(logits.dtype)
        out = torch.empty(lead, dtype=cdt, device=logits.device)
        for idx in _row_blocks(lead, chunk_size):
            z = _block(logits, idx, V, cdt, temperature)
            tgt = index[idx].reshape(-1, 1)
            lp = z.gather(1, tgt).squeeze(1) - torch.logsumexp(z, dim=-1)
            out[idx] = lp.view(out[idx].shape)
        ctx.save_for_backward(logits, index)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, index = ctx.saved_tensors
        lead = tuple(logits.shape[:-1])
        V = logits.shape[-1]
        cdt = _compute_dtype(logits.dtype)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for idx in _row_blocks(lead, ctx.chunk_size):
            z = _block(logits, idx, V, cdt, ctx.temperature)
            g = grad_out[idx].reshape(-1, 1).to(cdt)
            # d log p_t / d z_j = 1[j = t] - p_j ; z = logits / T
            gz = torch.softmax(z, dim=-1).mul_(-g)
            gz.scatter_add_(1, index[idx].reshape(-1, 1), g)
            if ctx.temperature != 1.0:
                gz.div_(ctx.temperature)
            grad[idx] = gz.to(logits.dtype).view(grad[idx].shape)
        return grad, None, None, None


def selective_log_softmax(logits: Tensor, index: Tensor, chunk_size: int = 4096, *,
                          temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature, -1)`` gathered at ``index``, without an fp32 copy of all
    the logits (dividing by ``temperature`` here, per chunk, also avoids a full-size copy).

    logits: ``[..., V]`` (bf16/fp16/fp32/fp64); index: ``[...]`` integer ids in ``[0, V)``.
    Returns ``[...]`` float32 (float64 for float64 logits). The leading dims are processed in
    blocks of at most ``chunk_size`` rows; backward saves only the input logits (no copy) and
    recomputes each block's softmax, so peak extra memory is a few ``[chunk_size, V]`` fp32 tensors.
    """
    if not isinstance(logits, Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a tensor of shape [..., V]")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    _check_chunk(chunk_size)
    _check_index(index, tuple(logits.shape[:-1]), logits.shape[-1], "index", "logits")
    _check_temperature(temperature)
    return _SelectiveLogSoftmax.apply(logits, index.long(), chunk_size, float(temperature))


class _EntropyFromLogits(torch.autograd.Function):
    """Entropy of softmax(logits) per row, chunked; backward recomputes from the saved logits."""

    @staticmethod
    def forward(ctx, logits: Tensor, chunk_size: int, temperature: float) -> Tensor:
        lead = tuple(logits.shape[:-1])
        V = logits.shape[-1]
        cdt = _compute_dtype(logits.dtype)
        out = torch.empty(lead, dtype=cdt, device=logits.device)
        for idx in _row_blocks(lead, chunk_size):
            z = _block(logits, idx, V, cdt, temperature)
            out[idx] = _entropy_rows(z).view(out[idx].shape)
        ctx.save_for_backward(logits)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (logits,) = ctx.saved_tensors
        lead = tuple(logits.shape[:-1])
        V = logits.shape[-1]
        cdt = _compute_dtype(logits.dtype)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for idx in _row_blocks(lead, ctx.chunk_size):
            z = _block(logits, idx, V, cdt, ctx.temperature)
            gz = _entropy_grad_rows(z, grad_out[idx].reshape(-1, 1).to(cdt))
            if ctx.temperature != 1.0:
                gz.div_(ctx.temperature)
            grad[idx] = gz.to(logits.dtype).view(grad[idx].shape)
        return grad, None, None


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_j a_ij b_ij per row, without materialising a * b (one more [n, V] buffer)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _entropy_rows(z: Tensor) -> Tensor:
    """H = logsumexp(z) - sum_j p_j z_j for each row of z [n, V]."""
    return torch.logsumexp(z, dim=-1) - _rowdot(torch.softmax(z, dim=-1), z)


def _entropy_grad_rows(z: Tensor, g: Tensor) -> Tensor:
    """g * dH/dz for rows of z [n, V]: dH/dz_j = -p_j (log p_j + H)."""
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    H = -_rowdot(p, logp)
    return logp.add_(H[:, None]).mul_(p).mul_(-g)


def entropy_from_logits(logits: Tensor, chunk_size: int = 4096, *, temperature: float = 1.0) -> Tensor:
    """Entropy ``-sum_v p_v log p_v`` of ``softmax(logits / temperature)`` for every row: ``[..., V] -> [...]``.

    Same chunking and dtype rules as :func:`selective_log_softmax`; differentiable.
    """
    if not isinstance(logits, Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a tensor of shape [..., V]")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    _check_chunk(chunk_size)
    _check_temperature(temperature)
    return _EntropyFromLogits.apply(logits, chunk_size, float(temperature))


# ------------------------------------------------------------------- logprobs from last hidden states
class _HiddenTokenLogprobs(torch.autograd.Function):
    """Fused lm_head + log_softmax + gather (+ entropy), recomputing each chunk's logits in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int,
                temperature: float, with_entropy: bool):
        N = hidden.shape[0]
        cdt = _compute_dtype(hidden.dtype)
        logp = torch.empty(N, dtype=cdt, device=hidden.device)
        ent = torch.empty(N if with_entropy else 0, dtype=cdt, device=hidden.device)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            # The matmul runs in the input dtype (as the model's lm_head would), then fp32.
            z = (hidden[s:e] @ weight.T).to(cdt)
            if temperature != 1.0:
                z.div_(temperature)
            lse = torch.logsumexp(z, dim=-1)
            logp[s:e] = z.gather(1, targets[s:e, None]).squeeze(1) - lse
            if with_entropy:
                ent[s:e] = lse - _rowdot(torch.softmax(z, dim=-1), z)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size, ctx.temperature, ctx.with_entropy = chunk_size, temperature, with_entropy
        ctx.set_materialize_grads(False)  # an unused entropy output gets grad None, not zeros
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not ctx.with_entropy:
            grad_ent = None
        if grad_logp is None and grad_ent is None:
            return None, None, None, None, None, None
        N, T = hidden.shape[0], ctx.temperature
        cdt = _compute_dtype(hidden.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        # The weight gradient is accumulated over chunks in fp32 (bf16 accumulation would lose
        # precision over many chunks); cast to the weight's dtype once at the end.
        grad_w = torch.zeros(weight.shape, dtype=_compute_dtype(weight.dtype), device=weight.device) \
            if need_w else None
        for s in range(0, N, ctx.chunk_size):
            e = min(s + ctx.chunk_size, N)
            h = hidden[s:e]
            z = (h @ weight.T).to(cdt)
            if T != 1.0:
                z.div_(T)
            # Build d(loss)/dz in place in one buffer (peak: ~2 chunk-sized fp32 tensors).
            if grad_ent is not None:
                gz = torch.log_softmax(z, dim=-1)  # log p
                del z
                p = gz.exp()
                H = -_rowdot(p, gz)
                ge = grad_ent[s:e, None].to(cdt)
                gz.add_(H[:, None]).mul_(p).mul_(-ge)  # dH/dz_j = -p_j (log p_j + H)
                if grad_logp is not None:
                    g = grad_logp[s:e, None].to(cdt)
                    gz.addcmul_(p, g, value=-1.0)
                del p
            else:
                gz = torch.softmax(z, dim=-1)
                del z
                g = grad_logp[s:e, None].to(cdt)
                gz.mul_(-g)
            if grad_logp is not None:
                gz.scatter_add_(1, targets[s:e, None], g)  # d log p_t / dz_j = 1[j = t] - p_j
            if T != 1.0:
                gz.div_(T)
            gz = gz.to(hidden.dtype)
            if need_h:
                grad_h[s:e] = gz @ weight
            if need_w:
                if gz.dtype == grad_w.dtype:
                    grad_w.addmm_(gz.T, h)  # no [V, H] temporary
                else:
                    grad_w += (gz.T @ h).to(grad_w.dtype)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def token_logprobs_from_hidden(hidden: Tensor, weight: Tensor, targets: Tensor, *, chunk_size: int = 1024,
                               temperature: float = 1.0,
                               with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities of ``targets`` (and entropies) straight from last hidden states.

    hidden: ``[N, H]`` (or ``[..., H]``), weight: ``[V, H]`` (the lm_head), targets: ``[N]``
    (or ``[...]``). For each chunk of ``chunk_size`` rows, ``logits = hidden_chunk @ weight.T /
    temperature`` (matmul in the input dtype, softmax in fp32); returns ``(logprobs, entropy)``,
    float32, shaped like ``targets``; ``entropy`` is None unless ``with_entropy``.

    Differentiable w.r.t. ``hidden`` and ``weight``: a custom autograd function saves only the
    inputs and recomputes each chunk's logits in backward, so the peak extra memory is a few
    ``[chunk_size, V]`` fp32 buffers instead of ``N x V`` (plus a ``[V, H]`` fp32 accumulator for
    the weight gradient). The lm_head has no bias in the models we target (Qwen3, Llama).
    """
    _check_hidden_weight(hidden, weight)
    _check_temperature(temperature)
    _check_chunk(chunk_size)
    lead = tuple(hidden.shape[:-1])
    _check_index(targets, lead, weight.shape[0], "targets", "hidden")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    logp, ent = _HiddenTokenLogprobs.apply(h2, weight, targets.reshape(-1).long(), chunk_size,
                                           float(temperature), bool(with_entropy))
    return logp.view(lead), (ent.view(lead) if with_entropy else None)


# ------------------------------------------------------------ several ids per row (teacher top-k)
# d log p_{i_k} / d z_j = 1[j = i_k] - p_j, so for upstream gradients g_k of the K gathered entries
# d(loss)/dz = scatter_add(ids, g) - p * sum_k g_k (repeated ids simply add up).
def _check_ids(ids: Tensor, lead: tuple[int, ...], vocab: int, src: str) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead:
        got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"ids has shape {got}, expected {lead + ('K',)} (the leading dims of {src}, then K ids "
                         f"per row)")
    _check_index(ids, tuple(ids.shape), vocab, "ids", src)


def _gather_grad(z: Tensor, ids: Tensor, g: Tensor, temperature: float) -> Tensor:
    """d(loss)/d(logits) of one block: rows z [n, V] (already / T), ids [n, K], upstream g [n, K]."""
    gz = torch.softmax(z, dim=-1).mul_(-g.sum(-1, keepdim=True))
    gz.scatter_add_(1, ids, g)
    return gz.div_(temperature) if temperature != 1.0 else gz


class _GatherLogSoftmax(torch.autograd.Function):
    """log_softmax(logits / T) at K ids per row, chunked; backward recomputes each block's softmax."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, chunk_size: int, temperature: float) -> Tensor:
        lead, V, K = tuple(logits.shape[:-1]), logits.shape[-1], ids.shape[-1]
        cdt = _compute_dtype(logits.dtype)
        out = torch.empty(lead + (K,), dtype=cdt, device=logits.device)
        for idx in _row_blocks(lead, chunk_size):
            z = _block(logits, idx, V, cdt, temperature)
            lp = z.gather(1, ids[idx].reshape(-1, K)) - torch.logsumexp(z, dim=-1, keepdim=True)
            out[idx] = lp.view(out[idx].shape)
        ctx.save_for_backward(logits, ids)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, ids = ctx.saved_tensors
        lead, V, K = tuple(logits.shape[:-1]), logits.shape[-1], ids.shape[-1]
        cdt = _compute_dtype(logits.dtype)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for idx in _row_blocks(lead, ctx.chunk_size):
            z = _block(logits, idx, V, cdt, ctx.temperature)
            gz = _gather_grad(z, ids[idx].reshape(-1, K), grad_out[idx].reshape(-1, K).to(cdt), ctx.temperature)
            grad[idx] = gz.to(logits.dtype).view(grad[idx].shape)
        return grad, None, None, None


def gather_log_softmax(logits: Tensor, ids: Tensor, *, chunk_size: int = 4096, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature, -1)`` gathered at ``K`` ids per row: ``[..., V], [..., K] -> [..., K]``.

    The several-ids version of :func:`selective_log_softmax` (e.g. the student's log-probs at the
    teacher's top-k token ids), with the same chunking, memory and dtype rules: float32 out
    (float64 for float64 logits), backward saves only the inputs and recomputes each block.
    """
    if not isinstance(logits, Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a tensor of shape [..., V]")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    _check_chunk(chunk_size)
    _check_temperature(temperature)
    _check_ids(ids, tuple(logits.shape[:-1]), logits.shape[-1], "logits")
    return _GatherLogSoftmax.apply(logits, ids.long(), chunk_size, float(temperature))


class _HiddenGatherLogprobs(torch.autograd.Function):
    """Fused lm_head + log_softmax + gather of K ids per row, recomputing each chunk's logits in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, ids: Tensor, chunk_size: int, temperature: float) -> Tensor:
        N, K = hidden.shape[0], ids.shape[1]
        cdt = _compute_dtype(hidden.dtype)
        out = torch.empty(N, K, dtype=cdt, device=hidden.device)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            z = (hidden[s:e] @ weight.T).to(cdt)  # matmul in the input dtype, as the lm_head would
            if temperature != 1.0:
                z.div_(temperature)
            out[s:e] = z.gather(1, ids[s:e]) - torch.logsumexp(z, dim=-1, keepdim=True)
        ctx.save_for_backward(hidden, weight, ids)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, ids = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, T = hidden.shape[0], ctx.temperature
        cdt = _compute_dtype(hidden.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulator for the weight gradient over chunks (see _HiddenTokenLogprobs)
        grad_w = torch.zeros(weight.shape, dtype=_compute_dtype(weight.dtype), device=weight.device) \
            if need_w else None
        for s in range(0, N, ctx.chunk_size):
            e = min(s + ctx.chunk_size, N)
            h = hidden[s:e]
            z = (h @ weight.T).to(cdt)
            if T != 1.0:
                z.div_(T)
            gz = _gather_grad(z, ids[s:e], grad_out[s:e].to(cdt), T).to(hidden.dtype)
            del z
            if need_h:
                grad_h[s:e] = gz @ weight
            if need_w:
                if gz.dtype == grad_w.dtype:
                    grad_w.addmm_(gz.T, h)
                else:
                    grad_w += (gz.T @ h).to(grad_w.dtype)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def gather_logprobs_from_hidden(hidden: Tensor, weight: Tensor, ids: Tensor, *, chunk_size: int = 1024,
                                temperature: float = 1.0) -> Tensor:
    """``log_softmax(hidden @ weight.T / temperature)`` at ``K`` ids per row, straight from last hidden states.

    hidden ``[N, H]`` (or ``[..., H]``), weight ``[V, H]`` (the lm_head), ids ``[N, K]`` (or
    ``[..., K]``) -> ``[N, K]`` float32 (float64 for float64 inputs). Used for the student's
    log-probs at the teacher's top-k ids: each value is normalised over the FULL vocabulary, like
    the teacher's, so ``1 - sum_k exp(.)`` is the student's tail mass. Same memory rules as
    :func:`token_logprobs_from_hidden` (chunks of ``chunk_size`` rows, logits recomputed in
    backward, never ``N x V`` at once); differentiable w.r.t. ``hidden`` and ``weight``. With
    ``K = 1`` it equals :func:`token_logprobs_from_hidden` of ``ids[..., 0]``.
    """
    _check_hidden_weight(hidden, weight)
    _check_temperature(temperature)
    _check_chunk(chunk_size)
    lead = tuple(hidden.shape[:-1])
    _check_ids(ids, lead, weight.shape[0], "hidden")
    K = ids.shape[-1]
    out = _HiddenGatherLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, ids.reshape(-1, K).long(),
                                      chunk_size, float(temperature))
    return out.view(lead + (K,))
