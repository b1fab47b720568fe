"""Tasks: references verify, wrong and hostile answers score 0, splits are seeded and disjoint."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aisrl.tasks import TASK_NAMES, Problem, get_task, problem_from_json, problem_to_json
from aisrl.tasks.base import is_eval_key

PROCEDURAL = ["countdown", "sudoku", "arithmetic"]
HOSTILE = [
    "", "\n", "garbage", "∞", "🙂", "1/0", "(1/(3-3))", "9" * 5000, "9**9**9", "__import__('os')",
    "(" * 1000 + "1" + ")" * 1000, "((1+2)", "1+2)", "1" + "+1" * 5000, "NaN", "-", "\x00\x01",
]  # fmt: skip


@pytest.mark.parametrize("name", PROCEDURAL)
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), index=st.integers(0, 10**6))
def test_reference_always_verifies(name, seed, index):
    task = get_task(name)
    problem = task.train_problem(seed, index)
    assert task.verify(problem, problem.reference) == 1.0
    assert task.verify(problem, problem.reference + "\nanything after the first line is ignored") == 1.0
    assert not is_eval_key(problem.data["key"])


@pytest.mark.parametrize("name", PROCEDURAL)
def test_hostile_output_scores_zero_fast(name):
    task = get_task(name)
    problem = task.train_problem(0, 0)
    for answer in HOSTILE:
        start = time.perf_counter()
        assert task.verify(problem, answer) == 0.0, answer[:40]
        assert time.perf_counter() - start < 1.0  # a guard against pathological parsing, not a benchmark


@pytest.mark.parametrize("name", PROCEDURAL)
def test_splits_are_seeded_and_disjoint(name):
    task = get_task(name)
    assert task.train_problem(3, 7) == task.train_problem(3, 7)
    assert [task.train_problem(1, i).prompt for i in range(20)] != [task.train_problem(2, i).prompt for i in range(20)]
    held_out = task.eval_split(100)
    assert held_out == get_task(name).eval_split(100)
    keys = {p.data["key"] for p in held_out}
    assert len(keys) == 100 and all(is_eval_key(k) for k in keys)
    train_keys = {task.train_problem(0, i).data["key"] for i in range(2000)}
    assert not keys & train_keys
    assert all(p.uid.startswith(f"{name}/eval/") for p in held_out)


def test_countdown_known_answers():
    task = get_task("countdown")
    problem = Problem("countdown", "u", "", "", {"numbers": [3, 5, 7], "target": 22})
    assert task.verify(problem, "3*5+7") == 1.0
    assert task.verify(problem, " (7+ 3*5) ") == 1.0
    assert task.verify(problem, "3*5+7+0") == 0.0  # 0 is not given
    assert task.verify(problem, "7*3+1") == 0.0  # 1 is not given
    assert task.verify(problem, "5*5-3") == 0.0  # 5 used twice
    assert task.verify(problem, "3*5+8") == 0.0
    assert task.verify(problem, "7/(5-5)") == 0.0
    exact = Problem("countdown", "u", "", "", {"numbers": [6, 4, 3], "target": 8})
    assert task.verify(exact, "6/3*4") == 1.0  # exact fractions: 2 * 4
    assert task.verify(exact, "4/3*6") == 1.0  # (4/3) * 6 = 8 exactly
    all_used = Problem("countdown", "u", "", "", {"numbers": [3, 5, 7], "target": 15, "use_all": True})
    assert task.verify(all_used, "3*5") == 0.0


def test_sudoku_known_answers():
    task = get_task("sudoku")
    problem = Problem("sudoku", "u", "", "", {"puzzle": "1.3434.2.1434.21"})
    assert task.verify(problem, "1234/3412/2143/4321") == 1.0
    assert task.verify(problem, "1234341221434321") == 1.0
    assert task.verify(problem, "1234/3412/2143/4312") == 0.0  # invalid grid
    other = Problem("sudoku", "u", "", "", {"puzzle": "2..............."})
    assert task.verify(other, "1234/3412/2143/4321") == 0.0  # valid grid, breaks a clue


def test_arithmetic_known_answers():
    task = get_task("arithmetic")
    problem = Problem("arithmetic", "u", "12-45=", "", {"answer": -33})
    assert task.verify(problem, "-33") == 1.0
    assert task.verify(problem, "-33 ") == 1.0
    for wrong in ("33", "-33.0", "- 33", "+-33", "−33"):
        assert task.verify(problem, wrong) == 0.0, wrong


def test_problem_json_round_trip_and_errors():
    problem = get_task("countdown").train_problem(0, 5)
    assert problem_from_json(problem_to_json(problem)) == Problem(
        problem.task, problem.uid, problem.prompt, problem.reference, dict(problem.data)
    )
    bad_data = json.dumps({"task": "t", "uid": "u", "prompt": "p", "reference": "r", "data": []})
    for bad, message in (("{", "JSON"), ("[]", "object"), ('{"task": 1}', "task"), (bad_data, "data")):
        with pytest.raises(ValueError, match=message):
            problem_from_json(bad)


def test_unknown_task_and_bad_options():
    with pytest.raises(ValueError, match="valid tasks: countdown"):
        get_task("chess")
    with pytest.raises(ValueError, match="bad options"):
        get_task("countdown", colour="red")
    assert set(TASK_NAMES) == {"countdown", "sudoku", "arithmetic", "gsm8k"}


def _write_gsm8k(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_gsm8k_loader_split_and_verifier(tmp_path):
    rows = [
        {
            "question": f"Tom has {i} apples and buys {i + 2}. How many?",
            "answer": f"He has {2 * i + 2}.\n#### {2 * i + 2:,}",
        }
        for i in range(1, 300)
    ]
    file = tmp_path / "gsm8k.jsonl"
    _write_gsm8k(file, rows)
    task = get_task("gsm8k", path=str(file))
    held_out = task.eval_split(10)
    train_questions = {task.train_problem(0, i).prompt for i in range(len(task.train))}
    assert not {p.prompt for p in held_out} & train_questions
    assert len(task.train) + len(task.eval) == len(rows)
    problem = task.train_problem(0, 0)
    assert task.verify(problem, problem.reference) == 1.0
    answer = problem.data["answer"]
    assert task.verify(problem, f"Let me think.\nSo {answer}") == 1.0
    assert task.verify(problem, f"#### {int(answer):,}.0") == 1.0
    assert task.verify(problem, f"#### {int(answer) + 1}") == 0.0
    assert task.verify(problem, "no idea") == 0.0
    assert task.verify(problem, "9" * 100000) == 0.0


def test_gsm8k_errors_name_the_line(tmp_path):
    with pytest.raises(FileNotFoundError):
        get_task("gsm8k", path=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=":2:"):
        get_task("gsm8k", path=str(bad))
    no_marker = tmp_path / "nomarker.jsonl"
    no_marker.write_text(json.dumps({"question": "q", "answer": "42"}) + "\n")
    with pytest.raises(ValueError, match=r":1:.*####"):
        get_task("gsm8k", path=str(no_marker))
    with pytest.raises(ValueError, match="path"):
        get_task("gsm8k")
