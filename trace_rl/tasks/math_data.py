"""Real math problems from local files: JSON lines (``.jsonl`` / ``.json``) and Parquet.

Columns are recognised in the common schemas (first match wins, per row):

* question: ``problem``, ``question``, ``prompt`` (a string, or a list of chat messages whose last
  user turn is the question, as in verl-style Parquet files);
* answer: ``answer``, ``final_answer``, ``ground_truth``, ``gt``, ``reward_model.ground_truth``;
  when there is none, the last ``\\boxed{}`` of the solution; an answer that is itself boxed is unboxed;
* solution: ``solution``, ``reference``;
* optional: ``hint``; an id in ``uid``, ``id``, ``unique_id``, ``idx``. Other scalar columns go to ``meta``.

Explicit keys (dotted for nested objects: ``reward_model.ground_truth``) override the detection.
Bad rows are skipped and counted in :class:`LoadStats`, and one warning summarises them; a missing
file, an unknown extension or a file without a single usable row raises ValueError.
"""
from __future__ import annotations

import collections
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from trace_rl.rewards.math_reward import extract_boxed
from trace_rl.tasks.base import Problem

QUESTION_KEYS = ("problem", "question", "prompt")
ANSWER_KEYS = ("answer", "final_answer", "ground_truth", "gt", "reward_model.ground_truth")
SOLUTION_KEYS = ("solution", "reference")
ID_KEYS = ("uid", "id", "unique_id", "idx")
JSON_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)
MAX_EXAMPLES = 5
"""How many bad rows are kept (line number and reason) in LoadStats.examples."""


@dataclass
class LoadStats:
    """What happened to the rows of a file."""

    path: str
    rows: int = 0
    """Rows read (blank lines excluded)."""
    loaded: int = 0
    """Rows turned into problems."""
    skipped: int = 0
    """Rows skipped as bad."""
    reasons: dict[str, int] = field(default_factory=dict)
    """Skipped rows per reason."""
    examples: list[tuple[int, str]] = field(default_factory=list)
    """The first few bad rows: (line number, 1-based; row number for Parquet), reason."""
    answers_from_solution: int = 0
    """Loaded rows whose answer came from the solution's \\boxed{}."""

    def skip(self, line: int, reason: str, detail: str = "") -> None:
        """Count row ``line`` as skipped for ``reason`` (a short category; ``detail`` goes to the examples)."""
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((line, f"{reason} ({detail})" if detail else reason))

    def summary(self) -> str:
        """One line: loaded/skipped counts, reasons and example lines."""
        ex = "; ".join(f"line {n}: {r}" for n, r in self.examples)
        return (f"{self.path}: loaded {self.loaded} of {self.rows} rows, skipped {self.skipped} "
                f"({', '.join(f'{k}: {v}' for k, v in self.reasons.items())}); e.g. {ex}")


def _get(row: dict, key: str) -> Any:
    """``row[key]``, following dots into nested objects; None when absent."""
    cur: Any = row
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _first(row: dict, keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for k in keys:
        v = _get(row, k)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return k, v
    return None, None


def _question_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (list, tuple)):  # chat messages: the last user turn
        for msg in reversed(list(value)):
            if isinstance(msg, dict) and msg.get("role") == "user" and isinstance(msg.get("content"), str):
                return msg["content"].strip() or None
    return None


def _answer_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return _answer_text(value[0])
    if isinstance(value, str):
        text = value.strip()
        if "\\boxed" in text or "\\fbox" in text:
            text = extract_boxed(text) or ""
        return text or None
    return None


def _read_json_rows(path: Path, stats: LoadStats) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):  # a JSON array, not JSON lines
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); fix the file or convert it to JSON lines") from e
        for i, row in enumerate(rows, start=1):
            stats.rows += 1
            yield i, row
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        stats.rows += 1
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            stats.skip(i, "unparsable JSON", e.msg)


