"""``python -m trace_rl.prepare``: build (or find in the cache) the tiny model and measure it.

Steps: train the byte-level BPE tokenizer on the arith task's text, save a randomly initialised
tiny Qwen3 ("base"), SFT it on the arith train split (chat-formatted question -> reference
solution), then generate on held-out "test" and "ood" problems with HF ``generate`` at
temperature 1.0 and 0.6 (top-p 0.95) and greedily, scoring with ``math_verify_score``. Prints the
checkpoint path and the accuracies. The build is cached (``trace_rl.models.cache``): a second run
only re-evaluates; ``--force`` rebuilds.

The recipe (``trace_rl.models.build.TinyRecipe``) is tuned so that the whole command takes about
5.5 minutes on 2 CPU cores (SFT ~290 s of it) and the SFT model solves some but far from all
held-out problems, leaving RL room to improve it. 60% of the SFT targets carry the "unboxed" habit
(the answer line without ``\\boxed{}``), which RL must unlearn: see docs/results.md. Measured (2 cores,
2026-11-23): test accuracy 0.395 / 0.370 / 0.000 at temperature 1.0 / 0.6 / greedy (greedy always
picks the majority, unboxed form), ood 0.005. Without the habit and with 1500 SFT steps the
model scored 0.20 / 0.28 / 0.30, and GRPO could not improve it within the demo's budget.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

# name, temperature (0 = greedy), top_p
EVAL_SETTINGS: tuple[tuple[str, float, float], ...] = (
    ("t1.0", 1.0, 0.95),
    ("t0.6", 0.6, 0.95),
    ("greedy", 0.0, 1.0),
)
# Longest reference solutions: ~81 tokens (test), ~117 (ood); leave room, but not for endless loops.
MAX_NEW_TOKENS = {"test": 128, "ood": 192}


def generate_responses(model, tokenizer, prompts: list[str], *, temperature: float, top_p: float = 1.0,
                       max_new_tokens: int = 128, batch_size: int = 256, seed: int = 0) -> list[dict]:
    """Sample one response per prompt with HF ``generate`` (greedy when ``temperature == 0``).

    Returns ``{"text", "num_tokens", "truncated"}`` per prompt, in order; ``truncated`` means no eos
    within ``max_new_tokens``. Prompts are left-padded; special tokens are dropped from ``text``.
    """
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[dict] = []
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for s in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[s: s + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False)
                kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
                    else dict(do_sample=False)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                     **kwargs)
                for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                    n = row.index(eos) + 1 if eos in row else len(row)
                    out.append({"text": tokenizer.decode(row[:n], skip_special_tokens=True), "num_tokens": n,
                                "truncated": eos not in row})
    finally:
        tokenizer.padding_side = old_side
    return out


def evaluate(model_path: str | Path, *, n_problems: int = 200, seed: int = 0,
             settings: tuple[tuple[str, float, float], ...] = EVAL_SETTINGS,
             log: Callable[[str], None] | None = None) -> dict:
    """Accuracy of the checkpoint at ``model_path`` on ``n_problems`` arith "test" and "ood" problems.

    Returns ``{split: {setting: {"accuracy", "mean_tokens", "truncated"}}}`` plus ``"seconds"``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trace_rl.models.build import arith_prompt
    from trace_rl.models.sft import default_num_threads
    from trace_rl.rewards.math_reward import math_verify_score
    from trace_rl.tasks.arith import generate

    say = log or (lambda s: None)
    t0 = time.perf_counter()
    torch.set_num_threads(default_num_threads())
    tok = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    results: dict = {}
    for split in ("test", "ood"):
        problems = generate(split, n_problems, seed=seed)
        prompts = [arith_prompt(p, tok) for p in problems]
        results[split] = {}
        for name, temp, top_p in settings:
            t1 = time.perf_counter()
            resp = generate_responses(model, tok, prompts, temperature=temp, top_p=top_p,
                                      max_new_tokens=MAX_NEW_TOKENS[split], seed=seed)
            scores = [math_verify_score(r["text"], p.answer) for r, p in zip(resp, problems)]
            n = max(1, len(resp))
            results[split][name] = {
                "accuracy": sum(scores) / n,
                "mean_tokens": sum(r["num_tokens"] for r in resp) / n,
                "truncated": sum(r["truncated"] for r in resp) / n,
            }
            say(f"[prepare] eval {split:4s} {name:6s} acc {results[split][name]['accuracy']:.3f} "
                f"({time.perf_counter() - t1:.1f}s)")
    results["seconds"] = time.perf_counter() - t0
    return results


def format_results(results: dict) -> str:
    """A small table of ``evaluate``'s accuracies."""
    names = [n for n, _, _ in EVAL_SETTINGS]
    lines = [f"{'split':6s} " + " ".join(f"{n:>8s}" for n in names)]
    for split in ("test", "ood"):
        if split in results:
            lines.append(f"{split:6s} " + " ".join(f"{results[split][n]['accuracy']:8.3f}" for n in names
                                                  if n in results[split]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m trace_rl.prepare``."""
    p = argparse.ArgumentParser(
        prog="python -m trace_rl.prepare",
        description="Build (or reuse from the cache) the tiny SFT model on the arith task, then report its "
                    "held-out accuracy. The cache is $TRACE_RL_CACHE or ~/.cache/trace_rl.")
    p.add_argument("--force", action="store_true", help="Rebuild the tokenizer, base model and SFT model even if cached.")
    p.add_argument("--quiet", action="store_true", help="Print only the checkpoint path and the accuracy table.")
    p.add_argument("--no-eval", action="store_true", help="Skip the held-out evaluation.")
    p.add_argument("--eval-problems", type=int, default=200,
                   help="Problems per held-out split (test, ood) in the evaluation (default 200).")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m trace_rl.prepare`` / ``trace-rl-prepare``."""
    args = build_parser().parse_args(argv)
    if args.eval_problems <= 0:
        raise SystemExit("--eval-problems must be a positive integer")
    log = None if args.quiet else (lambda s: print(s, flush=True))
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

    from trace_rl.models.cache import tiny_model_path

    t0 = time.perf_counter()
    base = tiny_model_path("base", force=args.force, log=log)
    path = tiny_model_path("sft", force=args.force, log=log)
    build_s = time.perf_counter() - t0
    print(f"tiny model (sft): {path}")
    if log:
        print(f"tiny model (base): {base}")
        record = json.loads((path / "recipe.json").read_text())
        print(f"[prepare] build/cache lookup {build_s:.1f}s; SFT loss {record['first_loss']:.3f} -> "
              f"{record['final_loss']:.3f}")
    if not args.no_eval:
        results = evaluate(path, n_problems=args.eval_problems, log=log)
        print(format_results(results))
        if log:
            print(f"[prepare] eval {results['seconds']:.1f}s; total {time.perf_counter() - t0:.1f}s")
        try:
            (path / "prepare_eval.json").write_text(json.dumps(results, indent=2) + "\n")
        except OSError:
            pass  # a read-only cache is fine: the numbers were printed
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
