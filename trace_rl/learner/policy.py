"""The policy as the learner runs it: a Hugging Face causal LM whose head scores given tokens.

The HF model's ``lm_head`` is replaced by :class:`LogprobHead`, which turns last hidden states
straight into the log-probabilities (and entropies) of the response tokens with
:func:`trace_rl.algo.logprobs.token_logprobs_from_hidden`, so the ``[B, T, V]`` logits never
exist. It keeps the same ``weight`` Parameter (tied to the embeddings when the model ties them),
so parameter names, tying and checkpoints are unchanged.

Why a module and not a function called on ``lm_head.weight``: under ZeRO-3 a parameter is only
gathered while the module owning it runs its forward (DeepSpeed's module hooks), and its gradient
is reduce-scattered by the same machinery. Running the chunked head *inside* the lm_head module
makes that work unchanged on every backend (plain torch, DDP, ZeRO-1/2/3).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from trace_rl.algo.logprobs import gather_logprobs_from_hidden, token_logprobs_from_hidden
from trace_rl.batch import Batch

__all__ = ["LogprobHead", "PolicyModel", "model_inputs", "HF_PREFIX"]

# PolicyModel keeps the HF model under this attribute; strip it to get HF parameter names.
HF_PREFIX = "hf."


class LogprobHead(nn.Module):
    """Stands in for ``lm_head``: ``forward(hidden [N, H], targets [N])`` -> ``(logprobs [N], entropy [N] | None)``,
    and ``(logprobs, entropy, topk_logprobs [N, K])`` when ``topk_ids [N, K]`` is given."""

    def __init__(self, lm_head: nn.Module, chunk_size: int = 1024):
        super().__init__()
        if getattr(lm_head, "bias", None) is not None:
            raise ValueError("the model's lm_head has a bias; LogprobHead supports bias-free heads only "
                             "(Qwen3, Llama, Mistral)")
        self.weight = lm_head.weight  # the same Parameter: tying and names are kept
        self.chunk_size = int(chunk_size)

    def forward(self, hidden: Tensor, targets: Tensor, temperature: float = 1.0, with_entropy: bool = False,
                topk_ids: Tensor | None = None):
        """Log-probs of ``targets`` under ``softmax(hidden @ weight.T / temperature)`` (and entropies), and
        the log-probs at ``topk_ids`` (a teacher's top-k) when given: inside this module's forward, so
        ZeRO-3 gathers ``weight`` for both."""
        logp, ent = token_logprobs_from_hidden(hidden, self.weight, targets, chunk_size=self.chunk_size,
                                               temperature=temperature, with_entropy=with_entropy)
        if topk_ids is None:
            return logp, ent
        topk = gather_logprobs_from_hidden(hidden, self.weight, topk_ids, chunk_size=self.chunk_size,
                                           temperature=temperature)
        return logp, ent, topk


def model_inputs(batch: Batch, device: torch.device | str = "cpu") -> tuple[dict, int]:
    """Model inputs of ``batch`` with the all-padding columns trimmed away.

    Returns ``(kwargs, r_kept)``: the first ``r_kept`` response columns were kept, so the
    ``[b, r_kept]`` outputs go back to ``[b, R]`` by zero-padding on the right. Left padding of the
    prompts and right padding of the responses that no row of the micro-batch uses cost nothing.
    At least one prompt column and one response column are always kept, so every rank runs the
    same modules (ZeRO-3 needs that) even on an empty micro-batch.
    """
    pm, rm = batch.prompt_mask.bool(), batch.response_mask.bool()
    P, R = batch.prompt_len, batch.response_len
    if P < 1:
        raise ValueError("Batch.prompt_ids has no columns: every sequence needs at least one prompt token")
    used_p = pm.any(0).nonzero()
    p0 = min(int(used_p[0]) if len(used_p) else P - 1, P - 1)
    used_r = rm.any(0).nonzero()
    r1 = max(int(used_r[-1]) + 1 if len(used_r) else 1, 1)
    prompt_ids, prompt_mask = batch.prompt_ids[:, p0:], pm[:, p0:]
    response_ids, response_mask = batch.response_ids[:, :r1], rm[:, :r1]
    attn = torch.cat([prompt_mask, response_mask], dim=1).long()
    kw = dict(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1).to(device),
        attention_mask=attn.to(device),
        position_ids=(attn.cumsum(1) - 1).clamp(min=0).to(device),  # as Batch.position_ids()
        response_mask=response_mask.to(device),
        prompt_len=prompt_ids.shape[1],
    )
    return kw, r1


class PolicyModel(nn.Module):
    """An HF causal LM (``self.hf``) whose forward returns the response tokens' log-probs.

    ``forward(input_ids, attention_mask, position_ids, response_mask, prompt_len, temperature,
    with_entropy)`` -> ``(logprobs [b, R], entropy [b, R] | None)``, zero where
    ``response_mask`` is False. With ``topk_ids`` ``[b, R, K]`` (token ids per response position,
    e.g. ``Batch.teacher_topk_ids``) it returns a third tensor, ``[b, R, K]`` log-probs at those ids
    (zero on padding). The logits scoring response token ``t`` are those at sequence
    position ``prompt_len - 1 + t`` (trace_rl/batch.py); they are divided by ``temperature``,
    the rollout's sampling temperature, so the ratio compares like with like.
    """

    def __init__(self, hf_model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.hf = hf_model
        hf_model.lm_head = LogprobHead(hf_model.lm_head, chunk_size)
        # The decoder without its head, whatever the architecture calls it ("model" for Qwen/Llama).
        self._decoder_name = hf_model.base_model_prefix
        if not hasattr(hf_model, self._decoder_name):
            raise ValueError(f"{type(hf_model).__name__} has no decoder attribute {self._decoder_name!r}")

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, response_mask: Tensor,
                prompt_len: int, temperature: float = 1.0, with_entropy: bool = False,
                topk_ids: Tensor | None = None):
        """``(logprobs [b, R], entropy [b, R] | None)`` of the response tokens, plus ``topk_logprobs
        [b, R, K]`` when ``topk_ids`` is given (see the class docstring)."""
        decoder = getattr(self.hf, self._decoder_name)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        R = input_ids.shape[1] - prompt_len
        mask = response_mask.bool()
        h = hidden[:, prompt_len - 1: prompt_len - 1 + R][mask]  # [N, H], the scored positions only
        targets = input_ids[:, prompt_len:][mask]
        if topk_ids is not None and tuple(topk_ids.shape[:2]) != tuple(mask.shape):
            raise ValueError(f"topk_ids has shape {tuple(topk_ids.shape)}, expected {tuple(mask.shape)} + (K,) "
                             f"(one row of ids per response position)")
        out = self.hf.lm_head(h, targets, temperature, with_entropy,
                              topk_ids[mask] if topk_ids is not None else None)
        logp, ent = out[0], out[1]
        full = torch.zeros(mask.shape, dtype=logp.dtype, device=logp.device)
        logp_full = full.masked_scatter(mask, logp)
        ent_full = full.masked_scatter(mask, ent) if ent is not None else None
        if topk_ids is None:
            return logp_full, ent_full
        topk_full = out[2].new_zeros(tuple(mask.shape) + (out[2].shape[-1],))
        topk_full[mask] = out[2]
        return logp_full, ent_full, topk_full

    def hf_named_parameters(self):
        """``(HF name, parameter)`` pairs (tied parameters once, under their first name)."""
        for name, p in self.named_parameters():
            yield name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name, p
