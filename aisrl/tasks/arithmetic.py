"""Multi-digit arithmetic: a + b, a - b or a * b; the answer is an integer.

Invariant: the verifier accepts exactly an optional minus sign followed by digits.
"""

from __future__ import annotations

import random
import re
from typing import Any

from aisrl.tasks.base import Problem, ProceduralTask, first_line

_INTEGER = re.compile(r"-?[0-9]{1,40}")


class Arithmetic(ProceduralTask):
    name = "arithmetic"

    def __init__(self, min_digits: int = 2, max_digits: int = 3, ops: str = "+-*"):
        if not 1 <= min_digits <= max_digits <= 18:
            raise ValueError(f"need 1 <= min_digits <= max_digits <= 18, got {min_digits}, {max_digits}")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")
        self.min_digits, self.max_digits, self.ops = min_digits, max_digits, ops

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)

    def generate(self, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
        a, b, op = self._operand(rng), self._operand(rng), rng.choice(self.ops)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        key = f"{a}{op}{b}"
        return key, f"{a}{op}{b}=", str(answer), {"a": a, "b": b, "op": op, "answer": answer}

    def verify(self, problem: Problem, completion: str) -> float:
        answer = first_line(completion)
        if not _INTEGER.fullmatch(answer):
            return 0.0
        return 1.0 if int(answer) == int(problem.data["answer"]) else 0.0
