"""Countdown: reach a target with the given numbers and + - * / (each number at most once).

Prompt `Use 3 5 7 to make 22:`, reference `3*5+7`; the answer is the completion's first line.

Invariants: every generated problem is solvable (the target is the exact value of the
reference, an expression over all the numbers whose every intermediate value is a
non-negative integer) and the target is an integer in [1, max_target]. The verifier parses
the answer with `expr.evaluate` (never eval), in exact fractions, and gives 1 only when the
value equals the target and the numbers used are a sub-multiset of those given (the whole
multiset when `use_all`); anything else, garbage included, gives 0.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from aisrl.tasks.base import MAX_ANSWER_CHARS, Problem, ProceduralTask
from aisrl.tasks.expr import ExprError, evaluate


class Countdown(ProceduralTask):
    name = "countdown"
    max_generate_attempts = 10_000

    def __init__(
        self,
        num_numbers: int = 3,
        min_number: int = 1,
        max_number: int = 9,
        max_target: int = 99,
        use_all: bool = False,
        ops: str = "+-*/",
    ):
        if not 2 <= num_numbers <= 6:
            raise ValueError(f"num_numbers must be in [2, 6], got {num_numbers}")
        if not 1 <= min_number < max_number <= 999:
            raise ValueError(f"need 1 <= min_number < max_number <= 999, got {min_number}, {max_number}")
        if not 1 <= max_target <= 10**6:
            raise ValueError(f"max_target must be in [1, 1000000], got {max_target}")
        if not ops or set(ops) - set("+-*/") or len(set(ops)) != len(ops):
            raise ValueError(f"ops must be distinct characters from '+-*/', got {ops!r}")
        self.num_numbers, self.min_number, self.max_number = num_numbers, min_number, max_number
        self.max_target, self.use_all, self.ops = max_target, bool(use_all), ops

    def _expression(self, rng: random.Random, numbers: list[int]) -> tuple[str, int]:
        """A random expression over all numbers, with the fewest parentheses: (text, value)."""
        items = [(str(n), n, 3) for n in numbers]  # (text, value, precedence of the top operator; 3: atom)
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            (ta, va, pa), (tb, vb, pb) = items[i], items[j]
            if "-" in self.ops and va < vb:  # keep every intermediate value non-negative
                (ta, va, pa), (tb, vb, pb) = (tb, vb, pb), (ta, va, pa)
            allowed = [op for op in self.ops if op != "/" or (vb != 0 and va % vb == 0)]
            if not allowed:  # only '/' is allowed and it is not exact: the other order, or give up on these two
                allowed = ["/"] if va != 0 and vb % va == 0 else []
                (ta, va, pa), (tb, vb, pb) = (tb, vb, pb), (ta, va, pa)
                if not allowed:
                    return "", -1
            op = rng.choice(allowed)
            prec = 1 if op in "+-" else 2
            left = ta if pa >= prec else f"({ta})"
            # The right operand of - and / needs parentheses unless it binds tighter; + and * are associative.
            right = tb if pb > prec or (pb == prec and op in "+*") else f"({tb})"
            value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va // vb if vb else 0}[op]
            items = [it for k, it in enumerate(items) if k not in (i, j)] + [(f"{left}{op}{right}", value, prec)]
        return items[0][0], items[0][1]

    def generate(self, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
        for _ in range(self.max_generate_attempts):
            numbers = [rng.randint(self.min_number, self.max_number) for _ in range(self.num_numbers)]
            text, value = self._expression(rng, numbers)
            if 1 <= value <= self.max_target:
                break
        else:
            raise RuntimeError(
                f"countdown: no target in [1, {self.max_target}] after {self.max_generate_attempts} tries; "
                "raise max_target or change the numbers"
            )
        key = f"{sorted(numbers)}>{value}"
        prompt = f"Use {' '.join(map(str, numbers))} to make {value}:"
        data = {"numbers": numbers, "target": value, "use_all": self.use_all}
        return key, prompt, text, data

    def verify(self, problem: Problem, completion: str) -> float:
        answer = self.extract_answer(completion)
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
