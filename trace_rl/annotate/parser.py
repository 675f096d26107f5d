"""Parse an annotator's reply into segment ids and a coarse type label: strict and tolerant at once.

The annotator is asked for one JSON object::

    {"key": [2, 3], "error": [], "label": "arithmetic"}

``key``: segment ids of the key steps (used for a correct response), ``error``: segment ids of the
first error (used for an incorrect one), ``label``: a few words naming the kind of step or error.
Real replies, from API models and even more from small local ones, are messier. The rules:

1. A reasoning block (``<think>...</think>``, or everything up to a lone ``</think>``) is removed
   first; a reply without any text afterwards is a failure (``empty``). An unclosed ``<think>`` is
   only dropped as a tag: the answer may be inside.
2. JSON is looked for in ```` ```json ```` fences first, then in every balanced ``{...}`` of the
   text (prose around it is ignored); the LAST object that has a known field wins (models restate
   the example before answering). A top-level JSON list (``[2, 3]``) is taken as the ids asked for.
3. Almost-JSON is repaired before giving up: single quotes, trailing commas, unquoted keys,
   Python's ``True/False/None``, and an object cut off at the end of the reply (``max_tokens``) is
   closed (its ids are kept, its label is dropped: it may be cut mid-word).
4. No JSON at all: ``key: 2, 3`` / ``error = [4]`` / ``label: carry`` lines are read (the field name,
   then ``:`` or ``=``, then the ids).
5. Field names are matched case-insensitively with a few aliases (``key_steps``, ``errors``,
   ``first_error``, ``type`` ...); a bare ``segments`` / ``ids`` / ``steps`` list counts as the field
   asked for when that field is missing.
6. An id may be an integer (``3``, ``3.0``), a string (``"3"``, ``"[3]"``, ``"step 3"``), a range
   (``"2-4"``, ``"2..4"``, ``"2 to 4"``, ``[2, 4]`` inside a list) or a comma-separated string.
   Ids outside ``1..n_segments`` are dropped and counted (``unknown_ids``); booleans, negative
   numbers and other junk are dropped and counted too. Ranges longer than ``n_segments`` are junk.
7. The label is sanitised for the teacher firewall (``trace_rl.teacher.prompts``): lower-cased,
   whitespace collapsed, surrounding quotes/punctuation stripped; it must then be letters, spaces,
   ``_`` and ``-`` only, at most ``MAX_LABEL_WORDS`` words and ``MAX_LABEL_CHARS`` characters, and
   (8+ characters) not occur in the response. Otherwise it is dropped (``label_dropped``), never an
   error.

Whatever cannot be read gives no ids and a ``failure`` reason; the caller turns that into an
annotation with ``skipped="parse_failure"`` (counted as ``annotate/parse_failures``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MAX_LABEL_CHARS = 40
"""Same bound as the teacher firewall (``trace_rl.teacher.prompts.MAX_LABEL_CHARS``)."""
MAX_LABEL_WORDS = 5
_LABEL = re.compile(r"[a-z][a-z _-]*")

_FIELDS = {
    "key": ("key", "keys", "key_steps", "key_step", "key_segments", "key_ids", "critical", "critical_steps"),
    "error": ("error", "errors", "error_steps", "error_step", "error_segments", "error_ids", "first_error",
              "mistake", "mistakes", "wrong"),
    "label": ("label", "type", "kind", "category", "error_type", "step_type"),
}
_GENERIC = ("segments", "segment", "ids", "steps", "spans", "answer")
_ALIAS = {alias: name for name, aliases in _FIELDS.items() for alias in aliases}

_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_RANGE = re.compile(r"^\s*(?:\[)?\s*(?:steps?|segments?|#)?\s*(\d+)\s*(?:-|–|—|\.\.|to)\s*(?:steps?|segments?|#)?\s*(\d+)\s*(?:\])?\s*$",
                    re.I)
_SINGLE = re.compile(r"^\s*(?:\[)?\s*(?:steps?|segments?|#)?\s*(\d+)\s*(?:\])?\s*\.?\s*$", re.I)
_LOOSE_FIELD = re.compile(
    r"(?im)^[\s>*\-\"']*(key(?:[ _]steps?|[ _]segments?)?|errors?(?:[ _]steps?|[ _]segments?)?|first[ _]error"
    r"|label|type)[\"'*\s]*[:=]\s*(.+?)\s*$")


@dataclass
class ParsedReply:
    """What was read from one reply."""

    key: list[int] = field(default_factory=list)
    """Valid key segment ids (sorted, unique)."""
    error: list[int] = field(default_factory=list)
    """Valid error segment ids (sorted, unique)."""
    label: str | None = None
    """Sanitised label, or None."""
    failure: str | None = None
    """Why nothing could be read: ``empty``, ``no_json``, ``bad_json``, ``no_fields``; None when parsed."""
    unknown_ids: int = 0
    """Ids dropped: outside 1..n_segments, or not a number."""
    label_dropped: bool = False
    """A label was given but refused by the sanitiser."""
    had_field: dict[str, bool] = field(default_factory=dict)
    """Which of ``key`` / ``error`` the reply named (even with an empty list)."""

    def ids_for(self, correct: bool) -> list[int]:
        """The ids that matter for a response: key steps of a correct one, error steps of an incorrect one."""
        return self.key if correct else self.error


# ----------------------------------------------------------------------------------- JSON finding
def _balanced_objects(text: str) -> list[str]:
    """Every top-level balanced ``{...}`` substring (braces inside JSON strings are ignored)."""
    out, depth, start, in_str, quote, esc = [], 0, -1, False, "", False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                in_str = False
            continue
        if ch in "\"'" and depth > 0:
            # a quote only opens a string inside an object; an apostrophe in prose ("it's") must not
            if ch == "'" and i > 0 and text[i - 1].isalnum() and i + 1 < len(text) and text[i + 1].isalnum():
                continue
            in_str, quote = True, ch
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                out.append(text[start:i + 1])
    return out


def _close_truncated(s: str) -> str | None:
    """``s`` (from its first ``{``) with the brackets and string it leaves open closed: a reply cut off
    by ``max_tokens`` still says what it said so far. None when nothing is open."""
    stack, in_str, esc = [], False, False
    for ch in s:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    if not stack:
        return None
    s = s + '"' if in_str else s
    s = re.sub(r"[,:]\s*$", "", s.rstrip())
    return s + "".join(reversed(stack))


def _repair(s: str) -> str:
    """Common near-JSON fixes: Python literals, single quotes, unquoted keys, trailing commas."""
    s = re.sub(r"\bTrue\b", "true", s)
    s = re.sub(r"\bFalse\b", "false", s)
    s = re.sub(r"\bNone\b", "null", s)
    if '"' not in s:
        s = s.replace("'", '"')
    else:
        s = re.sub(r"'([^'\"\n]*)'", r'"\1"', s)
    s = re.sub(r"([{,]\s*)([A-Za-z_][A-Za-z0-9_ ]*?)\s*:", r'\1"\2":', s)
    s = re.sub(r",\s*([}\]])", r"\1", s)
    return s


def _loads(s: str) -> Any:
    try:
        return json.loads(s)
    except (ValueError, RecursionError):
        pass
    try:
        return json.loads(_repair(s))
    except (ValueError, RecursionError):
        return None


def _normalise_keys(obj: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        name = re.sub(r"[\s-]+", "_", str(k).strip().lower())
        if name in _ALIAS:
            out.setdefault(_ALIAS[name], v)
        elif name in _GENERIC:
            out.setdefault("generic", v)
    return out


def _find_fields(text: str) -> tuple[dict[str, Any] | None, str]:
    """The fields of the reply's answer object, or ``(None, reason)``."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)]
    candidates += _balanced_objects(text)
    if not candidates and "{" in text:
        closed = _close_truncated(text[text.index("{"):])
        if closed is not None:
            obj = _loads(closed)
            fields = _normalise_keys(obj) if isinstance(obj, dict) else {}
            if fields:
                # ids read so far are whole numbers; a label cut off mid-word is not trusted
                if "label" in fields:
                    fields["label_truncated"] = fields.pop("label")
                return fields, ""
    saw_json = False
    best: dict[str, Any] | None = None
    for cand in candidates:
        obj = _loads(cand.strip())
        if isinstance(obj, dict):
            saw_json = True
            fields = _normalise_keys(obj)
            if fields:
                best = fields  # the last object with a known field wins
        elif isinstance(obj, list):
            saw_json = True
            best = {"generic": obj} if best is None else best
    if best is not None:
        return best, ""
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        obj = _loads(stripped)
        if isinstance(obj, list):
            return {"generic": obj}, ""
    loose: dict[str, Any] = {}
    for m in _LOOSE_FIELD.finditer(text):
        name = re.sub(r"[\s-]+", "_", m.group(1).lower())
        name = "key" if name.startswith("key") else "label" if name in ("label", "type") else "error"
        loose.setdefault(name, m.group(2).strip().rstrip(",;"))
    if loose:
        return loose, ""
    if saw_json:
        return None, "no_fields"
    unclosed = "{" in text and _close_truncated(text[text.index("{"):]) is not None
    if unclosed or any(":" in c for c in candidates):  # something that meant to be an object
        return None, "bad_json"
    return None, "no_json"


# ----------------------------------------------------------------------------------- values
def _ids(value: Any, n_segments: int) -> tuple[set[int], int, bool]:
    """(valid ids, number dropped, whether anything was given) of one field's value."""
    good: set[int] = set()
    bad = 0

    def add(i: int) -> None:
        nonlocal bad
        if 1 <= i <= n_segments:
            good.add(i)
        else:
            bad += 1

    def visit(v: Any, top: bool) -> None:
        nonlocal bad
        if v is None:
            return
        if isinstance(v, bool):
            bad += 1
        elif isinstance(v, int):
            add(v)
        elif isinstance(v, float):
            if v.is_integer():
                add(int(v))
            else:
                bad += 1
        elif isinstance(v, str):
            text = v.strip()
            if not text or text.lower() in ("none", "null", "n/a", "[]"):
                return
            parts = [p for p in re.split(r"[,;]|\band\b", text.strip("[]()")) if p.strip()]
            for part in parts:
                r = _RANGE.match(part)
                if r:
                    a, b = int(r.group(1)), int(r.group(2))
                    if a > b:
                        a, b = b, a
                    if b - a >= max(n_segments, 1):
                        bad += 1
                        continue
                    for i in range(a, b + 1):
                        add(i)
                    continue
                s = _SINGLE.match(part)
                if s:
                    add(int(s.group(1)))
                else:
                    bad += 1
        elif isinstance(v, (list, tuple)):
            # a two-int list nested inside a list is a range: [[2, 4], 7]
            if not top and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                visit(f"{v[0]}-{v[1]}", False)
                return
            for x in v:
                visit(x, False)
        elif isinstance(v, dict):
            for key in ("id", "segment", "step", "ids", "segments"):
                if key in v:
                    visit(v[key], False)
                    return
            bad += 1
        else:
            bad += 1

    visit(value, True)
    given = value not in (None, "", [], ())
    return good, bad, given


def sanitize_label(label: Any, response: str = "") -> str | None:
    """The label as the teacher may see it, or None (see rule 7 of the module doc)."""
    if not isinstance(label, str):
        return None
    text = " ".join(label.split()).lower().strip(" \"'`.,;:!?()[]{}*")
    if not text or len(text) > MAX_LABEL_CHARS or not _LABEL.fullmatch(text):
        return None
    if len(text.split()) > MAX_LABEL_WORDS:
        return None
    if len(text) >= 8 and text in response.lower():
        return None
    return text


def parse_reply(reply: str | None, n_segments: int, *, correct: bool, response: str = "") -> ParsedReply:
    """Read ``reply`` (see the module doc). ``correct`` picks which field a bare list of ids fills;
    ``response`` is only used to refuse a label copied from it. Never raises."""
    out = ParsedReply()
    text = _THINK.sub("", reply if isinstance(reply, str) else "")
    # a chat template that opens the reasoning block in the prompt leaves only its closing tag
    if re.search(r"</think>", text, re.I):
        text = re.split(r"</think>", text, flags=re.I)[-1]
    text = re.sub(r"<think>", "", text, flags=re.I).strip()
    if not text:
        out.failure = "empty"
        return out
    fields, reason = _find_fields(text)
    if fields is None:
        out.failure = reason
        return out
    role = "key" if correct else "error"
    if "generic" in fields and role not in fields:
        fields[role] = fields["generic"]
    any_given = False
    for name in ("key", "error"):
        if name not in fields:
            continue
        good, bad, given = _ids(fields[name], n_segments)
        setattr(out, name, sorted(good))
        out.unknown_ids += bad
        out.had_field[name] = True
        any_given = any_given or given
    if fields.get("label_truncated") not in (None, ""):
        out.label_dropped = True
    if "label" in fields and fields["label"] not in (None, ""):
        out.label = sanitize_label(fields["label"], response)
        out.label_dropped = out.label is None
    if not out.had_field and out.label is None:
        out.failure = "no_fields"
    return out
