"""The build recipe of the tiny model and the two build stages ("base", "sft").

``TinyRecipe`` holds every setting the weights depend on; ``TinyRecipe.digest(stage)`` names the
cache directory (``trace_rl.models.cache``). ``build_base`` trains the tokenizer on the arith
task's text and saves a randomly initialised Qwen3; ``build_sft`` writes the SFT data (arith train
split, chat-formatted prompts, reference solutions as targets) and fine-tunes the base on it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trace_rl.models.tiny import TinyModelSpec

# Bump when the build code changes in a way the recipe fields do not capture.
CODE_VERSION = 1


@dataclass(frozen=True)
class TinyRecipe:
    """Everything the tiny model's weights depend on. Defaults were tuned by measurement (prepare.py).

    What limits the tiny model is optimizer steps, not data: with ~1M parameters it must first
    learn to copy each operation's number from the question (appears after ~400 steps) and then
    the arithmetic itself, so many small batches (8 rows) beat fewer large ones at equal compute.
    """

    spec: TinyModelSpec = field(default_factory=TinyModelSpec)
    """Model shape and init seed."""
    vocab_size: int = 512
    """BPE vocabulary size (bytes + specials + merges)."""
    tokenizer_problems: int = 2000
    """Arith train problems whose prompt and solution text train the BPE merges."""
    data_seed: int = 0
    """Seed of the arith train problems (tokenizer corpus and SFT data)."""
    sft_problems: int = 16000
    """Arith train problems in the SFT data (one row each; steps * batch_size of them are seen)."""
    sft_steps: int = 3000
    """SFT optimizer steps."""
    sft_lr: float = 2e-3
    """SFT peak learning rate."""
    sft_batch_size: int = 8
    """SFT rows per optimizer step (small batches: many updates per second is what the tiny model needs)."""
    sft_max_len: int = 512
    """SFT max prompt + response tokens."""
    sft_warmup_steps: int = 50
    """SFT linear warmup steps."""
    sft_min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of the peak lr."""
    sft_weight_decay: float = 0.0
    """AdamW weight decay on matrices."""
    sft_seed: int = 0
    """Seed of the SFT data order."""
    sft_habit: str = "unboxed"
    """A flaw taught to a fraction of the SFT targets, which RL must then unlearn: "none";
    "unboxed" (the last line states the answer without \\boxed{}, so the reward cannot see it);
    "shortcut" (the steps are skipped and the answer stated at once, mostly wrong)."""
    sft_habit_frac: float = 0.6
    """Fraction of SFT targets with the habit (seeded, per row)."""

    def key(self, stage: str) -> dict:
        """The JSON-able settings ``stage``'s weights depend on (stage "sft" includes "base")."""
        base = {
            "code_version": CODE_VERSION,
            "task_source": _task_source_digest(),
            "spec": self.spec.to_dict(),
            "vocab_size": self.vocab_size,
            "tokenizer_problems": self.tokenizer_problems,
            "data_seed": self.data_seed,
        }
        if stage == "base":
            return base
        sft = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("sft_")}
        return {**base, **sft}

    def digest(self, stage: str) -> str:
        """Short hash of ``key(stage)``: the cache directory suffix."""
        blob = json.dumps(self.key(stage), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _task_source_digest() -> str:
    """Digest of the task code that produces the training text, so a changed task rebuilds the model."""
    import trace_rl.tasks.arith as arith
    import trace_rl.tasks.base as base

    h = hashlib.sha256()
    for mod in (arith, base):
        h.update(inspect.getsource(mod).encode())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------- task text
def arith_prompt(problem, tokenizer) -> str:
    """The chat-formatted prompt of an arith problem, exactly as RL rollouts see it: the question
    as the user turn with ``arith.ARITH_INSTRUCTION`` appended, no system turn."""
    from trace_rl.tasks.arith import ARITH_INSTRUCTION
    from trace_rl.tasks.base import render_prompt

    return render_prompt(problem, tokenizer, instruction=ARITH_INSTRUCTION)


HABITS = ("none", "unboxed", "shortcut")


def sft_rows(problems, tokenizer, habit: str = "none", habit_frac: float = 0.0, seed: int = 0) -> list[dict]:
    """``{"prompt", "response"}`` rows: chat-formatted question, reference solution as target; a
    seeded ``habit_frac`` of the targets carry ``habit`` (see ``TinyRecipe.sft_habit``)."""
    import random

    if habit not in HABITS:
        raise ValueError(f"sft_habit={habit!r} is unknown; use one of {', '.join(HABITS)}")
    rng = random.Random(f"trace_rl.sft_habit/{seed}")
    rows = []
    for p in problems:
        target = p.solution
        if habit != "none" and rng.random() < habit_frac:
            last = p.solution.strip().splitlines()[-1]
            if habit == "shortcut":
                target = last
            else:  # unboxed: "The answer is \boxed{N}." -> "The answer is N."
                target = p.solution.replace(f"\\boxed{{{p.answer}}}", p.answer)
        rows.append({"prompt": arith_prompt(p, tokenizer), "response": target})
    return rows


def tokenizer_corpus(problems) -> list[str]:
    """Text the BPE is trained on: the rendered prompts and solutions of ``problems``.

    Prompts are rendered with a throwaway byte-only tokenizer that carries the same chat
    template, so the merges also cover the template and the task instruction.
    """
    from trace_rl.models.tokenizer import build_tokenizer, chat_template_samples

    scaffold = build_tokenizer(chat_template_samples(), vocab_size=259, min_frequency=1000)
    texts = []
    for p in problems:
        texts.append(arith_prompt(p, scaffold))
        texts.append(p.solution)
    return texts


# ------------------------------------------------------------------------------------- stages
def build_base(recipe: TinyRecipe, out_dir: str | Path, *, log: Callable[[str], None] | None = None) -> dict:
    """Tokenizer + randomly initialised model into ``out_dir``; returns the record for recipe.json."""
    import time

    from trace_rl.models.tiny import build_tiny_model, count_parameters
    from trace_rl.models.tokenizer import build_tokenizer
    from trace_rl.tasks.arith import generate

    say = log or (lambda s: None)
    t0 = time.perf_counter()
    problems = generate("train", recipe.tokenizer_problems, seed=recipe.data_seed)
    tok = build_tokenizer(tokenizer_corpus(problems), vocab_size=recipe.vocab_size)
    build_tiny_model(recipe.spec, tok, out_dir)
    from transformers import AutoModelForCausalLM

    n = count_parameters(AutoModelForCausalLM.from_pretrained(str(out_dir)))
    dt = time.perf_counter() - t0
    say(f"[prepare] base model: {n / 1e6:.2f}M params, vocab {len(tok)}, built in {dt:.1f}s")
    return {"stage": "base", "key": recipe.key("base"), "num_parameters": n, "vocab": len(tok),
            "seconds": dt}


def build_sft(recipe: TinyRecipe, base_dir: str | Path, out_dir: str | Path, *,
              log: Callable[[str], None] | None = None) -> dict:
    """SFT data from the arith train split, then ``sft`` from ``base_dir`` into ``out_dir``."""
    import time

    from transformers import AutoTokenizer

    from trace_rl.models.sft import sft
    from trace_rl.tasks.arith import generate

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    problems = generate("train", recipe.sft_problems, seed=recipe.data_seed)
    data = out / "sft_data.jsonl"
    with data.open("w") as f:
        for row in sft_rows(problems, tok, recipe.sft_habit, recipe.sft_habit_frac, recipe.sft_seed):
            f.write(json.dumps(row) + "\n")
    res = sft(base_dir, data, out, steps=recipe.sft_steps, lr=recipe.sft_lr, batch_size=recipe.sft_batch_size,
              max_len=recipe.sft_max_len, warmup_steps=recipe.sft_warmup_steps,
              min_lr_ratio=recipe.sft_min_lr_ratio, weight_decay=recipe.sft_weight_decay,
              seed=recipe.sft_seed, log_every=100 if log else 0, log=log)
    data.unlink()  # regenerable from the recipe; keeps the cache small
    return {"stage": "sft", "key": recipe.key("sft"), "base_dir": str(base_dir),
            "first_loss": res["first_loss"], "final_loss": res["final_loss"], "tokens": res["tokens"],
            "sft_seconds": res["seconds"], "seconds": time.perf_counter() - t0}
