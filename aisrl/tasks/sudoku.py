"""4x4 Sudoku (digits 1-4; rows, columns and 2x2 boxes). The answer is the full grid.

Invariant: the verifier gives 1 only to a complete valid grid that keeps every given clue;
the grid may be written as 16 digits or as rows separated by '/' or spaces.
"""

from __future__ import annotations

import random
from typing import Any

from aisrl.tasks.base import Problem, ProceduralTask, first_line

_BASE = [[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]]
_UNITS = (
    [[(r, c) for c in range(4)] for r in range(4)]
    + [[(r, c) for r in range(4)] for c in range(4)]
    + [[(br + r, bc + c) for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)]
)


def _rows(grid: str) -> str:
    return "/".join(grid[i : i + 4] for i in range(0, 16, 4))


def is_valid_solution(grid: str) -> bool:
    if len(grid) != 16 or set(grid) - set("1234"):
        return False
    return all({grid[4 * r + c] for r, c in unit} == set("1234") for unit in _UNITS)


class Sudoku(ProceduralTask):
    name = "sudoku"

    def __init__(self, min_blanks: int = 4, max_blanks: int = 6):
        if not 1 <= min_blanks <= max_blanks <= 12:
            raise ValueError(f"need 1 <= min_blanks <= max_blanks <= 12, got {min_blanks}, {max_blanks}")
        self.min_blanks, self.max_blanks = min_blanks, max_blanks

    def _solution(self, rng: random.Random) -> str:
        digits = rng.sample([1, 2, 3, 4], 4)
        bands = rng.sample([0, 2], 2)
        rows = [b + r for b in bands for r in rng.sample([0, 1], 2)]
        stacks = rng.sample([0, 2], 2)
        cols = [s + c for s in stacks for c in rng.sample([0, 1], 2)]
        grid = [[_BASE[r][c] for c in cols] for r in rows]
        if rng.random() < 0.5:
            grid = [list(row) for row in zip(*grid, strict=True)]
        return "".join(str(digits[v - 1]) for row in grid for v in row)

    def generate(self, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
        solution = self._solution(rng)
        blanks = set(rng.sample(range(16), rng.randint(self.min_blanks, self.max_blanks)))
        puzzle = "".join("." if i in blanks else ch for i, ch in enumerate(solution))
        return puzzle, f"Sudoku {_rows(puzzle)}: ", _rows(solution), {"puzzle": puzzle}

    def verify(self, problem: Problem, completion: str) -> float:
        answer = first_line(completion)
        if len(answer) > 40:
            return 0.0
        grid = "".join(ch for ch in answer if ch not in "/ ")
        if not is_valid_solution(grid):
            return 0.0
        puzzle = str(problem.data["puzzle"])
        return 1.0 if all(p in (".", g) for p, g in zip(puzzle, grid, strict=True)) else 0.0
