"""Supervised fine-tuning (SFT) of any Hugging Face causal LM on a JSONL file of prompt/response pairs.

Data: one JSON object per line, either

* ``{"prompt": "<already chat-formatted prompt>", "response": "<target text>"}``, or
* ``{"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", "content": ...}]}``:
  everything before the last (assistant) message is rendered with the tokenizer's chat template
  (generation prompt added) and becomes the prompt; the last message's content is the response.

The prompt and the response are tokenised separately (the response as the model will generate
it after the prompt at rollout time) and the tokenizer's eos token is appended to the response.
The loss is the mean next-token cross-entropy over response tokens (+ eos) only, taken over the
whole batch (so micro-batching does not change it). Rows that cannot be used (bad JSON, missing
or non-string fields, an empty response, a prompt longer than ``max_len``) are skipped and counted.

Optimiser: AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``. Batches are built by
length (rows of similar length together, less padding) from a seeded shuffle. fp32 by default
(bf16 matmuls are slow on CPUs without AMX). Run ``python -m trace_rl.models.sft --help``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

IGNORE_INDEX = -100


@dataclass
class SFTExample:
    """One tokenised row: prompt ids and response ids (eos included)."""

    prompt_ids: list[int]
    response_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


# ------------------------------------------------------------------------------------- data
def _row_to_pair(row: Any, tokenizer) -> tuple[str, str]:
    """(prompt text, response text) of one JSON row; raises ValueError with the reason."""
    if not isinstance(row, dict):
        raise ValueError("not_an_object")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise ValueError("bad_messages")
        for m in msgs:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError("bad_messages")
        if msgs[-1]["role"] != "assistant":
            raise ValueError("last_message_not_assistant")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("no_chat_template")
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        return prompt, msgs[-1]["content"]
    prompt, response = row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError("missing_prompt_or_response")
    return prompt, response


def tokenize_rows(rows: Iterable[Any], tokenizer, max_len: int) -> tuple[list[SFTExample], Counter]:
    """Tokenise parsed JSON rows into ``SFTExample``s; returns (examples, Counter of skip reasons).

    A response that does not fit in ``max_len`` with its prompt is truncated (its eos is then
    lost); a prompt that leaves no room for a single response token is skipped ("too_long").
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one (e.g. tokenizer.eos_token = '<|im_end|>')")
    skipped: Counter = Counter()
    pairs: list[tuple[str, str]] = []
    for row in rows:
        try:
            prompt, response = _row_to_pair(row, tokenizer)
        except ValueError as e:
            skipped[str(e)] += 1
            continue
        if not response.strip():
            skipped["empty_response"] += 1
            continue
        pairs.append((prompt, response))
    examples: list[SFTExample] = []
    if not pairs:
        return examples, skipped
    # One batched call per side: much faster than a call per row on large files.
    p_ids = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    for p, r in zip(p_ids, r_ids):
        if len(p) + 1 > max_len:
            skipped["too_long"] += 1
            continue
        examples.append(SFTExample(list(p), (list(r) + [eos])[: max_len - len(p)]))
    return examples, skipped