def _read_parquet_rows(path: Path, stats: LoadStats) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise ValueError(f"{path}: not a readable Parquet file ({e}); re-export it with pyarrow/pandas") from e
    n = 0
    for batch in pfile.iter_batches(batch_size=1024):  # batches: a large file is never held whole
        for row in batch.to_pylist():
            n += 1
            stats.rows += 1
            yield n, row


def load_problems(path: str | Path, *, question_key: str | None = None, answer_key: str | None = None,
                  solution_key: str | None = None, limit: int | None = None,
                  source: str | None = None) -> tuple[list[Problem], LoadStats]:
    """Problems from a ``.jsonl``/``.json`` (JSON lines, or one JSON array) or ``.parquet`` file.

    ``*_key`` name the columns (dotted for nested objects) instead of the detection described in the
    module docstring. ``limit`` stops after that many problems. ``source`` labels the problems
    (default: the file name without extension). Bad rows are skipped, counted in the returned
    :class:`LoadStats` and summarised in one warning.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"load_problems: {str(path)!r} is not a file; give the path of a local .jsonl, .json "
                         "or .parquet file (nothing is downloaded)")
    suffix = p.suffix.lower()
    if suffix not in JSON_EXTENSIONS + PARQUET_EXTENSIONS:
        raise ValueError(f"load_problems: {str(path)!r} has an unknown extension {suffix!r}; "
                         "convert it to .jsonl (one JSON object per line) or .parquet")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"load_problems(limit={limit!r}): use a positive int or None for all rows")
    source = source if source is not None else p.stem
    stats = LoadStats(path=str(p))
    rows = _read_parquet_rows(p, stats) if suffix in PARQUET_EXTENSIONS else _read_json_rows(p, stats)
    q_keys = (question_key,) if question_key else QUESTION_KEYS
    a_keys = (answer_key,) if answer_key else ANSWER_KEYS
    s_keys = (solution_key,) if solution_key else SOLUTION_KEYS
    problems: list[Problem] = []
    uids: collections.Counter[str] = collections.Counter()
    for line, row in rows:
        if not isinstance(row, dict):
            stats.skip(line, "not a JSON object", type(row).__name__)
            continue
        q_key, q_val = _first(row, q_keys)
        question = _question_text(q_val)
        if question is None:
            stats.skip(line, "no question", f"looked for {', '.join(q_keys)}")
            continue
        s_key, s_val = _first(row, s_keys)
        solution = s_val.strip() if isinstance(s_val, str) else None
        a_key, a_val = _first(row, a_keys)
        answer = _answer_text(a_val)
        if answer is None and solution is not None:
            answer = extract_boxed(solution) or None
            if answer is not None:
                stats.answers_from_solution += 1
        if answer is None:
            stats.skip(line, "no answer", f"looked for {', '.join(a_keys)} and a \\boxed{{}} in the solution")
            continue
        _, id_val = _first(row, ID_KEYS)
        uid = f"{source}/{id_val}" if id_val is not None else f"{source}/{line}"
        uids[uid] += 1
        if uids[uid] > 1:  # a repeated id: keep the row, keep uids unique
            uid = f"{uid}#{uids[uid] - 1}"
        used = {k.split(".")[0] for k in q_keys + a_keys + s_keys + ID_KEYS + ("hint",)}
        meta = {k: v for k, v in row.items() if k not in used and isinstance(v, (str, int, float, bool))}
        hint = row.get("hint")
        problems.append(Problem(uid=uid, question=question, answer=answer, solution=solution,
                                hint=hint if isinstance(hint, str) and hint.strip() else None,
                                source=source, meta=meta))
        stats.loaded += 1
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"load_problems: no usable rows in {str(path)!r} ({stats.summary()}); a row needs a "
                         f"question ({', '.join(q_keys)}) and an answer ({', '.join(a_keys)} or a \\boxed{{}} "
                         "solution): pass question_key=/answer_key= if the columns have other names")
    if stats.skipped:
        warnings.warn(f"load_problems skipped bad rows: {stats.summary()}", stacklevel=2)
    return problems, stats
