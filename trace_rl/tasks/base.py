"""What a task hands to the rest of the system: problems, and their prompts in the model's chat format."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The usual instruction of math RLVR recipes (Qwen2.5-Math / DAPO style). The generated arith task
# uses a much shorter one (trace_rl.tasks.arith.ARITH_INSTRUCTION) because the tiny model's context
# is small.
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Problem:
    """One problem: the text the student sees, and the privileged material a teacher may see."""

    uid: str
    """Stable id, unique within a dataset."""
    question: str
    """The problem text shown to the student (no chat template)."""
    answer: str
    """The final answer, as it would appear inside \\boxed{}."""
    solution: str | None
    """Step-by-step reference solution ending in \\boxed{answer} (privileged)."""
    hint: str | None = None
    """Coarse privileged label, e.g. the kind of the first hard step (privileged)."""
    source: str = ""
    """Dataset / split name."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Task-specific extras (e.g. the arith task's operation chain)."""

    def privileged(self) -> dict[str, str]:
        """What a privileged teacher may see: ``answer`` always, ``solution`` and ``hint`` when known."""
        out = {"answer": self.answer}
        if self.solution is not None:
            out["solution"] = self.solution
        if self.hint is not None:
            out["hint"] = self.hint
        return out


def build_messages(problem: Problem, *, instruction: str = DEFAULT_INSTRUCTION,
                   system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat messages of ``problem``: an optional system turn, then the question (+ instruction)."""
    content = problem.question if not instruction else f"{problem.question}\n{instruction}"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": content})
    return messages


def render_prompt(problem: Problem, tokenizer: Any, *, instruction: str = DEFAULT_INSTRUCTION,
                  system_prompt: str | None = None) -> str:
    """The prompt string for ``problem`` in ``tokenizer``'s chat format, ending with the assistant header.

    ``instruction`` is appended to the question on its own line ("" appends nothing); the text is
    rendered with ``tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)``.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"render_prompt: tokenizer {type(tokenizer).__name__} has no chat_template; "
                         "load a chat/instruct tokenizer or set tokenizer.chat_template to a Jinja string")
    messages = build_messages(problem, instruction=instruction, system_prompt=system_prompt)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
