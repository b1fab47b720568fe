"""Procedural tasks with strict verifiers and seeded, disjoint train/eval splits (one home).

Invariant: `get_task(name, **options)` is the only way services build a task, so a task name
and its options (JSON-able keyword arguments) fully determine its problems and verifier.
"""

from __future__ import annotations

from typing import Any

from aisrl.tasks.arithmetic import Arithmetic
from aisrl.tasks.base import Problem, Task, first_line, is_eval_key, problem_from_json, problem_to_json
from aisrl.tasks.countdown import Countdown
from aisrl.tasks.gsm8k import GSM8K
from aisrl.tasks.sudoku import Sudoku

TASKS: dict[str, type[Task]] = {"countdown": Countdown, "sudoku": Sudoku, "arithmetic": Arithmetic, "gsm8k": GSM8K}
TASK_NAMES = tuple(TASKS)


def get_task(name: str, **options: Any) -> Task:
    """The task called name, built with its options; a clear error for an unknown name or option."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    try:
        return TASKS[name](**options)
    except TypeError as exc:
        raise ValueError(f"bad options for task {name!r}: {exc}") from None


__all__ = [
    "GSM8K",
    "TASKS",
    "TASK_NAMES",
    "Arithmetic",
    "Countdown",
    "Problem",
    "Sudoku",
    "Task",
    "first_line",
    "get_task",
    "is_eval_key",
    "problem_from_json",
    "problem_to_json",
]
