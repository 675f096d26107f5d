"""Shared pieces of the learner tests: a tiny random Qwen3, synthetic batches, and a NAIVE reference.

The reference is written independently of trace_rl: one sequence at a time, no padding, full
logits from the HF model's own forward, every token's loss term an explicit Python expression.
"""
from __future__ import annotations

import copy
import math

import torch

from trace_rl.batch import Batch

VOCAB = 128


def make_tiny_model(path, seed: int = 0) -> str:
    """Save a random Qwen3ForCausalLM (hidden 64, 2 layers, vocab 128, tied embeddings) and a tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                      max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).float()
    model.save_pretrained(path)
    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", unk_token="t1").save_pretrained(path)
    return str(path)


def make_batch(B: int = 10, P: int = 6, R: int = 7, seed: int = 1) -> Batch:
    """Left-padded prompts, right-padded responses of random lengths, per-token advantages, and a
    "pg" channel whose weight is 0 on some response tokens and 0.5 / 1 on the others."""
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(2, P + 1, (B,), generator=g)
    rlen = torch.randint(1, R + 1, (B,), generator=g)
    rlen[0] = R  # at least one full-length response
    pm = torch.arange(P)[None] >= (P - plen)[:, None]
    rm = torch.arange(R)[None] < rlen[:, None]
    pid = torch.randint(1, VOCAB, (B, P), generator=g) * pm
    rid = torch.randint(1, VOCAB, (B, R), generator=g) * rm
    adv = (torch.randn(B, 1, generator=g) + 0.3 * torch.randn(B, R, generator=g)) * rm
    w = torch.where(torch.rand(B, R, generator=g) > 0.2, 1.0, 0.0) * rm
    w[:, 0] = torch.where(rm[:, 0], 0.5, 0.0)  # fractional weights too
    return Batch(prompt_ids=pid, prompt_mask=pm, response_ids=rid, response_mask=rm,
                 behaviour_logprobs=-3 * torch.rand(B, R, generator=g) * rm, group_ids=torch.arange(B) // 2,
                 policy_version=torch.zeros(B, dtype=torch.long), rewards=torch.randn(B, generator=g),
                 advantages=adv.float(), channel_weights=w[None].float(), channel_names=("pg",))


def with_behaviour_near_current(batch: Batch, model, temperature: float, spread: float = 0.4,
                                seed: int = 7) -> Batch:
    """``batch`` with behaviour log-probs = the model's own +- ``spread`` (so some ratios get clipped)."""
    g = torch.Generator().manual_seed(seed)
    beh = torch.zeros(len(batch), batch.response_len)
    with torch.no_grad():
        for i, (lp, _) in enumerate(naive_logprobs(model, batch, temperature)):
            n = len(lp)
            beh[i, :n] = lp + spread * (2 * torch.rand(n, generator=g) - 1)
    return Batch(**{**batch.to_dict(), "behaviour_logprobs": beh})


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def naive_logprobs(model, batch: Batch, temperature: float):
    """Per sequence: (logprobs [n_i], entropies [n_i]) of its real response tokens, from the full logits
    of the unpadded sequence (prompt tokens + response tokens), divided by ``temperature``."""
    out = []
    for i in range(len(batch)):
        p = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
        r = batch.response_ids[i][batch.response_mask[i].bool()]
        ids = torch.cat([p, r])[None]
        logits = model(input_ids=ids).logits[0].float() / temperature
        # the logits at position j score token j + 1
        logp_all = torch.log_softmax(logits[len(p) - 1: len(p) - 1 + len(r)], dim=-1)
        lps = logp_all[torch.arange(len(r)), r]
        ents = -(logp_all.exp() * logp_all).sum(-1)
        out.append((lps, ents))
    return out


def naive_loss(model, ref_model, batch: Batch, algo, temperature: float, old=None) -> torch.Tensor:
    """The learner's objective on ``batch``, token by token.

    pg: ``max(-A r, -A clip(r, 1-eps_low, 1+eps_high))`` times the channel weight; KL: k3
    ``exp(lq - lp) - (lq - lp) - 1``; entropy bonus; aggregated per ``algo.loss_agg_mode``
    (token-mean or seq-mean-token-mean) over the whole batch. ``old``: per-sequence old log-probs
    (recompute mode); None uses ``batch.behaviour_logprobs``.
    """
    cur = naive_logprobs(model, batch, temperature)
    refs = None
    if algo.kl_coef > 0:
        with torch.no_grad():
            refs = naive_logprobs(ref_model, batch, temperature)
    w = batch.channel_weights[0]
    pg_terms, kl_terms, ent_terms = [], [], []  # per sequence: list of (value) over its counted tokens
    for i, (lp, ent) in enumerate(cur):
        pg_i, kl_i, ent_i = [], [], []
        for t in range(len(lp)):
            old_t = old[i][t] if old is not None else batch.behaviour_logprobs[i, t]
            ratio = torch.exp(lp[t] - old_t)
            A = batch.advantages[i, t]
            clipped = torch.clamp(ratio, 1 - algo.clip_eps_low, 1 + algo.clip_eps_high)
            if w[i, t] != 0:
                pg_i.append(w[i, t] * torch.maximum(-A * ratio, -A * clipped))
            if refs is not None:
                d = refs[i][0][t] - lp[t]
                kl_i.append(torch.exp(d) - d - 1)
            ent_i.append(ent[t])
        pg_terms.append(pg_i)
        kl_terms.append(kl_i)
        ent_terms.append(ent_i)

    def agg(terms):
        if algo.loss_agg_mode == "token-mean":
            n = sum(len(x) for x in terms)
            return sum(sum(x) for x in terms if x) / n
        if algo.loss_agg_mode == "seq-mean-token-mean":
            seqs = [x for x in terms if x]
            return sum(sum(x) / len(x) for x in seqs) / len(seqs)
        raise NotImplementedError(algo.loss_agg_mode)

    loss = agg(pg_terms)
    if algo.kl_coef > 0:
        loss = loss + algo.kl_coef * agg(kl_terms)
    if algo.entropy_coef > 0:
        loss = loss - algo.entropy_coef * agg(ent_terms)
    return loss


def unique_params(model) -> dict[str, torch.Tensor]:
    """HF-named parameters, tied ones once (as ``named_parameters`` dedups them)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Reference:
    """A plain single-process learner: full batch, naive loss, torch AdamW, grad clip."""

    def __init__(self, model_path, algo):
        self.algo = algo
        self.model = load_hf(model_path)
        self.ref = copy.deepcopy(self.model).eval() if algo.kl_coef > 0 else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=algo.lr, betas=tuple(algo.betas),
                                     weight_decay=algo.weight_decay)
        self.updates = 0

    def lr(self) -> float:
        a = self.algo
        if a.warmup_steps and self.updates < a.warmup_steps:
            return a.lr * (self.updates + 1) / a.warmup_steps
        return a.lr

    def update(self, batch: Batch, temperature: float, old=None) -> tuple[float, float]:
        """One optimizer update on ``batch``; returns (loss, pre-clip gradient norm)."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr()
        self.opt.zero_grad()
        loss = naive_loss(self.model, self.ref, batch, self.algo, temperature, old=old)
        loss.backward()
        clip = self.algo.grad_clip if self.algo.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.opt.step()
        self.updates += 1
        return float(loss.detach()), float(norm)

    def old_logprobs(self, batch: Batch, temperature: float):
        with torch.no_grad():
            return [lp for lp, _ in naive_logprobs(self.model, batch, temperature)]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
