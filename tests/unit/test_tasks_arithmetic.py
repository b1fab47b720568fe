"""Arithmetic: the answer is a strictly formatted integer; commutative problems share a split key."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aisrl.tasks import Problem, get_task, is_eval_key


def _problem(answer):
    return Problem("arithmetic", "u", "", "", {"answer": answer})


def test_known_answers():
    task = get_task("arithmetic")
    problem = _problem(-33)
    assert task.verify(problem, "-33") == 1.0
    assert task.verify(problem, " -33 \n= -33") == 1.0
    for wrong in ("33", "-33.0", "- 33", "+-33", "−33", "-033", "-33-", "-3 3", "-33e0", "-٣٣", "-1,000"):
        assert task.verify(problem, wrong) == 0.0, wrong
    zero = _problem(0)
    assert task.verify(zero, "0") == 1.0
    assert task.verify(zero, "-0") == 0.0
    assert task.verify(zero, "00") == 0.0
    assert task.verify(_problem(7), "+7") == 0.0  # the canonical form only


def test_prompt_and_reference():
    task = get_task("arithmetic")
    problem = task.train_problem(0, 0)
    a, b, op = problem.data["a"], problem.data["b"], problem.data["op"]
    assert problem.prompt == f"{a}{op}{b}="
    assert problem.reference == str({"+": a + b, "-": a - b, "*": a * b}[op]) == str(problem.data["answer"])
    assert 10 <= a <= 999 and 10 <= b <= 999


def test_commutative_problems_share_a_key():
    task = get_task("arithmetic", ops="+*")
    for i in range(200):
        problem = task.train_problem(0, i)
        a, b, op = problem.data["a"], problem.data["b"], problem.data["op"]
        assert problem.data["key"] == f"{min(a, b)}{op}{max(a, b)}"
        assert not is_eval_key(f"{b}{op}{a}" if a > b else f"{a}{op}{b}")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), lo=st.integers(1, 18), extra=st.integers(0, 3), ops=st.sampled_from(["+", "-", "*"]))
def test_options(seed, lo, extra, ops):
    hi = min(18, lo + extra)
    task = get_task("arithmetic", min_digits=lo, max_digits=hi, ops=ops)
    problem = task.train_problem(seed, 0)
    assert problem.data["op"] == ops
    assert lo <= len(str(problem.data["a"])) <= hi
    assert task.verify(problem, problem.reference) == 1.0
