"""The embedded task: short multi-step arithmetic word problems, with a programmatic step checker.

Built for a tiny model (a few million parameters, 512-token byte-level BPE), so texts are short and
templated. A problem is a chain ``v0 -> v1 -> ... -> vk``: a starting amount and ``k`` operations
(``+ x``, ``- x``, ``* x``) on small non-negative integers, told as a word problem::

    Ana has 7 pens. She buys 5 more. She gives 3 to Ben. She triples them. How many pens does Ana have?

The reference solution (the SFT target) has one line per operation and a boxed answer::

    Step 1: 7 + 5 = 12.
    Step 2: 12 - 3 = 9.
    Step 3: 9 * 3 = 27.
    The answer is \\boxed{27}.

Each step is ``previous result <op> the problem's number``; for ``+`` and ``*`` either operand order
is accepted (a "4 bags of 6 pens" start is written ``4 * 6``). Every intermediate value stays in
``[1, max_result]``.

A step is HARD when a person doing it mentally must carry, borrow or multiply:
``multiplication`` (both operands >= 2), ``addition with carry`` (some digit column sums to 10 or
more) or ``subtraction with borrow`` (some digit column of the subtrahend exceeds the minuend's).
A problem's ``hint`` is the kind of its first hard step, or ``"none"``.

Splits: ``train`` and ``test`` follow the same distribution (:class:`ArithSpec` defaults) and are
disjoint by construction: every chain is hashed (stable across processes and seeds) and one chain
in ``TEST_MODULUS`` belongs to ``test`` only, so no test chain appears in train under any wording
or seed. ``ood`` has longer chains and larger numbers (:data:`SPECS`).
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from trace_rl.rewards.math_reward import boxed_span, extract_boxed
from trace_rl.tasks.base import Problem

SPLITS = ("train", "test", "ood")
TEST_MODULUS = 10
"""One chain in this many (by hash) is reserved for the test split."""

ARITH_INSTRUCTION = ""
"""Instruction appended to arith prompts: nothing; the SFT stage teaches the format and the context is small."""


@dataclass(frozen=True)
class ArithSpec:
    """Knobs of the problem generator."""

    min_ops: int = 2
    """Fewest operations in a chain."""
    max_ops: int = 4
    """Most operations in a chain."""
    max_operand: int = 19
    """Largest starting amount and largest number added or subtracted."""
    min_start: int = 2
    """Smallest starting amount (ood starts above train's max_operand, so no ood chain is a train chain)."""
    max_factor: int = 9
    """Largest multiplier."""
    max_result: int = 199
    """Every intermediate value stays <= this (and >= 1)."""
    groups_start_prob: float = 0.3
    """Chance that a chain starting with a multiplication is told as 'a bags of b'."""
    word_factor_prob: float = 0.5
    """Chance that '* 2' / '* 3' is told as 'doubles' / 'triples' rather than 'N times as many'."""

    def validate(self) -> None:
        """Raise ValueError naming the field that cannot produce problems."""
        if self.min_ops < 1 or self.max_ops < self.min_ops:
            raise ValueError(f"ArithSpec.min_ops={self.min_ops}, max_ops={self.max_ops}: need 1 <= min_ops <= max_ops")
        if self.max_operand < 2:
            raise ValueError(f"ArithSpec.max_operand={self.max_operand} must be >= 2")
        if not 2 <= self.min_start <= self.max_operand:
            raise ValueError(f"ArithSpec.min_start={self.min_start} must be in [2, max_operand={self.max_operand}]")
        if self.max_factor < 2:
            raise ValueError(f"ArithSpec.max_factor={self.max_factor} must be >= 2")
        if self.max_result < max(2 * 2, self.max_operand):
            raise ValueError(f"ArithSpec.max_result={self.max_result} must be >= max(4, max_operand)")
        for name in ("groups_start_prob", "word_factor_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ArithSpec.{name}={getattr(self, name)} must be in [0, 1]")


SPECS: dict[str, ArithSpec] = {
    "train": ArithSpec(),
    "test": ArithSpec(),
    # Larger numbers than train ever shows (start 20-49, values up to 499), chains of 3-4 operations:
    # a tiny model does not extrapolate to longer chains at all (5+ operations: ~1%), so the
    # out-of-distribution stand-in is about magnitudes.
    "ood": ArithSpec(min_ops=3, max_ops=4, max_operand=49, min_start=20, max_result=499),
}

_PEOPLE = (("Ana", "she", "her"), ("Ben", "he", "him"), ("Mia", "she", "her"), ("Sam", "he", "him"),
           ("Zoe", "she", "her"), ("Leo", "he", "him"), ("Ivy", "she", "her"), ("Max", "he", "him"),
           ("Eva", "she", "her"), ("Tom", "he", "him"))
_OBJECTS = ("apples", "pens", "cards", "coins", "marbles", "stickers", "books", "eggs", "shells", "stamps")
_CONTAINERS = ("bags", "boxes", "jars", "packs")


# ---------------------------------------------------------------------------------- arithmetic
def apply_op(a: int, op: str, b: int) -> int:
    """``a op b`` for op in ``+ - *``."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operation {op!r}; expected '+', '-' or '*'")


def step_kind(a: int, op: str, b: int) -> str | None:
    """The kind of a hard step (see the module docstring), or None if the step is easy."""
    if op == "*":
        return "multiplication" if min(a, b) >= 2 else None
    if op == "+":
        while a or b:
            if a % 10 + b % 10 >= 10:
                return "addition with carry"
            a, b = a // 10, b // 10
        return None
    if op == "-":
        if a < b:
            return "subtraction with borrow"
        while b:
            if a % 10 < b % 10:
                return "subtraction with borrow"
            a, b = a // 10, b // 10
        return None
    raise ValueError(f"unknown operation {op!r}; expected '+', '-' or '*'")


@dataclass(frozen=True)
class Chain:
    """A starting amount and a list of ``(op, number)`` operations."""

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def values(self) -> list[int]:
        """``[v0, v1, ..., vk]``: the amount after each operation."""
        vals = [self.start]
        for op, x in self.ops:
            vals.append(apply_op(vals[-1], op, x))
        return vals

    def signature(self) -> str:
        """Canonical text of the chain (wording-independent), e.g. ``"7+5-3*3"``."""
        return f"{self.start}" + "".join(f"{op}{x}" for op, x in self.ops)

    def bucket(self) -> int:
        """Stable hash bucket in ``[0, TEST_MODULUS)`` (hashlib: independent of PYTHONHASHSEED)."""
        digest = hashlib.blake2b(self.signature().encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % TEST_MODULUS

    def hint(self) -> str:
        """Kind of the first hard step (see :func:`step_kind`), or ``"none"``."""
        vals = self.values
        for (op, x), a in zip(self.ops, vals):
            kind = step_kind(a, op, x)
            if kind:
                return kind
        return "none"


def _sample_chain(rng: random.Random, spec: ArithSpec) -> Chain:
    k = rng.randint(spec.min_ops, spec.max_ops)
    value = rng.randint(spec.min_start, spec.max_operand)
    start, ops = value, []
    for _ in range(k):
        choices = []
        if value + 1 <= spec.max_result:
            choices.append("+")
        if value >= 2:
            choices.append("-")
        if value * 2 <= spec.max_result:
            choices.append("*")
        op = rng.choice(choices)
        if op == "+":
            x = rng.randint(1, min(spec.max_operand, spec.max_result - value))
        elif op == "-":
            x = rng.randint(1, min(spec.max_operand, value - 1))
        else:
            x = rng.randint(2, min(spec.max_factor, spec.max_result // value))
        ops.append((op, x))
        value = apply_op(value, op, x)
    return Chain(start, tuple(ops))


# ---------------------------------------------------------------------------------- text
def _question(chain: Chain, rng: random.Random, spec: ArithSpec) -> tuple[str, bool]:
    """The word problem for ``chain``; also whether it starts with 'a bags of b'."""
    name, subj, obj_pron = rng.choice(_PEOPLE)
    other = rng.choice([p[0] for p in _PEOPLE if p[0] != name])
    thing = rng.choice(_OBJECTS)
    Subj = subj.capitalize()
    ops = list(chain.ops)
    groups = ops[0][0] == "*" and rng.random() < spec.groups_start_prob
    if groups:
        sentences = [f"{name} has {chain.start} {rng.choice(_CONTAINERS)} of {ops[0][1]} {thing}."]
        ops = ops[1:]
    else:
        sentences = [f"{name} has {chain.start} {thing}."]
    for op, x in ops:
        if op == "+":
            s = rng.choice((f"{Subj} buys {x} more.", f"{Subj} finds {x} more.", f"{other} gives {obj_pron} {x} more."))
        elif op == "-":
            s = rng.choice((f"{Subj} gives {x} to {other}.", f"{Subj} loses {x}.", f"{Subj} sells {x}."))
        elif x in (2, 3) and rng.random() < spec.word_factor_prob:
            s = f"{Subj} {'doubles' if x == 2 else 'triples'} them."
        else:
            s = f"Now {subj} has {x} times as many."
        sentences.append(s)
    sentences.append(f"How many {thing} does {name} have?")
    return " ".join(sentences), groups


def format_step(i: int, a: int, op: str, b: int, c: int) -> str:
    """One solution line: ``Step i: a op b = c.``"""
    return f"Step {i}: {a} {op} {b} = {c}."


def reference_solution(chain: Chain) -> str:
    """The step-by-step solution of ``chain``, ending in ``The answer is \\boxed{v_k}.``"""
    vals = chain.values
    lines = [format_step(i + 1, vals[i], op, x, vals[i + 1]) for i, (op, x) in enumerate(chain.ops)]
    lines.append(f"The answer is \\boxed{{{vals[-1]}}}.")
    return "\n".join(lines)


def generate(split: str, n: int, seed: int = 0, spec: ArithSpec | None = None) -> list[Problem]:
    """``n`` distinct problems of ``split`` ("train", "test" or "ood"), deterministic in ``seed``.

    ``spec`` overrides the split's default :data:`SPECS` entry. Uses its own ``random.Random``
    (never the global RNG). train/test keep their hash buckets whatever the spec, so they stay
    disjoint; ood is not bucketed (its default spec starts above any train chain).
    """
    if split not in SPLITS:
        raise ValueError(f"arith split {split!r} is unknown; use one of {', '.join(SPLITS)}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"generate(n={n!r}): n must be an int >= 0")
    spec = spec or SPECS[split]
    spec.validate()
    rng = random.Random(f"trace_rl.arith/{split}/{seed}")
    seen: set[str] = set()
    problems: list[Problem] = []
    attempts, max_attempts = 0, 100 * n + 1000
    while len(problems) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"could only make {len(problems)} distinct {split!r} problems of the {n} asked "
                             f"with {spec}; ask for fewer or widen the spec (more ops, larger numbers)")
        chain = _sample_chain(rng, spec)
        sig = chain.signature()
        if sig in seen:
            continue
        if split == "train" and chain.bucket() == 0 or split == "test" and chain.bucket() != 0:
            continue
        seen.add(sig)
        question, groups = _question(chain, rng, spec)
        problems.append(Problem(
            uid=f"arith/{split}/{seed}/{len(problems)}",
            question=question,
            answer=str(chain.values[-1]),
            solution=reference_solution(chain),
            hint=chain.hint(),
            source=f"arith:{split}",
            meta={"start": chain.start, "ops": [list(o) for o in chain.ops], "values": chain.values,
                  "groups_start": groups},
        ))
    return problems


def chain_of(problem: Problem) -> Chain:
    """The operation chain stored in an arith problem's ``meta``."""
    meta = problem.meta or {}
    if "start" not in meta or "ops" not in meta:
        raise ValueError(f"problem {problem.uid!r} has no arith chain in meta (needs 'start' and 'ops'); "
                         "the step checker only works on problems from trace_rl.tasks.arith.generate()")
    return Chain(int(meta["start"]), tuple((str(op), int(x)) for op, x in meta["ops"]))


# ---------------------------------------------------------------------------------- step checker
@dataclass
class StepReport:
    """What :func:`check_steps` found in a response. Spans are ``(start, end)`` offsets: ``response[start:end]``."""

    steps: list[tuple[int, int]]
    """Span of each step ("Step i: ...") in order, including malformed ones."""
    first_error_step: int | None
    """0-based index into ``steps`` of the first wrong step; ``len(steps)`` when every step is right
    but the response goes wrong after them (missing steps, wrong or missing final answer); None if no error."""
    first_error_span: tuple[int, int] | None
    """Span of the first error (the step, or the text after the last step); None if no error."""
    key_step_spans: list[tuple[int, int]]
    """For a fully correct response: spans of its hard steps, else of its last step (else of its answer);
    empty otherwise."""
    final_correct: bool
    """The last boxed answer equals the problem's answer."""
    error_kind: str | None = None
    """malformed | extra_step | operands | arithmetic | no_steps | missing_steps | final_answer | None."""
    answer_span: tuple[int, int] | None = None
    """Span of the final answer text (the line holding the last box), if any."""


_STEP_HEAD = re.compile(r"step\s*\d+", re.IGNORECASE)
_STEP = re.compile(r"step\s*\d+\s*:\s*(\d+)\s*([-+*x×])\s*(\d+)\s*=\s*(\d+)(?!\.?\d)(?:\s*\.)?", re.IGNORECASE)
_OP_ALIASES = {"x": "*", "X": "*", "×": "*"}


def _units(response: str):
    """Non-empty pieces of the response, in order: ``(start, end, parsed_step_or_None, is_step)``.

    A line starting with "Step <n>" is a step (parsed into ``(a, op, b, c)`` when it has the
    expected form); text after a well-formed step on the same line is a separate, non-step unit.
    """
    pos = 0
    for line in response.split("\n"):
        start, end = pos, pos + len(line)
        pos = end + 1
        s = start + (len(line) - len(line.lstrip()))
        e = start + len(line.rstrip())
        if s >= e:
            continue
        text = response[s:e]
        if not _STEP_HEAD.match(text):
            yield s, e, None, False
            continue
        m = _STEP.match(text)
        if m is None:
            yield s, e, None, True
            continue
        a, op, b, c = int(m.group(1)), _OP_ALIASES.get(m.group(2), m.group(2)), int(m.group(3)), int(m.group(4))
        yield s, s + m.end(), (a, op, b, c), True
        rest = text[m.end():]
        if rest.strip():
            rs = s + m.end() + (len(rest) - len(rest.lstrip()))
            yield rs, e, None, False


def _as_int(text: str | None) -> int | None:
    if text is None:
        return None
    t = re.sub(r"[\s,]", "", text).rstrip(".")
    return int(t) if re.fullmatch(r"-?\d+", t) else None


def check_steps(problem: Problem, response: str) -> StepReport:
    """Check ``response`` step by step against ``problem``'s chain (an arith problem).

    Step ``i`` (0-based) is wrong when it is malformed, when there is no operation ``i`` in the
    chain (extra step), when its operation or operands differ from ``(v_i op x_i)`` (``x_i op v_i``
    is accepted for ``+`` and ``*``), or when its arithmetic is wrong. If every step is right but the
    final answer is wrong or missing, the error is at index ``len(steps)`` and its span is the first
    text after the last step (usually the answer line), or the last step itself when nothing
    follows (a truncated response). In particular a response with NO step lines and a wrong answer
    gets ``first_error_step == 0`` and the span of its first non-empty line ((0, 0) if it is empty).
    A response whose answer is right but that skips steps (e.g. only the boxed answer) is not an
    error. ``key_step_spans`` is filled only for fully correct responses.
    """
    if not isinstance(response, str):
        raise TypeError(f"check_steps(response=...) expects a str, got {type(response).__name__}")
    chain = chain_of(problem)
    values = chain.values
    units = list(_units(response))
    steps = [(s, e, parsed) for s, e, parsed, is_step in units if is_step]
    spans = [(s, e) for s, e, _ in steps]

    box = boxed_span(response)
    answer_span = None
    if box is not None:
        for s, e, _, is_step in units:
            if s <= box[0] < e and not is_step:
                answer_span = (s, e)
    final_correct = _as_int(extract_boxed(response)) == int(problem.answer)

    error: tuple[int, tuple[int, int], str] | None = None
    for i, (s, e, parsed) in enumerate(steps):
        if parsed is None:
            error = (i, (s, e), "malformed")
        elif i >= len(chain.ops):
            error = (i, (s, e), "extra_step")
        else:
            a, op, b, c = parsed
            want_op, x = chain.ops[i]
            prev = values[i]
            follows = op == want_op and ((a, b) == (prev, x) or (op in "+*" and (a, b) == (x, prev)))
            if not follows:
                error = (i, (s, e), "operands")
            elif apply_op(a, op, b) != c:
                error = (i, (s, e), "arithmetic")
        if error:
            break
    if error is None and not final_correct:
        last_end = steps[-1][1] if steps else -1
        after = [(s, e) for s, e, _, _ in units if s >= last_end]
        if after:
            span = after[0]
        elif steps:
            span = spans[-1]
        else:
            span = (0, 0)
        kind = "no_steps" if not steps else ("missing_steps" if len(steps) < len(chain.ops) else "final_answer")
        error = (len(steps), span, kind)

    key: list[tuple[int, int]] = []
    if error is None:
        key = [(s, e) for s, e, (a, op, b, _) in steps if step_kind(a, op, b)]
        if not key:
            key = [spans[-1]] if spans else ([answer_span] if answer_span else [])
    return StepReport(
        steps=spans,
        first_error_step=error[0] if error else None,
        first_error_span=error[1] if error else None,
        key_step_spans=key,
        final_correct=final_correct,
        error_kind=error[2] if error else None,
        answer_span=answer_span,
    )
