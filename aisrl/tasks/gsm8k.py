"""GSM8K-format problems from a local JSONL file (`{"question": ..., "answer": "... #### 42"}`).

Invariants: nothing is downloaded; a malformed line is an error naming its line number; the
held-out split is a deterministic hash bucket of the question text (`eval_fraction` of the
buckets), so train and eval never share a question. The model's answer is the number after
its last `####`, or else the last number in the completion (answers may span lines).
"""

from __future__ import annotations

import hashlib
import json
import re
from fractions import Fraction
from pathlib import Path

from aisrl.tasks.base import Problem, Task

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
MAX_COMPLETION_CHARS = 20_000


def parse_number(text: str) -> Fraction | None:
    """'1,234', '$5', '-3.50' -> exact value; None when it is not a plain number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not re.fullmatch(r"-?\d{1,30}(?:\.\d{1,30})?", cleaned):
        return None
    return Fraction(cleaned)


def extract_answer(completion: str) -> Fraction | None:
    text = completion[:MAX_COMPLETION_CHARS]
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().split("\n", 1)[0]
        match = _NUMBER.search(tail)
        return parse_number(match.group()) if match else None
    numbers = _NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


class GSM8K(Task):
    name = "gsm8k"

    def __init__(self, path: str | None = None, eval_fraction: float = 0.1):
        if not path:
            raise ValueError("gsm8k needs a local JSONL file: pass path=... (task option 'path')")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"gsm8k file not found: {file}")
        self.train: list[Problem] = []
        self.eval: list[Problem] = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, solution = row["question"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{file}:{number}: not a GSM8K record ({exc})") from None
            if not isinstance(question, str) or not isinstance(solution, str) or "####" not in solution:
                raise ValueError(f"{file}:{number}: 'answer' must be a string ending in '#### <number>'")
            final = parse_number(solution.rsplit("####", 1)[1])
            if final is None:
                raise ValueError(f"{file}:{number}: the text after '####' is not a number")
            bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 1000
            held_out = bucket < eval_fraction * 1000
            split = self.eval if held_out else self.train
            uid = f"gsm8k/{'eval' if held_out else 'train'}/{number:06d}"
            reference = solution.strip()
            data = {"answer": str(final)}
            split.append(Problem(self.name, uid, f"Q: {question.strip()}\nA:", " " + reference, data))
        if not self.train:
            raise ValueError(f"{file}: no training records (every record fell in the held-out split, or none)")

    def train_problem(self, seed: int, index: int) -> Problem:
        # A seeded permutation per pass over the data, so every record is seen once per epoch.
        epoch, position = divmod(index, len(self.train))
        order = sorted(range(len(self.train)), key=lambda i: hashlib.sha256(f"{seed}:{epoch}:{i}".encode()).digest())
        return self.train[order[position]]

    def eval_split(self, n: int) -> list[Problem]:
        if n > len(self.eval):
            raise ValueError(f"gsm8k: asked for {n} held-out problems, the file has {len(self.eval)}")
        return self.eval[:n]

    def verify(self, problem: Problem, completion: str) -> float:
        try:
            got = extract_answer(completion)
        except (ValueError, ZeroDivisionError):
            return 0.0
        return 1.0 if got is not None and got == Fraction(problem.data["answer"]) else 0.0