def read_jsonl(path: str | Path) -> tuple[list[Any], Counter]:
    """Parsed rows of a JSONL file (blank lines ignored) and a Counter of unparsable lines."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SFT data file {str(p)!r} does not exist; give a JSONL file of "
                                '{"prompt": ..., "response": ...} or {"messages": [...]} rows')
    rows: list[Any] = []
    skipped: Counter = Counter()
    with p.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                skipped["bad_json"] += 1
    return rows, skipped


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random,
                           group_factor: int = 16) -> list[list[int]]:
    """Index batches of similar lengths: shuffle, sort within mega-batches of ``group_factor``
    batches, cut into batches, then shuffle the batch order (so lengths are not curriculum-ordered)."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    mega = batch_size * group_factor
    batches: list[list[int]] = []
    for s in range(0, len(idx), mega):
        chunk = sorted(idx[s: s + mega], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[j: j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[SFTExample], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (prompt and pad = -100)."""
    import torch

    T = max(len(e) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        seq = e.prompt_ids + e.response_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        att[i, : len(seq)] = 1
        labels[i, len(e.prompt_ids): len(seq)] = torch.tensor(e.response_ids)
    return ids, att, labels


def response_token_loss_sum(model, input_ids, attention_mask, labels):
    """(sum of next-token cross-entropy over label != -100 positions, number of such positions)."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    # position t predicts token t+1
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((target != IGNORE_INDEX).sum())


def lr_at(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup over
    ``warmup`` steps, then cosine decay from 1 to ``min_ratio`` at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def default_num_threads() -> int:
    """CPUs this process may run on (respects affinity/cgroup-pinned sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------- trainer
def sft(
    model_path: str | Path,
    data_path: str | Path,
    output_dir: str | Path,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float = 1e-3,
    batch_size: int = 32,
    micro_batch_size: int | None = None,
    max_len: int = 512,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    grad_clip: float | None = 1.0,
    seed: int = 0,
    log_every: int = 10,
    num_threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    save: bool = True,
    log: Callable[[str], None] | None = print,
    callback: Callable[[int, Any], None] | None = None,
) -> dict:
    """Fine-tune the HF causal LM at ``model_path`` on the JSONL file ``data_path``; save to ``output_dir``.

    Give ``steps`` (optimizer steps) or ``epochs`` (passes over the data, may be fractional);
    neither means one epoch. ``batch_size`` rows make one optimizer step, run as micro-batches
    of ``micro_batch_size`` rows with the loss normalised by the whole batch's response tokens.
    ``warmup_steps`` defaults to 5% of the steps. Returns a summary dict: ``first_loss``,
    ``final_loss`` (mean of the last ``log_every`` steps), ``steps``, ``tokens`` (response tokens
    trained on), ``rows_used``, ``rows_skipped``, ``skip_reasons``, ``seconds``, ``losses``,
    ``output_dir``. ``callback(step, model)``, if given, runs after every optimizer step (1-based
    step; e.g. to evaluate intermediate weights; leave the model in train mode).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_args(steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, micro_batch_size=micro_batch_size,
                max_len=max_len, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, log_every=log_every,
                dtype=dtype)
    say = log or (lambda s: None)
    t0 = time.perf_counter()
    if num_threads is None:
        num_threads = default_num_threads()
    torch.set_num_threads(num_threads)

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    raw, skipped = read_jsonl(data_path)
    examples, skipped2 = tokenize_rows(raw, tokenizer, max_len)
    skipped.update(skipped2)
    n_skipped = sum(skipped.values())
    if not examples:
        raise ValueError(f"no usable rows in {str(data_path)!r} ({len(raw)} parsed, skipped: {dict(skipped)}); "
                         'each line must be {"prompt": str, "response": str} or {"messages": [...]}')
    if n_skipped:
        say(f"[sft] skipped {n_skipped} bad rows: {dict(skipped)}")

    batches_per_epoch = math.ceil(len(examples) / batch_size)
    total = steps if steps is not None else max(1, math.ceil((epochs if epochs is not None else 1.0)
                                                             * batches_per_epoch))
    warmup = warmup_steps if warmup_steps is not None else int(0.05 * total)

    torch_dtype = getattr(torch, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype)
    model.to(device)
    model.train()
    # No weight decay on norms / biases (1-D tensors), the usual AdamW recipe.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, warmup, min_lr_ratio))

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(seed)
    lengths = [len(e) for e in examples]
    order: list[list[int]] = []
    mb = micro_batch_size or batch_size
    losses: list[float] = []
    n_tokens = 0
    say(f"[sft] {len(examples)} rows, {total} steps of {batch_size} rows, lr {lr}, warmup {warmup}, "
        f"{count_params(model) / 1e6:.2f}M params, {num_threads} threads")
    for step in range(total):
        if not order:
            order = length_grouped_batches(lengths, batch_size, rng)
        batch = [examples[i] for i in order.pop()]
        n_resp = sum(len(e.response_ids) for e in batch)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for s in range(0, len(batch), mb):
            ids, att, labels = (t.to(device) for t in collate(batch[s: s + mb], pad_id))
            loss, _ = response_token_loss_sum(model, ids, att, labels)
            (loss / n_resp).backward()  # global token count: micro-batching leaves the loss unchanged
            loss_sum += float(loss.detach())
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(loss_sum / n_resp)
        n_tokens += n_resp
        if log_every and ((step + 1) % log_every == 0 or step == total - 1):
            recent = losses[-log_every:]
            el = time.perf_counter() - t0
            say(f"[sft] step {step + 1}/{total} loss {sum(recent) / len(recent):.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} tok/s {n_tokens / el:.0f} elapsed {el:.1f}s")
        if callback is not None:
            callback(step + 1, model)

    model.eval()
    out = Path(output_dir)
    window = losses[-max(1, log_every or 1):]
    result = {
        "first_loss": losses[0],
        "final_loss": sum(window) / len(window),
        "steps": total,
        "tokens": n_tokens,
        "rows_used": len(examples),
        "rows_skipped": n_skipped,
        "skip_reasons": dict(skipped),
        "seconds": time.perf_counter() - t0,
        "losses": losses,
        "output_dir": str(out),
    }
    if save:
        save_checkpoint(model, tokenizer, out)
        summary = {k: v for k, v in result.items() if k != "losses"}
        summary["args"] = {"model_path": str(model_path), "data_path": str(data_path), "steps": steps,
                           "epochs": epochs, "lr": lr, "batch_size": batch_size, "max_len": max_len,
                           "warmup_steps": warmup, "min_lr_ratio": min_lr_ratio,
                           "weight_decay": weight_decay, "seed": seed}
        (out / "sft_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return result


def save_checkpoint(model, tokenizer, out_dir: str | Path) -> Path:
    """Save model (safetensors), generation config and tokenizer as an HF checkpoint in ``out_dir``."""
    from trace_rl.models.tokenizer import save_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
    return out


def count_params(model) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return int(sum({id(p): p.numel() for p in model.parameters()}.values()))


def _check_args(*, steps, epochs, lr, batch_size, micro_batch_size, max_len, warmup_steps, min_lr_ratio,
                log_every, dtype) -> None:
    if steps is not None and epochs is not None:
        raise ValueError("give either steps or epochs, not both")
    if steps is not None and (not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"steps={steps!r} must be a positive integer")
    if epochs is not None and not epochs > 0:
        raise ValueError(f"epochs={epochs!r} must be positive")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} must be positive (e.g. 1e-3 for a tiny model, 1e-5 for 1B+)")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if micro_batch_size is not None and (not isinstance(micro_batch_size, int) or micro_batch_size <= 0):
        raise ValueError(f"micro_batch_size={micro_batch_size!r} must be a positive integer or None")
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len={max_len!r} must be an integer >= 2")
    if warmup_steps is not None and warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} must be >= 0")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio={min_lr_ratio!r} must be in [0, 1]")
    if log_every is not None and log_every < 0:
        raise ValueError(f"log_every={log_every!r} must be >= 0 (0 = no logging)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r} must be float32, bfloat16 or float16")


# ------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m trace_rl.models.sft``."""
    p = argparse.ArgumentParser(
        prog="python -m trace_rl.models.sft",
        description="Supervised fine-tuning of a Hugging Face causal LM on a JSONL file of "
                    '{"prompt", "response"} or {"messages"} rows; the loss covers response tokens '
                    "(+ eos) only. Saves an HF checkpoint (model + tokenizer) to --out.")
    p.add_argument("--model", required=True, help="HF checkpoint directory to start from (local path).")
    p.add_argument("--data", required=True, help="JSONL training file; bad rows are skipped and counted.")
    p.add_argument("--out", required=True, help="Output directory for the fine-tuned checkpoint.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="Number of optimizer steps.")
    g.add_argument("--epochs", type=float, default=None,
                   help="Passes over the data (fractional allowed); default 1 when --steps is not given.")
    p.add_argument("--lr", type=float, default=1e-3, help="Peak learning rate (default 1e-3, for tiny models).")
    p.add_argument("--batch-size", type=int, default=32, help="Rows per optimizer step (default 32).")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="Rows per forward/backward (gradient accumulation); default = --batch-size.")
    p.add_argument("--max-len", type=int, default=512,
                   help="Max prompt+response tokens; longer responses are truncated (default 512).")
    p.add_argument("--warmup-steps", type=int, default=None, help="Linear warmup steps (default 5%% of steps).")
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="Cosine decay ends at this fraction of the peak lr (default 0.1).")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (default 0).")
    p.add_argument("--grad-clip", type=float, default=1.0, help="Global grad-norm clip; 0 disables (default 1).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the data order and of torch (default 0).")
    p.add_argument("--log-every", type=int, default=10, help="Print the loss every N steps; 0 = silent.")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: CPUs available).")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu).")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="Weight dtype (default float32; bf16 is slow on most CPUs).")
    return p


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: parse ``argv``, run ``sft`` and print the summary as JSON."""
    args = build_parser().parse_args(argv)
    res = sft(args.model, args.data, args.out, steps=args.steps, epochs=args.epochs, lr=args.lr,
              batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, max_len=args.max_len,
              warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
              grad_clip=args.grad_clip or None, seed=args.seed, log_every=args.log_every,
              num_threads=args.num_threads, device=args.device, dtype=args.dtype)
    print(json.dumps({k: v for k, v in res.items() if k != "losses"}, indent=2))
    return res


if __name__ == "__main__":
    main()
