"""Countdown and its expression parser: exact values, strict grammar, bounded work, known answers."""

from __future__ import annotations

import contextlib
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aisrl.tasks import Problem, get_task
from aisrl.tasks.expr import MAX_CHARS, MAX_DEPTH, ExprError, evaluate


def _problem(numbers, target, **extra):
    return Problem("countdown", "u", "", "", {"numbers": numbers, "target": target, **extra})


def test_known_answers():
    task = get_task("countdown")
    problem = _problem([3, 5, 7], 22)
    for right in ("3*5+7", " (7+ 3*5) ", "7+5*3", "(3*5)+(7)", "3*5+7\nthe rest is ignored"):
        assert task.verify(problem, right) == 1.0, right
    for wrong in (
        "3*5+7+0",  # 0 is not given
        "7*3+1",  # 1 is not given
        "5*5-3",  # 5 used twice
        "3*5+8",
        "22",  # not given
        "3*5+7=22",  # the answer is the expression only
        "7/(5-5)",
        "3*5+07",  # a leading zero is not the number 7
        "3.0*5+7",
        "3×5+7",
        "3*5+7+",
        "3 5 7",
        "3*5+7)",
    ):
        assert task.verify(problem, wrong) == 0.0, wrong
    exact = _problem([6, 4, 3], 8)
    assert task.verify(exact, "6/3*4") == 1.0  # exact fractions: 2 * 4
    assert task.verify(exact, "4/3*6") == 1.0  # (4/3) * 6 = 8 exactly, no rounding
    assert task.verify(_problem([7, 2], 3), "7/2") == 0.0  # 3.5 is not 3 (no integer division)


def test_unary_minus_and_multiset_rules():
    task = get_task("countdown")
    assert task.verify(_problem([3, 5], 2), "-3+5") == 1.0
    assert task.verify(_problem([3, 5], 8), "5--3") == 1.0
    assert task.verify(_problem([3, 5], 15), "-3*-5") == 1.0
    assert task.verify(_problem([3, 5], 15), "--3*5") == 0.0  # one unary minus per factor
    assert task.verify(_problem([3, 5], 2), "+5-3") == 0.0  # no unary plus
    assert task.verify(_problem([5, 5, 2], 27), "5*5+2") == 1.0  # a repeated number may be used as often as given
    use_all = _problem([3, 5, 7], 15, use_all=True)
    assert task.verify(use_all, "3*5") == 0.0
    assert task.verify(use_all, "3*5*7/7") == 0.0  # 7 twice
    assert task.verify(_problem([3, 5, 7], 15, use_all=True), "(7-7+3)*5") == 0.0
    assert task.verify(_problem([3, 5, 7], 105, use_all=True), "3*5*7") == 1.0


def test_parser_values_and_errors():
    assert evaluate("1+2*3") == (Fraction(7), [1, 2, 3])
    assert evaluate("(1+2)*3") == (Fraction(9), [1, 2, 3])
    assert evaluate("8/4/2") == (Fraction(1), [8, 4, 2])  # left associative
    assert evaluate("8-4-2") == (Fraction(2), [8, 4, 2])
    assert evaluate("2/3") == (Fraction(2, 3), [2, 3])
    assert evaluate("-(2-5)") == (Fraction(3), [2, 5])
    assert evaluate(" 0 ") == (Fraction(0), [0])
    for bad, message in (
        ("1/0", "division by zero"),
        ("1/(2-2)", "division by zero"),
        ("(1", "unbalanced"),
        ("1)", "unexpected"),
        ("", "expected a number"),
        ("01", "leading zero"),
        ("1234567890", "more than"),
        ("1" * (MAX_CHARS + 1), "longer than"),
        ("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1), "nested too deep"),
        ("2**3", "expected a number"),
        ("1e3", "unexpected"),
        ("1\t+2", "unexpected"),
    ):
        with pytest.raises(ExprError, match=message):
            evaluate(bad)
    assert len(evaluate("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH)[1]) == 1
    with pytest.raises(ExprError):
        evaluate(None)  # type: ignore[arg-type]


def test_huge_values_are_bounded():
    # 20 nine-digit factors fit in 200 characters and stay exact; 1/(huge) chains stay bounded too.
    big = "*".join(["999999999"] * 20)
    assert evaluate(big)[0] == Fraction(999999999) ** 20
    start = time.perf_counter()
    for text in (big, "/".join(["999999999"] * 20), "(" * 30 + big[:150] + ")" * 30):
        with contextlib.suppress(ExprError):
            evaluate(text)
    assert time.perf_counter() - start < 1.0


def test_deep_nesting_is_an_error_not_a_recursion_error():
    task = get_task("countdown")
    problem = _problem([1, 2, 3], 1)
    for depth in (33, 99, 1000, 10**5):
        assert task.verify(problem, "(" * depth + "1" + ")" * depth) == 0.0
        assert task.verify(problem, "-(" * depth + "1" + ")" * depth) == 0.0
    assert task.verify(problem, "(((1)))") == 1.0


# A random expression tree, its text and its exact value, to check the parser against.
_leaf = st.integers(0, 999).map(lambda n: (str(n), Fraction(n)))


def _combine(children):
    def node(draw_pair):
        (ta, va), op, (tb, vb), neg = draw_pair
        if op == "/" and vb == 0:
            op = "+"
        value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else None}[op]
        text = f"({ta}){op}({tb})"
        return (f"-({text})", -value) if neg else (text, value)

    return st.tuples(children, st.sampled_from("+-*/"), children, st.booleans()).map(node)


_trees = st.recursive(_leaf, _combine, max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(tree=_trees)
def test_parser_agrees_with_the_tree(tree):
    text, value = tree
    if len(text) > MAX_CHARS or text.count("(") > MAX_DEPTH:
        return
    try:
        got, _ = evaluate(text)
    except ExprError as exc:  # only nesting depth can fail a well-formed tree
        assert "deep" in str(exc)
        return
    assert got == value


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="0123456789+-*/() ", max_size=120))
def test_parser_raises_only_expr_errors(text):
    with contextlib.suppress(ExprError):
        evaluate(text)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    num_numbers=st.integers(2, 5),
    max_number=st.integers(2, 30),
    use_all=st.booleans(),
    ops=st.sampled_from(["+-*/", "+-", "+*", "*/", "-", "+-*"]),
)
def test_options_still_give_solvable_problems(seed, num_numbers, max_number, use_all, ops):
    task = get_task(
        "countdown", num_numbers=num_numbers, max_number=max_number, max_target=200, use_all=use_all, ops=ops
    )
    problem = task.train_problem(seed, 0)
    assert len(problem.data["numbers"]) == num_numbers
    assert all(1 <= n <= max_number for n in problem.data["numbers"])
    assert 1 <= problem.data["target"] <= 200
    assert problem.data["use_all"] is use_all
    assert set(problem.reference) <= set("0123456789()") | set(ops)
    assert task.verify(problem, problem.reference) == 1.0


def test_prompt_template():
    problem = get_task("countdown").train_problem(0, 0)
    numbers, target = problem.data["numbers"], problem.data["target"]
    assert problem.prompt == f"Use {' '.join(map(str, numbers))} to make {target}:"
    assert problem.data["key"] == f"{sorted(numbers)}>{target}"
