"""Evaluation benchmarks from local files in their common formats, and how their answers are checked.

One loader for the usual public releases (``.jsonl`` / ``.json`` / ``.parquet``; nothing is downloaded):

=============== ================================================= ===============================
format          columns (case-insensitive)                        answer
=============== ================================================= ===============================
MATH-500        problem, solution, answer, unique_id              ``answer``
AIME 2024/2025  problem or question, answer (int or str), id      ``answer``
AMC23           question, answer (often a float such as 27.0)     ``answer`` (27.0 -> "27")
Minerva         problem, solution (ending in ``\\boxed{}``)       the solution's last ``\\boxed{}``
OlympiadBench   question, final_answer: ["$x$", ...], solution[]  the final answers joined by ", "
GPQA-Diamond    Question, Correct Answer, Incorrect Answer 1..3   a letter A-D (options shuffled)
=============== ================================================= ===============================

The first two families reuse ``trace_rl.tasks.math_data``'s column detection; the format of a file is
decided by its first object (``detect_format``). A GPQA problem shows its four options as ``A) ...``
to ``D) ...`` in an order drawn from ``(seed, problem id)`` alone, so the order is the same whatever
the file order, ``limit`` or machine; its answer is the correct option's letter, checked by
``choice_letter_score`` (not math-verify, which would read a letter as a variable). Math answers go to
``trace_rl.rewards.math_reward:math_verify_score``.
"""
from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_rl.rewards.math_reward import extract_boxed
from trace_rl.tasks.base import Problem
from trace_rl.tasks.math_data import (ANSWER_KEYS, ID_KEYS, JSON_EXTENSIONS, PARQUET_EXTENSIONS, QUESTION_KEYS,
                                      LoadStats, _answer_text, _first, _question_text, _read_json_rows,
                                      _read_parquet_rows)

MATH_SCORE_FN = "trace_rl.rewards.math_reward:math_verify_score"
CHOICE_SCORE_FN = "trace_rl.tasks.benchmarks:choice_letter_score"
LETTERS = "ABCD"
CHOICE_INSTRUCTION = "Answer with the letter (A, B, C or D) of the correct option."
"""Appended to a multiple-choice question after its options (the usual boxed-answer instruction follows)."""
GPQA_WRONG_KEYS = ("incorrect answer 1", "incorrect answer 2", "incorrect answer 3")
BENCH_ID_KEYS = ID_KEYS + ("record id", "problem_id")
FORMATS = ("math", "olympiad", "multiple_choice")


@dataclass
class Benchmark:
    """The problems of one benchmark file and how to score them."""

    name: str
    """Metric prefix (``eval/<name>/avg@k``): the spec's ``name=`` or the file stem."""
    path: str
    """The file."""
    format: str
    """math | olympiad | multiple_choice (see ``detect_format``)."""
    problems: list[Problem]
    """The problems in file order (``Problem.answer`` is a letter for multiple choice)."""
    stats: LoadStats
    """Rows read, loaded and skipped."""
    score_fn: str = MATH_SCORE_FN
    """The VerifierPool score function of this benchmark."""
    meta: dict[str, Any] = field(default_factory=dict)


def parse_spec(spec: str) -> tuple[str, str]:
    """``"name=path"`` or ``"name:path"`` -> (name, path) (the ``:`` form needs no quoting in a Hydra override
    list); ``"path"`` -> (its stem, or its parent directory's name when the stem is a split name such as
    ``test``; path). An existing file is always taken as a plain path."""
    spec = str(spec).strip()
    if not Path(spec).exists():
        m = re.match(r"([A-Za-z0-9_.+-]+)[=:](.+)", spec)
        if m:
            return m.group(1), m.group(2).strip()
    p = Path(spec)
    stem = p.stem
    if stem in ("test", "train", "validation", "eval") and p.parent.name:
        stem = p.parent.name
    return stem, spec


def _lower_keys(row: dict) -> dict:
    """The row with lower-case keys (AIME releases use Problem/Answer, GPQA Question/Correct Answer)."""
    out: dict = {}
    for k, v in row.items():
        out.setdefault(str(k).strip().lower(), v)
    return out


