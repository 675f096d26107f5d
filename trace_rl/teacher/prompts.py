"""The teacher's prompt: the student's question plus privileged context, in the chat template.

The teacher scores the student's response tokens *as if it had written them* after a prompt that
also shows material the student never sees (OPSD, arXiv 2601.18734; TRACE arXiv 2605.10194): the
reference solution, the final answer, the task's coarse hint, or a coarse type label from the
annotator. What it may NOT see is the annotator's span text or span positions: a teacher shown the
spans would simply copy them, and the KL on those spans would teach the student to imitate a leak.
The builder enforces that firewall by construction: its only inputs are ``Problem.privileged()``
fields and a short label, and a label that looks like span text (too long, or a substring of the
response, or anything but a few words without digits or symbols) is refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from trace_rl.tasks.base import Problem

PRIVILEGED_FIELDS = ("solution", "answer", "hint", "label")
"""What a teacher prompt may include: ``Problem.privileged()`` keys plus the annotator's type label."""

_HEADERS = {
    "solution": "A correct reference solution (for checking only):",
    "answer": "The correct final answer is:",
    "hint": "Hint:",
    "label": "The critical step is of type:",
}
MAX_LABEL_CHARS = 40
"""A type label is a few words ("carry", "multiplication"); anything longer is treated as a leak."""
_LABEL = re.compile(r"[A-Za-z][A-Za-z _-]*")


@dataclass(frozen=True)
class PrivilegedPromptBuilder:
    """Builds teacher prompts. ``fields``: which privileged items to show, in this order (a subset of
    :data:`PRIVILEGED_FIELDS`); items a problem lacks are skipped. ``instruction`` is the student's."""

    fields: tuple[str, ...] = ("solution",)
    instruction: str = ""
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()
    """Passed to the chat template, as for the student's prompts (``model.chat_template_kwargs``, e.g.
    Qwen3's thinking mode), so teacher and student see the same template."""

    def __post_init__(self) -> None:
        bad = [f for f in self.fields if f not in PRIVILEGED_FIELDS]
        if bad:
            raise ValueError(f"teacher.privileged={list(self.fields)} has unknown fields {bad}; "
                             f"use a subset of {list(PRIVILEGED_FIELDS)}")

    def messages(self, problem: Problem, label: str | None = None, response: str | None = None) -> list[dict[str, str]]:
        """Chat messages of the teacher prompt. ``response`` (optional) is only used to enforce the
        firewall on ``label``: a label that occurs in the response text is refused."""
        if label is not None:
            label = str(label).strip()
            if len(label) > MAX_LABEL_CHARS or not _LABEL.fullmatch(label):
                raise ValueError(f"teacher label {label[:60]!r} is not a coarse type label (letters, spaces, '_' "
                                 f"and '-' only, at most {MAX_LABEL_CHARS} characters): span text must never "
                                 f"reach the teacher")
            if response is not None and len(label) >= 8 and label in response:
                raise ValueError("teacher label is a substring of the response: span text must never reach the teacher")
        priv: dict[str, Any] = dict(problem.privileged())
        if label:
            priv["label"] = label
        parts = [problem.question if not self.instruction else f"{problem.question}\n{self.instruction}"]
        for f in self.fields:
            if priv.get(f):
                parts.append(f"{_HEADERS[f]}\n{priv[f]}")
        return [{"role": "user", "content": "\n\n".join(parts)}]

    def render(self, problem: Problem, tokenizer: Any, label: str | None = None, response: str | None = None) -> str:
        """The teacher prompt string, ending with the assistant header (the response follows it)."""
        return tokenizer.apply_chat_template(self.messages(problem, label, response), add_generation_prompt=True,
                                             tokenize=False, **dict(self.chat_template_kwargs))
