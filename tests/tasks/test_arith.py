"""Tests of trace_rl/tasks/arith.py: the generator, its splits, and the step checker."""
from __future__ import annotations

import random
import re

import pytest

from trace_rl.tasks.arith import (SPECS, TEST_MODULUS, ArithSpec, check_steps, chain_of, generate,
                                  step_kind)
from trace_rl.tasks.base import Problem


# ------------------------------------------------------------------ independent references
def naive_chain_from_text(question: str) -> tuple[int, list[tuple[str, int]]]:
    """Read the chain back from the WORDS of the question (independent of the generator's meta)."""
    sentences = re.findall(r"[^.?]+[.?]", question)
    first = sentences[0].strip()
    ops: list[tuple[str, int]] = []
    m = re.fullmatch(r"\w+ has (\d+) \w+ of (\d+) \w+\.", first)
    if m:
        start = int(m.group(1))
        ops.append(("*", int(m.group(2))))
    else:
        m = re.fullmatch(r"\w+ has (\d+) \w+\.", first)
        assert m, first
        start = int(m.group(1))
    for s in sentences[1:-1]:
        s = s.strip()
        if m := re.fullmatch(r"\w+ (?:buys|finds) (\d+) more\.", s):
            ops.append(("+", int(m.group(1))))
        elif m := re.fullmatch(r"\w+ gives (?:her|him) (\d+) more\.", s):
            ops.append(("+", int(m.group(1))))
        elif m := re.fullmatch(r"\w+ gives (\d+) to \w+\.", s):
            ops.append(("-", int(m.group(1))))
        elif m := re.fullmatch(r"\w+ (?:loses|sells) (\d+)\.", s):
            ops.append(("-", int(m.group(1))))
        elif re.fullmatch(r"\w+ doubles them\.", s):
            ops.append(("*", 2))
        elif re.fullmatch(r"\w+ triples them\.", s):
            ops.append(("*", 3))
        elif m := re.fullmatch(r"Now \w+ has (\d+) times as many\.", s):
            ops.append(("*", int(m.group(1))))
        else:
            raise AssertionError(f"unrecognised sentence {s!r}")
    assert sentences[-1].strip().startswith("How many")
    return start, ops


def naive_eval(start: int, ops: list[tuple[str, int]]) -> list[int]:
    values = [start]
    for op, x in ops:
        v = values[-1]
        if op == "+":
            v = v + x
        elif op == "-":
            v = v - x
        else:
            total = 0
            for _ in range(x):  # multiplication as repeated addition
                total += v
            v = total
        values.append(v)
    return values


def naive_kind(a: int, op: str, b: int) -> str | None:
    """Hardness by padded digit strings, column by column."""
    if op == "*":
        return "multiplication" if a >= 2 and b >= 2 else None
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width), str(b).zfill(width)
    for ca, cb in zip(reversed(da), reversed(db)):
        if op == "+" and int(ca) + int(cb) > 9:
            return "addition with carry"
        if op == "-" and int(ca) < int(cb):
            return "subtraction with borrow"
    return None


# ------------------------------------------------------------------ generator
def test_deterministic_and_leaves_global_rng_alone():
    state = random.getstate()
    a = generate("train", 200, seed=3)
    assert random.getstate() == state
    b = generate("train", 200, seed=3)
    assert [(p.question, p.solution, p.answer, p.hint, p.meta) for p in a] == \
           [(p.question, p.solution, p.answer, p.hint, p.meta) for p in b]
    c = generate("train", 200, seed=4)
    assert [p.question for p in a] != [p.question for p in c]
    # a prefix of a larger request is the same problems (the driver can grow n)
    assert [p.question for p in generate("train", 50, seed=3)] == [p.question for p in a[:50]]
    assert len({p.uid for p in a}) == 200


