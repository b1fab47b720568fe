"""4x4 Sudoku: every valid grid is reachable, the verifier needs a valid grid that keeps the clues."""

from __future__ import annotations

from collections import Counter

from aisrl.tasks import Problem, get_task
from aisrl.tasks.sudoku import ALL_GRIDS, is_valid_solution

SOLUTION = "1234341221434321"


def _problem(puzzle, partial_credit=False):
    return Problem("sudoku", "u", "", "", {"puzzle": puzzle, "partial_credit": partial_credit})


def test_known_answers():
    task = get_task("sudoku")
    problem = _problem("1.3434.2.1434.21")
    for right in ("1234/3412/2143/4321", SOLUTION, "1234 3412 2143 4321", " 1234/3412/2143/4321 \nok"):
        assert task.verify(problem, right) == 1.0, right
    for wrong in (
        "1234/3412/2143/4312",  # invalid grid
        "1234/3412/2143/432",  # 15 digits
        "1234/3412/2143/43211",  # 17 digits
        "1234/3412/2143/432.",  # a blank left
        "1234|3412|2143|4321",
        "１２３４/3412/2143/4321",  # full-width digits
        "1234/3412/2143/4321/" * 3,
    ):
        assert task.verify(problem, wrong) == 0.0, wrong
    assert task.verify(_problem("2..............."), "1234/3412/2143/4321") == 0.0  # valid, but breaks a clue
    several = _problem("12..34..........")  # many completions: any valid one that keeps the clues counts
    assert task.verify(several, SOLUTION) == 1.0
    assert task.verify(several, "1243/3421/2134/4312") == 1.0


def test_partial_credit_is_off_by_default_and_never_rewards_a_broken_clue():
    task = get_task("sudoku")
    puzzle = "1..4............"
    assert task.verify(_problem(puzzle), "1234/1234/1234/1234") == 0.0  # rows fine, columns and boxes not
    partial = task.verify(_problem(puzzle, partial_credit=True), "1234/1234/1234/1234")
    assert partial == 4 / 12  # the four rows
    assert task.verify(_problem(puzzle, partial_credit=True), "4321/1234/1234/1234") == 0.0  # breaks a clue
    assert task.verify(_problem(puzzle, partial_credit=True), SOLUTION) == 1.0
    generated = get_task("sudoku", partial_credit=True).train_problem(0, 0)
    assert generated.data["partial_credit"] is True
    assert get_task("sudoku").train_problem(0, 0).data["partial_credit"] is False


def test_every_valid_grid_is_reachable():
    assert len(ALL_GRIDS) == len(set(ALL_GRIDS)) == 288
    assert all(is_valid_solution(g) for g in ALL_GRIDS)
    task = get_task("sudoku")
    solutions = Counter(task.train_problem(0, i).reference.replace("/", "") for i in range(4000))
    assert set(solutions) <= set(ALL_GRIDS)
    assert len(solutions) >= 280  # uniform over 288: about 0.03 expected missing after 4000 draws


def test_blanks_follow_the_options():
    task = get_task("sudoku", min_blanks=8, max_blanks=10)
    for i in range(100):
        problem = task.train_problem(1, i)
        puzzle = problem.data["puzzle"]
        assert 8 <= puzzle.count(".") <= 10
        assert problem.prompt == "Sudoku " + "/".join(puzzle[k : k + 4] for k in range(0, 16, 4)) + ":"
        assert problem.data["key"] == puzzle
        assert all(p in (".", s) for p, s in zip(puzzle, problem.reference.replace("/", ""), strict=True))