def detect_format(row: dict) -> str:
    """multiple_choice (GPQA columns), olympiad (``final_answer`` is a list) or math."""
    low = _lower_keys(row)
    if "correct answer" in low and all(k in low for k in GPQA_WRONG_KEYS):
        return "multiple_choice"
    if isinstance(low.get("final_answer"), (list, tuple)):
        return "olympiad"
    return "math"


def _strip_dollars(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s[1:-1].strip()
    return s


def _solution_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (list, tuple)):  # OlympiadBench: a list of solution texts
        parts = [v.strip() for v in value if isinstance(v, str) and v.strip()]
        return "\n\n".join(parts) or None
    return None


def _math_answer(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):  # OlympiadBench: one entry per answer of a multi-answer problem
        parts = [_answer_text(v) for v in value]
        if not parts or any(p is None for p in parts):
            return None
        return ", ".join(_strip_dollars(p) for p in parts)
    text = _answer_text(value)
    return _strip_dollars(text) if text is not None else None


def choice_options(correct: str, wrong: list[str], *, seed: int, uid: str) -> tuple[list[str], str]:
    """The four options in an order drawn from ``(seed, uid)`` alone, and the correct one's letter."""
    options = [correct, *wrong]
    order = list(range(len(options)))
    random.Random(f"trace_rl-choice:{seed}:{uid}").shuffle(order)  # str seeds hash with sha512: stable
    shuffled = [options[i] for i in order]
    return shuffled, LETTERS[order.index(0)]


def format_choice_question(question: str, options: list[str]) -> str:
    """The question, its options as ``A) ...`` lines, and ``CHOICE_INSTRUCTION``."""
    lines = [question.strip(), ""]
    lines += [f"{LETTERS[i]}) {opt.strip()}" for i, opt in enumerate(options)]
    lines += ["", CHOICE_INSTRUCTION]
    return "\n".join(lines)


def _row_to_problem(row: dict, fmt: str, *, source: str, line: int, seed: int,
                    stats: LoadStats) -> Problem | None:
    low = _lower_keys(row)
    _, id_val = _first(low, BENCH_ID_KEYS)
    uid = f"{source}/{id_val}" if id_val is not None else f"{source}/{line}"
    if fmt == "multiple_choice":
        question = _question_text(low.get("question"))
        correct = low.get("correct answer")
        wrong = [low.get(k) for k in GPQA_WRONG_KEYS]
        if question is None:
            stats.skip(line, "no question", "looked for Question")
            return None
        if not all(isinstance(v, str) and v.strip() for v in [correct, *wrong]):
            stats.skip(line, "missing option", "needs Correct Answer and Incorrect Answer 1..3")
            return None
        options, letter = choice_options(correct, wrong, seed=seed, uid=uid)
        explanation = low.get("explanation")
        return Problem(uid=uid, question=format_choice_question(question, options), answer=letter,
                       solution=explanation.strip() if isinstance(explanation, str) and explanation.strip() else None,
                       source=source, meta={"format": fmt, "options": options, "correct_text": correct.strip()})
    question = _question_text(_first(low, QUESTION_KEYS)[1])
    if question is None:
        stats.skip(line, "no question", f"looked for {', '.join(QUESTION_KEYS)}")
        return None
    solution = _solution_text(low.get("solution", low.get("reference")))
    answer = _math_answer(_first(low, ANSWER_KEYS)[1])
    if answer is None and solution is not None:
        answer = extract_boxed(solution) or None  # Minerva: the solution's last \boxed{}
        if answer is not None:
            stats.answers_from_solution += 1
    if not answer:
        stats.skip(line, "no answer", f"looked for {', '.join(ANSWER_KEYS)} and a \\boxed{{}} in the solution")
        return None
    meta = {k: v for k, v in low.items() if isinstance(v, (str, int, float, bool))
            and k in ("subject", "level", "type", "unit", "answer_type", "subfield", "year")}
    return Problem(uid=uid, question=question, answer=answer, solution=solution, source=source,
                   meta={"format": fmt, **meta})


