"""GSM8K-format problems from a local JSONL file (`{"question": ..., "answer": "... #### 42"}`).

Prompt `Q: <question>\\nA:`, reference ` <worked solution>\\n#### 42` (a leading space; the
`<<48/2=24>>` calculator annotations removed unless `keep_calculator=True`).

Invariants: nothing is downloaded; a malformed line or file is a ValueError naming the file
and line number, a missing file a FileNotFoundError naming it. The held-out split is a
deterministic hash bucket of the question text (`eval_fraction` of 1000 buckets), so train
and eval never share a question, and it is the same for every seed. Train problems come in a
seeded permutation per pass over the training records (each record once per epoch).

Answer convention (it differs from the first-line tasks: `multiline_answers = True`): the
verifier reads the whole completion, and the model's final answer is the first number after
its last `####`, or, without a `####`, the last number in the completion. Numbers are
compared exactly: '1,234', '$1,234', '1234.0' and '1234.' all equal 1234; commas count only
as thousands separators ('1,2,3' is three numbers). A completion longer than
MAX_COMPLETION_CHARS scores 0.
"""

from __future__ import annotations

import hashlib
import json
import re
from fractions import Fraction
from pathlib import Path

from aisrl.tasks.base import Problem, Task

_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", re.ASCII)  # ASCII digits only
_PLAIN_NUMBER = re.compile(r"(-?)\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\.?", re.ASCII)
_CALCULATOR = re.compile(r"<<[^<>\n]*>>")
MAX_COMPLETION_CHARS = 20_000
MAX_NUMBER_DIGITS = 30


def parse_number(text: str) -> Fraction | None:
    """'1,234', '$5', '-3.50', '42.' -> exact value; None when it is not a plain number."""
    match = _PLAIN_NUMBER.fullmatch(text.strip())
    if not match:
        return None
    digits = match.group(2).replace(",", "")
    if len(digits) > MAX_NUMBER_DIGITS + 1:
        return None
    return Fraction(match.group(1) + digits)


def final_answer(completion: str) -> Fraction | None:
    """The model's final answer (see the module's answer convention); None when there is none."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    if "####" in completion:
        match = _NUMBER.search(completion.rsplit("####", 1)[1])
        return parse_number(match.group()) if match else None
    numbers = _NUMBER.findall(completion)
    return parse_number(numbers[-1]) if numbers else None


class GSM8K(Task):
    name = "gsm8k"
    multiline_answers = True

    def __init__(self, path: str | None = None, eval_fraction: float = 0.1, keep_calculator: bool = False):
        if not path:
            raise ValueError("gsm8k needs a local JSONL file: pass path=... (task option 'path')")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"gsm8k file not found: {file}")
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{file}: not UTF-8 text ({exc})") from None
        self.path = file
        self.train: list[Problem] = []
        self.eval: list[Problem] = []
        self._orders: dict[tuple[int, int], list[int]] = {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{file}:{number}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{file}:{number}: a record must be a JSON object, got {type(row).__name__}")
            question, solution = row.get("question"), row.get("answer")
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{file}:{number}: 'question' must be a non-empty string")
            if not isinstance(solution, str) or "####" not in solution:
                raise ValueError(f"{file}:{number}: 'answer' must be a string ending in '#### <number>'")
            final = parse_number(solution.rsplit("####", 1)[1])
            if final is None:
                raise ValueError(f"{file}:{number}: the text after '####' is not a number: {solution[-40:]!r}")
            bucket = int.from_bytes(hashlib.sha256(question.strip().encode()).digest()[:8], "big") % 1000
            held_out = bucket < round(eval_fraction * 1000)
            split = "eval" if held_out else "train"
            steps = solution.rsplit("####", 1)[0].strip()
            if not keep_calculator:
                steps = _CALCULATOR.sub("", steps)
            reference = f" {steps}\n#### {_format(final)}" if steps else f" #### {_format(final)}"
            data = {"answer": str(final)}
            problem = Problem(self.name, f"gsm8k/{split}/{number:06d}", f"Q: {question.strip()}\nA:", reference, data)
            (self.eval if held_out else self.train).append(problem)
        if not self.train:
            raise ValueError(f"{file}: no training records (the file is empty, or every record is held out)")

    def _order(self, seed: int, epoch: int) -> list[int]:
        """The seeded permutation of the training records for one epoch (the latest few are kept)."""
        order = self._orders.get((seed, epoch))
        if order is None:
            keys = [hashlib.sha256(f"{seed}:{epoch}:{i}".encode()).digest() for i in range(len(self.train))]
            order = sorted(range(len(self.train)), key=keys.__getitem__)
            for stale in list(self._orders)[:-3]:
                self._orders.pop(stale, None)
            self._orders[(seed, epoch)] = order
        return order

    def train_problem(self, seed: int, index: int) -> Problem:
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        epoch, position = divmod(index, len(self.train))
        return self.train[self._order(seed, epoch)[position]]

    def eval_split(self, n: int) -> list[Problem]:
        if not 0 <= n <= len(self.eval):
            raise ValueError(f"gsm8k: asked for {n} held-out problems, {self.path} has {len(self.eval)}")
        return self.eval[:n]

    def extract_answer(self, completion: str) -> str:
        if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
            return ""
        return completion.strip()

    def verify(self, problem: Problem, completion: str) -> float:
        got = final_answer(completion)
        return 1.0 if got is not None and got == Fraction(str(problem.data["answer"])) else 0.0


def _format(value: Fraction) -> str:
    """An exact answer as GSM8K writes it: an integer, or a terminating decimal."""
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.10f}".rstrip("0")
    return text if Fraction(text) == value else str(value)
