"""Task interface: problems with a prompt, a reference solution, and a strict verifier.

Invariants:
- a Problem carries everything its verifier needs in `data` (JSON-serialisable), so any
  process can score a completion from the problem alone (it travels as JSON in a PromptJob);
- train problems are a deterministic function of (seed, index) and never come from the
  held-out split: procedural tasks reserve one hash bucket of their canonical problem keys
  for evaluation (`is_eval_key`), the train stream skips it and the eval split draws only
  from it, so the two splits are disjoint by construction;
- verifiers parse model output, never execute it, and never raise on it: garbage scores 0.

Completion convention: `Task.verify` takes the whole completion and applies the task's own
`extract_answer` to it. For every procedural task (countdown, sudoku, arithmetic) that is
`first_line`: the text up to the first newline, stripped of surrounding spaces; anything
after it is ignored, so generation may stop at the first newline. GSM8K differs
(`multiline_answers = True`): its answers are worked solutions that may span lines, ending
in `#### <number>`, and its extraction reads the whole completion (see `gsm8k.py`).

Prompt convention: a prompt ends in its delimiter (':' or '='), with no trailing space, and
`prompt + reference` is the text a supervised warm start trains on.
"""

from __future__ import annotations

import hashlib
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# One canonical key in EVAL_BUCKETS is held out for evaluation.
EVAL_BUCKETS = 10
# Longest first line a procedural verifier reads; longer answers score 0 without parsing.
MAX_ANSWER_CHARS = 200

_PROBLEM_FIELDS = ("task", "uid", "prompt", "reference", "data")


@dataclass(frozen=True)
class Problem:
    task: str  # task name, e.g. "countdown"
    uid: str  # stable id, e.g. "countdown/train/000123" or "countdown/eval/000007"
    prompt: str  # the exact text given to the model
    reference: str  # one correct completion (supervised warm start trains on prompt + reference)
    data: Mapping[str, Any] = field(default_factory=dict)  # JSON-serialisable payload the verifier needs


def problem_to_json(problem: Problem) -> str:
    """Compact JSON of a Problem; ValueError naming the field when its data cannot be JSON."""
    raw = {"task": problem.task, "uid": problem.uid, "prompt": problem.prompt, "reference": problem.reference,
           "data": dict(problem.data)}  # fmt: skip
    try:
        return json.dumps(raw, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"problem {problem.uid!r}: field 'data' is not JSON-serialisable ({exc})") from None


def problem_from_json(text: str | bytes) -> Problem:
    """Decodes a Problem; raises ValueError saying what is wrong."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ValueError(f"problem is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"problem must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_PROBLEM_FIELDS))
    if unknown:
        raise ValueError(f"problem has unknown fields {unknown}; expected {list(_PROBLEM_FIELDS)}")
    for name in ("task", "uid", "prompt", "reference"):
        if name not in raw:
            raise ValueError(f"problem field {name!r} is missing")
        if not isinstance(raw[name], str):
            raise ValueError(f"problem field {name!r} must be a string, got {type(raw[name]).__name__}")
    data = raw.get("data", {})
    if not isinstance(data, dict):
        raise ValueError(f"problem field 'data' must be an object, got {type(data).__name__}")
    return Problem(raw["task"], raw["uid"], raw["prompt"], raw["reference"], data)


def first_line(completion: str) -> str:
    """The answer of a first-line task: the completion up to its first newline, stripped of spaces."""
    if not isinstance(completion, str):
        return ""
    return completion.split("\n", 1)[0].strip()


def is_eval_key(key: str) -> bool:
    """Whether a canonical problem key belongs to the held-out evaluation split."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % EVAL_BUCKETS == 0


class Task(ABC):
    name: str
    # False: the answer is the first line (generation may stop at a newline); True: it may span lines.
    multiline_answers: bool = False

    @abstractmethod
    def train_problem(self, seed: int, index: int) -> Problem:
        """The index-th training problem of a seed's stream (deterministic, never held out)."""

    @abstractmethod
    def eval_split(self, n: int) -> list[Problem]:
        """The first n problems of the fixed held-out split (the same on every call; a prefix of any longer one)."""

    @abstractmethod
    def verify(self, problem: Problem, completion: str) -> float:
        """Reward in [0, 1] of a whole completion (the task extracts its answer); never raises on model output."""

    def extract_answer(self, completion: str) -> str:
        """The part of a completion the verifier reads (see the module's completion convention)."""
        return first_line(completion)


class ProceduralTask(Task):
    """A task whose problems are generated from a seeded random source; splits come from key hashing."""

    eval_seed = "held-out"
    max_draws = 1000  # per training problem: enough to skip the eval bucket (1 in EVAL_BUCKETS) for certain

    @abstractmethod
    def generate(self, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
        """(canonical key, prompt, reference, data) of one random problem; the key names its content."""

    def _problem(self, split: str, number: int, key: str, prompt: str, reference: str, data: dict) -> Problem:
        return Problem(self.name, f"{self.name}/{split}/{number:06d}", prompt, reference, data | {"key": key})

    def train_problem(self, seed: int, index: int) -> Problem:
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        for attempt in range(self.max_draws):
            rng = random.Random(f"{self.name}:{seed}:{index}:{attempt}")
            key, prompt, reference, data = self.generate(rng)
            if not is_eval_key(key):
                return self._problem("train", index, key, prompt, reference, data)
        raise RuntimeError(f"{self.name}: no training problem outside the held-out split after {self.max_draws} draws")

    def eval_split(self, n: int) -> list[Problem]:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}:{self.eval_seed}")
        seen: set[str] = set()
        problems: list[Problem] = []
        draws = 0
        while len(problems) < n:
            draws += 1
            if draws > 200 * n + 10_000:
                raise ValueError(
                    f"{self.name}: found only {len(problems)} distinct held-out problems, asked for {n} "
                    "(make the problem space larger with the task's options)"
                )
            key, prompt, reference, data = self.generate(rng)
            if is_eval_key(key) and key not in seen:
                seen.add(key)
                problems.append(self._problem("eval", len(problems), key, prompt, reference, data))
        return problems
