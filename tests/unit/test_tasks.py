"""Tasks, all of them: references verify, hostile answers score 0 fast, splits are seeded and disjoint,
problems survive JSON, and the registry names what is valid."""

from __future__ import annotations

import json
import string
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aisrl.tasks import TASK_NAMES, Problem, Task, first_line, get_task, is_eval_key, problem_from_json, problem_to_json

PROCEDURAL = ["countdown", "sudoku", "arithmetic"]
HOSTILE = [
    "", "\n", " ", "garbage", "∞", "🙂", "１２３", "٣", "\ud800", "\x00\x01", "NaN", "inf", "1e309", "0x10", "1_000",
    "-", "--1", "1/0", "(1/(3-3))", "7/(5-5)", "((1+2)", "1+2)", "()", "9**9**9", "__import__('os').system('x')",
    "9" * 5000, "9" * 10**6, "1" + "+1" * 5000, "(" * 1000 + "1" + ")" * 1000, "(" * 10**5, "-(" * 1000 + "1",
    "x" * 10**6,
]  # fmt: skip


@pytest.mark.parametrize("name", PROCEDURAL)
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), index=st.integers(0, 10**6))
def test_reference_always_verifies(name, seed, index):
    task = get_task(name)
    problem = task.train_problem(seed, index)
    assert task.verify(problem, problem.reference) == 1.0
    assert task.verify(problem, f" {problem.reference} \nanything after the first line is ignored") == 1.0
    assert task.verify(problem, "\n" + problem.reference) == 0.0  # the answer is the first line
    assert not is_eval_key(problem.data["key"])
    assert problem.task == name and problem.uid == f"{name}/train/{index:06d}"


@pytest.mark.parametrize("name", PROCEDURAL)
def test_prompts_are_short_printable_ascii(name):
    task = get_task(name)
    printable = set(string.printable) - set("\t\n\r\x0b\x0c")
    for problem in [task.train_problem(0, i) for i in range(300)] + task.eval_split(50):
        text = problem.prompt + problem.reference
        assert set(text) <= printable, text
        assert len(problem.prompt) <= 40 and len(problem.reference) <= 40, text
        assert problem.prompt[-1] in ":=" and problem.reference == problem.reference.strip()


@pytest.mark.parametrize("name", PROCEDURAL)
def test_hostile_output_scores_zero_fast(name):
    task = get_task(name)
    problem = task.train_problem(0, 0)
    for answer in HOSTILE:
        start = time.perf_counter()
        assert task.verify(problem, answer) == 0.0, answer[:40]
        assert time.perf_counter() - start < 1.0  # a guard against pathological parsing, not a benchmark
    assert task.verify(problem, None) == 0.0  # type: ignore[arg-type]  # not even a string


@pytest.mark.parametrize("name", PROCEDURAL)
@settings(max_examples=200, deadline=None)
@given(answer=st.text(max_size=300))
def test_verifiers_never_raise(name, answer):
    task = get_task(name)
    assert task.verify(task.train_problem(0, 1), answer) in (0.0, 1.0)


@pytest.mark.parametrize("name", PROCEDURAL)
def test_splits_are_seeded_and_disjoint(name):
    task = get_task(name)
    assert task.train_problem(3, 7) == get_task(name).train_problem(3, 7)
    assert [task.train_problem(1, i).prompt for i in range(20)] != [task.train_problem(2, i).prompt for i in range(20)]
    held_out = task.eval_split(100)
    assert held_out == get_task(name).eval_split(100)
    assert task.eval_split(10) == held_out[:10]  # a prefix of any longer split
    assert task.eval_split(0) == []
    keys = {p.data["key"] for p in held_out}
    assert len(keys) == 100 and all(is_eval_key(k) for k in keys)
    train_keys = {task.train_problem(seed, i).data["key"] for seed in range(2) for i in range(2000)}
    assert not keys & train_keys
    assert [p.uid for p in held_out] == [f"{name}/eval/{i:06d}" for i in range(100)]
    assert all(task.verify(p, p.reference) == 1.0 for p in held_out)
    with pytest.raises(ValueError, match="n must be"):
        task.eval_split(-1)
    with pytest.raises(ValueError, match="index must be"):
        task.train_problem(0, -1)


def test_eval_split_too_large_for_the_problem_space_is_a_clear_error():
    task = get_task("countdown", num_numbers=2, max_number=3)  # a handful of distinct problems
    with pytest.raises(ValueError, match="distinct held-out problems"):
        task.eval_split(50)


def test_first_line_convention():
    assert first_line("  12 \n34") == "12"
    assert first_line("\n12") == ""
    assert first_line(None) == ""  # type: ignore[arg-type]
    for name in PROCEDURAL:
        assert get_task(name).multiline_answers is False
        assert get_task(name).extract_answer(" a \nb") == "a"


@pytest.mark.parametrize("name", PROCEDURAL)
def test_problem_json_round_trip(name):
    task = get_task(name)
    for problem in [task.train_problem(5, 3), *task.eval_split(3)]:
        text = problem_to_json(problem)
        assert text.isascii()
        back = problem_from_json(text)
        assert back == problem
        assert problem_from_json(text.encode()) == problem
        assert task.verify(back, problem.reference) == 1.0


def test_problem_json_errors_say_what_is_wrong():
    good = {"task": "t", "uid": "u", "prompt": "p", "reference": "r", "data": {}}
    cases = [
        ("{", "not valid JSON"),
        (b"\xff", "not valid JSON"),
        ("[]", "JSON object, got list"),
        (json.dumps(good | {"task": 1}), "'task' must be a string"),
        (json.dumps({k: v for k, v in good.items() if k != "uid"}), "'uid' is missing"),
        (json.dumps(good | {"data": []}), "'data' must be an object"),
        (json.dumps(good | {"extra": 1}), r"unknown fields \['extra'\]"),
    ]
    for text, message in cases:
        with pytest.raises(ValueError, match=message):
            problem_from_json(text)
    assert problem_from_json(json.dumps({k: v for k, v in good.items() if k != "data"})).data == {}
    with pytest.raises(ValueError, match="'data' is not JSON-serialisable"):
        problem_to_json(Problem("t", "u", "p", "r", {"x": object()}))
    with pytest.raises(ValueError, match="'data' is not JSON-serialisable"):
        problem_to_json(Problem("t", "u", "p", "r", {"x": float("nan")}))


def test_registry_names_valid_tasks_and_rejects_bad_options():
    assert set(TASK_NAMES) == {"countdown", "sudoku", "arithmetic", "gsm8k"}
    with pytest.raises(ValueError, match="unknown task 'chess'; valid tasks: countdown, sudoku, arithmetic, gsm8k"):
        get_task("chess")
    with pytest.raises(ValueError, match=r"bad options for task 'countdown'.*colour"):
        get_task("countdown", colour="red")
    with pytest.raises(ValueError, match="num_numbers"):
        get_task("countdown", num_numbers=9)
    with pytest.raises(ValueError, match="blanks"):
        get_task("sudoku", min_blanks=7, max_blanks=6)
    with pytest.raises(ValueError, match="ops"):
        get_task("arithmetic", ops="/")
    assert all(isinstance(get_task(name), Task) for name in PROCEDURAL)
