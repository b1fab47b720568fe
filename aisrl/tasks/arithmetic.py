"""Multi-digit arithmetic: a+b, a-b or a*b; the answer is an integer.

Prompt `47+385=`, reference `432`; the answer is the completion's first line.

Invariants: the verifier accepts exactly the canonical decimal form of an integer (an optional
'-' then ASCII digits, no leading zeros, no '-0', at most 40 digits) and gives 1 only when it
equals the exact result. The canonical key of a commutative problem orders its operands, so
`12+34` and `34+12` always fall in the same split.
"""

from __future__ import annotations

import random
import re
from typing import Any

from aisrl.tasks.base import Problem, ProceduralTask

_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]{0,39})")


class Arithmetic(ProceduralTask):
    name = "arithmetic"

    def __init__(self, min_digits: int = 2, max_digits: int = 3, ops: str = "+-*"):
        if not 1 <= min_digits <= max_digits <= 18:
            raise ValueError(f"need 1 <= min_digits <= max_digits <= 18, got {min_digits}, {max_digits}")
        if not ops or set(ops) - set("+-*") or len(set(ops)) != len(ops):
            raise ValueError(f"ops must be distinct characters from '+-*', got {ops!r}")
        self.min_digits, self.max_digits, self.ops = min_digits, max_digits, ops

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)

    def generate(self, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
        a, b, op = self._operand(rng), self._operand(rng), rng.choice(self.ops)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        key = f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else f"{a}{op}{b}"
        return key, f"{a}{op}{b}=", str(answer), {"a": a, "b": b, "op": op, "answer": answer}

    def verify(self, problem: Problem, completion: str) -> float:
        answer = self.extract_answer(completion)
        if not _INTEGER.fullmatch(answer) or answer == "-0":
            return 0.0
        return 1.0 if int(answer) == int(problem.data["answer"]) else 0.0
