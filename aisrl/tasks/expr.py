"""A strict parser and exact evaluator for arithmetic answers (+ - * / and parentheses).

Invariant: model output is parsed, never executed; evaluation uses exact fractions, and every
failure (bad syntax, division by zero, nesting too deep, numbers too large) is an ExprError.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

MAX_DEPTH = 32
MAX_DIGITS = 9


class ExprError(ValueError):
    pass


@dataclass
class _Parser:
    text: str
    pos: int = 0
    depth: int = 0

    def peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expr(self, numbers: list[int]) -> Fraction:
        value = self.term(numbers)
        while self.peek() in ("+", "-"):
            op = self.text[self.pos]
            self.pos += 1
            rhs = self.term(numbers)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, numbers: list[int]) -> Fraction:
        value = self.atom(numbers)
        while self.peek() in ("*", "/"):
            op = self.text[self.pos]
            self.pos += 1
            rhs = self.atom(numbers)
            if op == "*":
                value *= rhs
            elif rhs == 0:
                raise ExprError("division by zero")
            else:
                value /= rhs
        return value

    def atom(self, numbers: list[int]) -> Fraction:
        ch = self.peek()
        if ch == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExprError("parentheses nested too deep")
            self.pos += 1
            value = self.expr(numbers)
            if self.peek() != ")":
                raise ExprError("unbalanced parentheses")
            self.pos += 1
            self.depth -= 1
            return value
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isascii() and self.text[self.pos].isdigit():
            self.pos += 1
        digits = self.text[start : self.pos]
        if not digits:
            raise ExprError(f"expected a number at position {start}")
        if len(digits) > MAX_DIGITS:
            raise ExprError("number too large")
        numbers.append(int(digits))
        return Fraction(int(digits))


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """The exact value of an expression and the numbers it uses, in order."""
    parser = _Parser(text)
    numbers: list[int] = []
    value = parser.expr(numbers)
    if parser.peek() != "":
        raise ExprError(f"unexpected {parser.peek()!r} at position {parser.pos}")
    return value, numbers