def test_train_and_test_are_disjoint():
    train = generate("train", 6000, seed=0)
    test = generate("test", 500, seed=0)
    assert not {p.question for p in train} & {p.question for p in test}
    sig = lambda p: (p.meta["start"], tuple(map(tuple, p.meta["ops"])))  # noqa: E731
    assert not {sig(p) for p in train} & {sig(p) for p in test}
    # chain-level disjointness holds across seeds too (a test chain is never a train chain)
    other_test = generate("test", 500, seed=7)
    assert not {sig(p) for p in train} & {sig(p) for p in other_test}
    # both splits come from the same distribution: similar op-count and hint mixes
    for key in (lambda p: len(p.meta["ops"]), lambda p: p.hint):
        for value in {key(p) for p in train}:
            f_train = sum(key(p) == value for p in train) / len(train)
            f_test = sum(key(p) == value for p in test) / len(test)
            assert abs(f_train - f_test) < 0.07, (value, f_train, f_test)
    assert TEST_MODULUS >= 2


@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_every_reference_is_correct_and_within_spec(split):
    spec = SPECS[split]
    problems = generate(split, 400, seed=1)
    for p in problems:
        start, ops = naive_chain_from_text(p.question)
        assert (start, ops) == (p.meta["start"], [tuple(o) for o in p.meta["ops"]])
        values = naive_eval(start, ops)
        assert p.answer == str(values[-1])
        assert spec.min_ops <= len(ops) <= spec.max_ops
        assert all(1 <= v <= spec.max_result for v in values)
        assert 2 <= start <= spec.max_operand
        for op, x in ops:
            assert (2 <= x <= spec.max_factor) if op == "*" else (1 <= x <= spec.max_operand)
        # the solution: one line per step with the right numbers, then the boxed answer
        lines = p.solution.split("\n")
        assert len(lines) == len(ops) + 1
        for i, ((op, x), line) in enumerate(zip(ops, lines)):
            assert line == f"Step {i + 1}: {values[i]} {op} {x} = {values[i + 1]}."
        assert lines[-1] == f"The answer is \\boxed{{{p.answer}}}."
        kinds = [naive_kind(values[i], op, x) for i, (op, x) in enumerate(ops)]
        assert p.hint == next((k for k in kinds if k), "none")
        assert p.source == f"arith:{split}"


def test_ood_has_larger_numbers_and_no_train_chain():
    train = generate("train", 3000)
    ood = generate("ood", 500)
    # every ood chain starts above anything train starts with, and reaches larger values
    assert min(p.meta["values"][0] for p in ood) > max(p.meta["values"][0] for p in train)
    assert max(max(p.meta["values"]) for p in ood) > max(max(p.meta["values"]) for p in train)
    assert min(len(p.meta["ops"]) for p in ood) >= 3
    sig = lambda p: (p.meta["start"], tuple(map(tuple, p.meta["ops"])))  # noqa: E731
    assert not {sig(p) for p in train} & {sig(p) for p in ood}


def test_min_start_is_validated():
    with pytest.raises(ValueError, match="min_start"):
        generate("ood", 5, spec=ArithSpec(min_start=60, max_operand=49))


def test_step_kind_matches_digit_reference():
    rng = random.Random(0)
    for _ in range(3000):
        op = rng.choice("+-*")
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        if op == "-" and a < b:
            a, b = b, a
        assert step_kind(a, op, b) == naive_kind(a, op, b), (a, op, b)
    assert step_kind(3, "-", 5) == "subtraction with borrow"  # negative result counts as hard


def test_length_budget():
    """Whole in-distribution prompt + solution stays short (the tiny model's context is small)."""
    for split, max_chars, mean_chars in (("train", 300, 220), ("test", 300, 220), ("ood", 360, 300)):
        problems = generate(split, 1000)
        lengths = [len(p.question) + len(p.solution) for p in problems]
        assert max(lengths) <= max_chars, (split, max(lengths))
        assert sum(lengths) / len(lengths) <= mean_chars, (split, sum(lengths) / len(lengths))


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate("validation", 3)
    with pytest.raises(ValueError, match="n="):
        generate("train", -1)
    with pytest.raises(ValueError, match="max_ops"):
        generate("train", 3, spec=ArithSpec(min_ops=3, max_ops=2))
    with pytest.raises(ValueError, match="max_factor"):
        generate("train", 3, spec=ArithSpec(max_factor=1))
    # a spec with very few distinct chains cannot make many distinct problems
    tiny = ArithSpec(min_ops=1, max_ops=1, max_operand=2, max_factor=2, max_result=4)
    with pytest.raises(ValueError, match="distinct"):
        generate("ood", 50, spec=tiny)
    assert generate("train", 0) == []