def load_benchmark(spec: str, *, limit: int = 0, seed: int = 0) -> Benchmark:
    """Load one benchmark file: ``spec`` is ``path`` or ``name=path``; ``limit`` > 0 keeps the first that
    many problems; ``seed`` draws the multiple-choice option orders. Bad rows are skipped, counted in
    ``Benchmark.stats`` and summarised in one warning; a file without one usable row raises ValueError."""
    name, path_s = parse_spec(spec)
    path = Path(path_s)
    if not path.is_file():
        raise ValueError(f"benchmark {spec!r}: {path_s!r} is not a file; give a local .jsonl, .json or .parquet "
                         "file (eval.benchmarks=[/data/math500.jsonl,...]; nothing is downloaded)")
    suffix = path.suffix.lower()
    if suffix not in JSON_EXTENSIONS + PARQUET_EXTENSIONS:
        raise ValueError(f"benchmark {spec!r}: unknown extension {suffix!r}; convert it to .jsonl or .parquet")
    stats = LoadStats(path=str(path))
    rows = _read_parquet_rows(path, stats) if suffix in PARQUET_EXTENSIONS else _read_json_rows(path, stats)
    fmt: str | None = None
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        if not isinstance(row, dict):
            stats.skip(line, "not a JSON object", type(row).__name__)
            continue
        fmt = fmt or detect_format(row)
        p = _row_to_problem(row, fmt, source=name, line=line, seed=seed, stats=stats)
        if p is None:
            continue
        seen[p.uid] = seen.get(p.uid, 0) + 1
        if seen[p.uid] > 1:  # a repeated id: keep the row, keep uids unique
            p.uid = f"{p.uid}#{seen[p.uid] - 1}"
        problems.append(p)
        stats.loaded += 1
        if limit and len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"benchmark {spec!r}: no usable rows ({stats.summary()}); a row needs a question and an "
                         "answer (answer / final_answer / a \\boxed{} solution), or GPQA's Question, Correct Answer "
                         "and Incorrect Answer 1..3")
    if stats.skipped:
        warnings.warn(f"benchmark {name}: skipped bad rows: {stats.summary()}", stacklevel=2)
    assert fmt is not None
    return Benchmark(name=name, path=str(path), format=fmt, problems=problems, stats=stats,
                     score_fn=CHOICE_SCORE_FN if fmt == "multiple_choice" else MATH_SCORE_FN)


# ---------------------------------------------------------------------------------------------
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit)\s*\{([^{}]*)\}")
_ANSWER_LINE = re.compile(r"answer\s*(?:is|:)\s*:?\s*\(?\s*([A-D])\s*\)?(?![A-Za-z])", re.IGNORECASE)


def choice_letter(response: str) -> str | None:
    """The option letter a response chose: its last ``\\boxed{}`` reduced to a single letter A-D
    (``\\boxed{B}``, ``\\boxed{(B)}``, ``\\boxed{\\text{B}}``, ``\\boxed{B) 42}``); without a box, the last
    "answer is X" / "Answer: X". None when neither gives one letter."""
    boxed = extract_boxed(response)
    if boxed is not None:
        text = boxed
        for _ in range(3):
            text = _TEXT_WRAP.sub(r"\1", text)
        text = text.strip().strip("$").strip()
        m = re.fullmatch(r"\(?\s*([A-Da-d])\s*(?:\)|[.:])?(?:\s+.*)?", text, flags=re.DOTALL)
        if m:
            return m.group(1).upper()
        m = re.fullmatch(r"(?:option|choice)\s*\(?([A-Da-d])\)?", text, flags=re.IGNORECASE)
        return m.group(1).upper() if m else None
    found = _ANSWER_LINE.findall(response)
    return found[-1].upper() if found else None


def choice_letter_score(response: str, gold: str) -> float:
    """1.0 when the response's chosen letter (``choice_letter``) is the gold letter, else 0.0."""
    if not isinstance(response, str) or not isinstance(gold, str):
        raise TypeError("choice_letter_score(response, gold) expects two str")
    letter = choice_letter(response)
    return float(letter is not None and letter == gold.strip().strip("()").upper())
