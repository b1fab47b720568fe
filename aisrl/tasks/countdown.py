"""Countdown: reach a target with the given numbers and + - * / (each number at most once).

Invariant: every generated problem is solvable (the target is the value of the reference
expression built from the numbers) and the target is a positive integer.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from aisrl.tasks.base import MAX_ANSWER_CHARS, Problem, ProceduralTask, first_line
from aisrl.tasks.expr import ExprError, evaluate


class Countdown(ProceduralTask):
    name = "countdown"

    def __init__(self, num_numbers: int = 3, max_number: int = 9, max_target: int = 99, use_all: bool = False):
        if not 2 <= num_numbers <= 6:
            raise ValueError(f"num_numbers must be in [2, 6], got {num_numbers}")
        if max_number < 2 or max_target < 1:
            raise ValueError("max_number must be >= 2 and max_target >= 1")
        self.num_numbers, self.max_number, self.max_target, self.use_all = num_numbers, max_number, max_target, use_all

    def _expression(self, rng: random.Random, numbers: list[int]) -> tuple[str, int, int]:
        """A random expression over all numbers: (text, value, precedence of its top operator)."""
        items = [(str(n), n, 3) for n in numbers]
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            (ta, va, pa), (tb, vb, pb) = items[i], items[j]
            op = rng.choice("+-*/" if vb != 0 and va % vb == 0 else "+-*")
            if op == "-" and va < vb:
                (ta, va, pa), (tb, vb, pb) = (tb, vb, pb), (ta, va, pa)
            prec = 1 if op in "+-" else 2
            left = ta if pa >= prec else f"({ta})"
            # The right operand of - and / (and of * over a sum) needs parentheses unless it binds tighter.
            right = tb if pb > prec or (pb == prec and op in "+*") else f"({tb})"
            value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va // vb if vb else 0}[op]
            items = [it for k, it in enumerate(items) if k not in (i, j)] + [(f"{left}{op}{right}", value, prec)]
        return items[0]

    def generate(self, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
            text, value, _ = self._expression(rng, numbers)
            if 1 <= value <= self.max_target:
                break
        shown = " ".join(map(str, numbers))
        key = f"{sorted(numbers)}>{value}"
        prompt = f"Use {shown} to make {value}: "
        data = {"numbers": numbers, "target": value, "use_all": self.use_all}
        return key, prompt, text, data

    def verify(self, problem: Problem, completion: str) -> float:
        answer = first_line(completion)
        if not answer or len(answer) > MAX_ANSWER_CHARS:
            return 0.0
        try:
            value, used = evaluate(answer)
        except ExprError:
            return 0.0
        given = Counter(int(n) for n in problem.data["numbers"])
        if Counter(used) - given:  # a number not given, or used more often than given
            return 0.0
        if problem.data.get("use_all") and Counter(used) != given:
            return 0.0
        return 1.0 if value == int(problem.data["target"]) else 0.0