# ------------------------------------------------------------------ step checker
def _lines_with_spans(text: str):
    out, pos = [], 0
    for line in text.split("\n"):
        out.append((pos, pos + len(line)))
        pos += len(line) + 1
    return out


@pytest.mark.parametrize("split", ["train", "ood"])
def test_checker_accepts_references(split):
    for p in generate(split, 300, seed=2):
        r = check_steps(p, p.solution)
        assert r.first_error_step is None and r.first_error_span is None and r.error_kind is None
        assert r.final_correct
        spans = _lines_with_spans(p.solution)
        n_ops = len(p.meta["ops"])
        assert r.steps == spans[:n_ops]
        assert r.answer_span == spans[-1]
        values = p.meta["values"]
        hard = [spans[i] for i, (op, x) in enumerate(p.meta["ops"]) if naive_kind(values[i], op, x)]
        assert r.key_step_spans == (hard or [spans[n_ops - 1]])
        for s, e in r.steps:
            assert p.solution[s:e].startswith("Step ") and p.solution[s:e].endswith(".")


@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_checker_finds_injected_arithmetic_error(split):
    rng = random.Random(5)
    for p in generate(split, 150, seed=3):
        lines = p.solution.split("\n")
        k = rng.randrange(len(p.meta["ops"]))
        a, op, b, c = re.fullmatch(r"Step \d+: (\d+) (.) (\d+) = (\d+)\.", lines[k]).groups()
        lines[k] = f"Step {k + 1}: {a} {op} {b} = {int(c) + rng.choice([1, 2, 10])}."
        response = "\n".join(lines)
        r = check_steps(p, response)
        assert r.first_error_step == k
        s, e = r.first_error_span
        assert response[s:e] == lines[k]
        assert r.error_kind == "arithmetic"
        assert r.final_correct  # only the step was edited, the boxed answer is untouched
        assert r.key_step_spans == []


def test_checker_operand_errors_and_commutativity():
    p = next(q for q in generate("train", 200, seed=4)
             if len(q.meta["ops"]) >= 3 and q.meta["ops"][1][0] in "+*")
    lines = p.solution.split("\n")
    v, (op, x) = p.meta["values"], p.meta["ops"][1]
    # swapping the operands of + or * is fine
    swapped = lines.copy()
    swapped[1] = f"Step 2: {x} {op} {v[1]} = {v[2]}."
    assert check_steps(p, "\n".join(swapped)).first_error_step is None
    # a wrong first operand with self-consistent arithmetic: does not follow the chain
    wrong = lines.copy()
    bad = v[1] + 1
    wrong[1] = f"Step 2: {bad} {op} {x} = {bad + x if op == '+' else bad * x}."
    r = check_steps(p, "\n".join(wrong))
    assert (r.first_error_step, r.error_kind) == (1, "operands")
    assert "\n".join(wrong)[slice(*r.first_error_span)] == wrong[1]
    # the wrong operation
    other = "-" if op != "-" else "+"
    wrong[1] = f"Step 2: {v[1]} {other} {x} = 1."
    assert check_steps(p, "\n".join(wrong)).error_kind == "operands"
    # a step using the problem's number where the previous result belongs
    p2 = next(q for q in generate("train", 200, seed=4) if q.meta["ops"][1][0] == "-")
    l2 = p2.solution.split("\n")
    v2, (_, x2) = p2.meta["values"], p2.meta["ops"][1]
    l2[1] = f"Step 2: {x2} - {v2[1]} = {x2 - v2[1]}."
    assert check_steps(p2, "\n".join(l2)).first_error_step == 1


