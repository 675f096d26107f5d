"""trace_rl/algo/schedules.py: every schedule against a naive formula at every step."""
from __future__ import annotations

import math

import pytest

from trace_rl.algo.schedules import SCHEDULES, Schedule, schedule_defaults

STEPS = range(0, 80)


def naive(name, step, start=1.0, end=0.0, hold=0, decay=0, step_size=1, gamma=0.5):
    """The formulas written out independently of the implementation."""
    if name == "constant":
        return start
    if step < hold:
        return start
    if name == "step":
        k = (step - hold) // step_size
        return end + (start - end) * gamma ** k
    if decay == 0 or step >= hold + decay:
        return end
    progress = (step - hold) / decay
    if name == "hold_linear":
        return start + (end - start) * progress
    return end + (start - end) * (math.cos(math.pi * progress) + 1) / 2  # cosine


CASES = [
    ("constant", dict(start=0.3)),
    ("constant", dict(start=0.0)),
    ("hold_linear", dict(start=0.5, hold=10, decay=30)),  # TRACE
    ("hold_linear", dict(start=0.5, end=0.1, hold=3, decay=7)),
    ("hold_linear", dict(start=0.2, end=0.8, hold=0, decay=5)),  # rising
    ("hold_linear", dict(start=1.0, hold=4, decay=0)),  # a cliff
    ("cosine", dict(start=1.0, hold=5, decay=20)),
    ("cosine", dict(start=2.0, end=0.5, hold=0, decay=13)),
    ("step", dict(start=1.0, hold=0, step_size=5, gamma=0.5)),  # StepLR
    ("step", dict(start=1.0, end=0.25, hold=6, step_size=4, gamma=0.1)),
    ("step", dict(start=0.5, hold=10, step_size=3, gamma=0.0)),
    ("step", dict(start=0.5, hold=2, step_size=3, gamma=1.0)),
]


def make(name, kw):
    return Schedule(name=name, start=kw.get("start", 1.0), end=kw.get("end", 0.0), hold_steps=kw.get("hold", 0),
                    decay_steps=kw.get("decay", 0), step_size=kw.get("step_size", 1), gamma=kw.get("gamma", 0.5))


@pytest.mark.parametrize("name,kw", CASES)
def test_values_match_naive_formula_at_every_step(name, kw):
    s = make(name, kw)
    for step in STEPS:
        assert s.value(step) == pytest.approx(naive(name, step, **kw), abs=1e-12), step


def test_trace_schedule_concretely():
    s = Schedule.from_spec(schedule_defaults("hold_linear", start=0.5, hold_steps=10, decay_steps=30))
    assert [s.value(t) for t in (0, 9, 10)] == [0.5, 0.5, 0.5]
    assert s.value(25) == pytest.approx(0.25)
    assert s.value(39) == pytest.approx(0.5 / 30)
    assert s.value(40) == 0.0 and s.value(10_000) == 0.0
    assert s.is_zero_from() == 40
    assert s.peak == 0.5


@pytest.mark.parametrize("name,kw", CASES)
def test_is_zero_from_matches_a_scan(name, kw):
    s = make(name, kw)
    horizon = 400  # far past every case's decay; none reaches 0 later than this
    values = [naive(name, t, **kw) for t in range(horizon)]
    expected = None
    if values[-1] == 0:
        expected = horizon - 1
        while expected > 0 and values[expected - 1] == 0:
            expected -= 1
    got = s.is_zero_from()
    if name == "step" and 0 < kw.get("gamma", 0.5) < 1 and kw.get("end", 0.0) == 0:
        assert got is None  # approaches 0, never reaches it exactly
    else:
        assert got == expected
    if got is not None:
        assert all(s.value(t) == 0 for t in range(got, got + 50))
        assert got == 0 or s.value(got - 1) != 0


def test_zero_from_cases():
    assert Schedule("constant", start=0.0).is_zero_from() == 0
    assert Schedule("constant", start=1.0).is_zero_from() is None
    assert Schedule("hold_linear", start=0.0, end=0.0, hold_steps=5, decay_steps=5).is_zero_from() == 0
    assert Schedule("hold_linear", start=1.0, end=0.1, hold_steps=5, decay_steps=5).is_zero_from() is None
    assert Schedule("cosine", start=1.0, hold_steps=2, decay_steps=3).is_zero_from() == 5
    assert Schedule("step", start=1.0, hold_steps=2, step_size=3, gamma=0.0).is_zero_from() == 5


def test_from_spec():
    assert Schedule.from_spec(0.7) == Schedule("constant", start=0.7)
    assert Schedule.from_spec(2) == Schedule("constant", start=2.0)
    s = Schedule("cosine", start=1.0, decay_steps=4)
    assert Schedule.from_spec(s) is s
    assert Schedule.from_spec({"name": "cosine", "start": 1.0, "decay_steps": 4}) == s
    assert Schedule.from_spec(schedule_defaults("cosine", start=1.0, decay_steps=4)) == s
    with pytest.raises(ValueError, match="my_coef: unknown schedule fields \\['decay'\\]"):
        Schedule.from_spec({"name": "cosine", "decay": 4}, what="my_coef")
    with pytest.raises(TypeError, match="my_coef must be a number or a mapping"):
        Schedule.from_spec("0.5", what="my_coef")
    with pytest.raises(TypeError):
        Schedule.from_spec(True)


def test_validation():
    with pytest.raises(ValueError, match="unknown schedule 'linear'; known: constant, cosine, hold_linear, step"):
        Schedule("linear")
    for bad in (dict(start=-0.1), dict(end=float("nan")), dict(gamma=1.5), dict(hold_steps=-1),
                dict(decay_steps=2.5), dict(step_size=0), dict(start="1")):
        with pytest.raises(ValueError):
            Schedule("hold_linear", **bad)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        Schedule().value(-1)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        Schedule().value(1.5)
    with pytest.raises(ValueError, match="trace_lambda: schedule start must be"):
        Schedule.from_spec({"name": "constant", "start": -1}, what="trace_lambda")


def test_registry_and_defaults_dict():
    assert set(SCHEDULES) == {"constant", "hold_linear", "cosine", "step"}
    d = schedule_defaults("hold_linear", start=0.5, hold_steps=10, decay_steps=30)
    assert d == {"name": "hold_linear", "start": 0.5, "end": 0.0, "hold_steps": 10, "decay_steps": 30,
                 "step_size": 1, "gamma": 0.5}
