"""A strict parser and exact evaluator for arithmetic answers (+ - * /, unary minus, parentheses).

Invariant: model output is parsed, never executed. The grammar is

    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/') factor)*
    factor := '-'? atom
    atom   := NUMBER | '(' expr ')'
    NUMBER := '0' | [1-9][0-9]*          (ASCII digits, at most MAX_DIGITS, no leading zeros)

with spaces allowed between tokens. Evaluation uses exact fractions, and every failure (bad
syntax, input longer than MAX_CHARS, parentheses nested deeper than MAX_DEPTH, a literal or an
intermediate value too large, division by zero) is an ExprError; nothing else escapes, so a
caller that catches ExprError never raises on model output. Recursion depth is bounded by
MAX_DEPTH, and the work by MAX_CHARS, whatever the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

MAX_CHARS = 200
MAX_DEPTH = 32
MAX_DIGITS = 9
MAX_VALUE_BITS = 2048  # |numerator| and denominator of every intermediate value


class ExprError(ValueError):
    pass


def _checked(value: Fraction) -> Fraction:
    if value.numerator.bit_length() > MAX_VALUE_BITS or value.denominator.bit_length() > MAX_VALUE_BITS:
        raise ExprError("intermediate value too large")
    return value


@dataclass
class _Parser:
    text: str
    numbers: list[int]
    pos: int = 0
    depth: int = 0

    def peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.text[self.pos]
            self.pos += 1
            rhs = self.term()
            value = _checked(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.text[self.pos]
            self.pos += 1
            rhs = self.factor()
            if op == "/" and rhs == 0:
                raise ExprError("division by zero")
            value = _checked(value * rhs if op == "*" else value / rhs)
        return value

    def factor(self) -> Fraction:
        if self.peek() == "-":
            self.pos += 1
            return -self.atom()
        return self.atom()

    def atom(self) -> Fraction:
        ch = self.peek()
        if ch == "(":
            if self.depth >= MAX_DEPTH:
                raise ExprError("parentheses nested too deep")
            self.depth += 1
            self.pos += 1
            value = self.expr()
            if self.peek() != ")":
                raise ExprError(f"unbalanced parentheses at position {self.pos}")
            self.pos += 1
            self.depth -= 1
            return value
        start = self.pos
        while self.pos < len(self.text) and "0" <= self.text[self.pos] <= "9":
            self.pos += 1
        digits = self.text[start : self.pos]
        if not digits:
            raise ExprError(f"expected a number at position {start}")
        if len(digits) > MAX_DIGITS:
            raise ExprError(f"number at position {start} has more than {MAX_DIGITS} digits")
        if len(digits) > 1 and digits[0] == "0":
            raise ExprError(f"number at position {start} has a leading zero")
        self.numbers.append(int(digits))
        return Fraction(int(digits))


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """The exact value of an expression and the numbers it uses, in order; ExprError if it is not one."""
    if not isinstance(text, str):
        raise ExprError(f"expected a string, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise ExprError(f"expression longer than {MAX_CHARS} characters")
    parser = _Parser(text, [])
    value = parser.expr()
    if parser.peek() != "":
        raise ExprError(f"unexpected {parser.peek()!r} at position {parser.pos}")
    return value, parser.numbers
