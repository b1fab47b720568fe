"""4x4 Sudoku (digits 1-4; each row, column and 2x2 box holds 1-4 once). The answer is the full grid.

Prompt `Sudoku 1.34/34.2/.143/4.21:` (rows joined by '/', '.' for a blank), reference
`1234/3412/2143/4321`; the answer is the completion's first line, written as 16 digits or as
rows separated by '/' or spaces.

Invariants: the solution grid is drawn uniformly from all 288 valid 4x4 grids and the blanks
uniformly from the cells; the canonical key is the puzzle itself. The verifier gives 1 only
to a complete valid grid that keeps every given clue (a puzzle with several solutions accepts
any of them). With `partial_credit` (off by default) a grid of 16 digits 1-4 that keeps every
clue earns the fraction of its 12 rows, columns and boxes that are valid; a grid that breaks
a clue or is malformed always earns 0.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from aisrl.tasks.base import Problem, ProceduralTask

_UNITS = (
    [[(r, c) for c in range(4)] for r in range(4)]
    + [[(r, c) for r in range(4)] for c in range(4)]
    + [[(br + r, bc + c) for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)]
)
_MAX_ANSWER_CHARS = 40


def _unit_ok(grid: str, unit: list[tuple[int, int]]) -> bool:
    return {grid[4 * r + c] for r, c in unit} == set("1234")


def is_valid_solution(grid: str) -> bool:
    """Whether grid is 16 characters forming a complete valid 4x4 Sudoku."""
    if len(grid) != 16 or set(grid) - set("1234"):
        return False
    return all(_unit_ok(grid, unit) for unit in _UNITS)


def _all_grids() -> tuple[str, ...]:
    """Every valid 4x4 grid (288), in lexicographic order: rows are permutations, pruned row by row."""
    perms = ["".join(p) for p in itertools.permutations("1234")]

    def extend(grid: str) -> list[str]:
        if len(grid) == 16:
            return [grid]
        out = []
        for row in perms:
            candidate = grid + row
            r = len(grid) // 4
            cols_ok = all(len({candidate[4 * k + c] for k in range(r + 1)}) == r + 1 for c in range(4))
            boxes_ok = r % 2 == 0 or all(
                len({candidate[4 * (r - 1) + c], candidate[4 * (r - 1) + c + 1], row[c], row[c + 1]}) == 4
                for c in (0, 2)
            )
            if cols_ok and boxes_ok:
                out.extend(extend(candidate))
        return out

    grids = tuple(extend(""))
    assert len(grids) == 288 and all(map(is_valid_solution, grids))
    return grids


ALL_GRIDS = _all_grids()


def rows(grid: str) -> str:
    return "/".join(grid[i : i + 4] for i in range(0, 16, 4))


class Sudoku(ProceduralTask):
    name = "sudoku"

    def __init__(self, min_blanks: int = 4, max_blanks: int = 6, partial_credit: bool = False):
        if not 1 <= min_blanks <= max_blanks <= 12:
            raise ValueError(f"need 1 <= min_blanks <= max_blanks <= 12, got {min_blanks}, {max_blanks}")
        self.min_blanks, self.max_blanks, self.partial_credit = min_blanks, max_blanks, bool(partial_credit)

    def generate(self, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
        solution = rng.choice(ALL_GRIDS)
        blanks = set(rng.sample(range(16), rng.randint(self.min_blanks, self.max_blanks)))
        puzzle = "".join("." if i in blanks else ch for i, ch in enumerate(solution))
        data = {"puzzle": puzzle, "partial_credit": self.partial_credit}
        return puzzle, f"Sudoku {rows(puzzle)}:", rows(solution), data

    def verify(self, problem: Problem, completion: str) -> float:
        answer = self.extract_answer(completion)
        if len(answer) > _MAX_ANSWER_CHARS:
            return 0.0
        grid = "".join(ch for ch in answer if ch not in "/ ")
        if len(grid) != 16 or set(grid) - set("1234"):
            return 0.0
        puzzle = str(problem.data["puzzle"])
        if len(puzzle) != 16 or not all(p in (".", g) for p, g in zip(puzzle, grid, strict=True)):
            return 0.0
        valid_units = sum(_unit_ok(grid, unit) for unit in _UNITS)
        if valid_units == len(_UNITS):
            return 1.0
        return valid_units / len(_UNITS) if problem.data.get("partial_credit") else 0.0