def test_checker_on_garbage_and_edge_cases():
    p = generate("train", 1, seed=9)[0]
    n_ops = len(p.meta["ops"])
    r = check_steps(p, "  hello there\nblah blah\n")
    assert r.steps == [] and r.first_error_step == 0 and r.error_kind == "no_steps"
    assert "  hello there\nblah blah\n"[slice(*r.first_error_span)] == "hello there"
    assert not r.final_correct and r.key_step_spans == []
    r = check_steps(p, "")
    assert (r.first_error_step, r.first_error_span, r.final_correct) == (0, (0, 0), False)
    # an answer with no steps: right answer is not an error, its key span is the answer
    resp = f"The answer is \\boxed{{{p.answer}}}."
    r = check_steps(p, resp)
    assert r.final_correct and r.first_error_step is None and r.key_step_spans == [(0, len(resp))]
    wrong = f"The answer is \\boxed{{{int(p.answer) + 1}}}."
    r = check_steps(p, wrong)
    assert (r.first_error_step, r.first_error_span, r.error_kind) == (0, (0, len(wrong)), "no_steps")
    # all steps right, final answer wrong: error just after the steps, on the answer line
    lines = p.solution.split("\n")
    lines[-1] = "The answer is \\boxed{999}."
    resp = "\n".join(lines)
    r = check_steps(p, resp)
    assert (r.first_error_step, r.error_kind) == (n_ops, "final_answer")
    assert resp[slice(*r.first_error_span)] == lines[-1]
    # truncated after step 1: error at index 1, span = the last step (nothing follows)
    resp = lines[0] + "\n"
    r = check_steps(p, resp)
    assert (r.first_error_step, r.error_kind) == (1, "missing_steps")
    assert resp[slice(*r.first_error_span)] == lines[0]
    # an extra step after a correct chain
    extra = p.solution.split("\n")
    extra.insert(n_ops, f"Step {n_ops + 1}: 1 + 1 = 2.")
    r = check_steps(p, "\n".join(extra))
    assert (r.first_error_step, r.error_kind) == (n_ops, "extra_step")
    # a malformed step line
    bad = p.solution.split("\n")
    bad[0] = "Step 1: seven plus five"
    r = check_steps(p, "\n".join(bad))
    assert (r.first_error_step, r.error_kind) == (0, "malformed")
    assert r.first_error_span == (0, len(bad[0]))
    # the final box is unclosed (truncated): not correct
    assert not check_steps(p, p.solution[:-2]).final_correct


def test_checker_spans_with_odd_whitespace_and_same_line_answer():
    p = generate("train", 1, seed=11)[0]
    lines = p.solution.split("\n")
    resp = "Let me think.\r\n" + "\r\n".join("   " + l + "  " for l in lines[:-1]) + " " + lines[-1]
    r = check_steps(p, resp)
    assert r.first_error_step is None and r.final_correct
    assert [resp[s:e] for s, e in r.steps] == lines[:-1]
    assert resp[slice(*r.answer_span)] == lines[-1]
    # 'x' and '×' are read as multiplication
    q = next(q for q in generate("train", 100) if q.meta["ops"][0][0] == "*")
    ql = q.solution.split("\n")
    ql[0] = ql[0].replace(" * ", " x ")
    assert check_steps(q, "\n".join(ql)).first_error_step is None
    ql[0] = ql[0].replace(" x ", " × ")
    assert check_steps(q, "\n".join(ql)).first_error_step is None


def test_chain_of_requires_arith_meta():
    with pytest.raises(ValueError, match="arith"):
        check_steps(Problem(uid="x", question="q", answer="1", solution=None), "Step 1: 1 + 1 = 2.")
    p = generate("test", 1)[0]
    assert chain_of(p).values == p.meta["values"]
