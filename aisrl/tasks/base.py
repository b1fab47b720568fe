"""Task interface: problems with a prompt, a reference solution, and a strict verifier.

Invariants:
- a Problem carries everything its verifier needs in `data` (JSON-serialisable), so any
  process can score a completion from the problem alone (it travels as JSON in a PromptJob);
- train problems are a deterministic function of (seed, index) and never come from the
  held-out split: procedural tasks reserve a hash bucket of their canonical problem keys for
  evaluation (`is_eval_key`), so the two splits are disjoint by construction;
- verifiers parse model output, never execute it, and never raise on it: garbage scores 0.

Completion convention: the answer is the completion up to its first newline, stripped of
surrounding spaces (`first_line`); anything after it is ignored. GSM8K answers may span lines
and use their own extraction (see `gsm8k.py`).
"""

from __future__ import annotations

import hashlib
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# One key in EVAL_BUCKETS is held out for evaluation.
EVAL_BUCKETS = 10
MAX_ANSWER_CHARS = 200


@dataclass(frozen=True)
class Problem:
    task: str
    uid: str
    prompt: str
    reference: str
    data: Mapping[str, Any] = field(default_factory=dict)


def problem_to_json(problem: Problem) -> str:
    return json.dumps(
        {"task": problem.task, "uid": problem.uid, "prompt": problem.prompt, "reference": problem.reference,
         "data": dict(problem.data)},
        separators=(",", ":"),
    )  # fmt: skip


def problem_from_json(text: str | bytes) -> Problem:
    """Decodes a Problem; raises ValueError saying what is wrong."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"problem is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"problem must be a JSON object, got {type(raw).__name__}")
    for name in ("task", "uid", "prompt", "reference"):
        if not isinstance(raw.get(name), str):
            raise ValueError(f"problem field {name!r} must be a string")
    data = raw.get("data", {})
    if not isinstance(data, dict):
        raise ValueError("problem field 'data' must be an object")
    return Problem(raw["task"], raw["uid"], raw["prompt"], raw["reference"], data)


def first_line(completion: str) -> str:
    return completion.split("\n", 1)[0].strip()


def is_eval_key(key: str) -> bool:
    """Whether a canonical problem key belongs to the held-out evaluation split."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % EVAL_BUCKETS == 0


class Task(ABC):
    name: str

    @abstractmethod
    def train_problem(self, seed: int, index: int) -> Problem:
        """The index-th training problem of a seed's stream (deterministic, never held out)."""

    @abstractmethod
    def eval_split(self, n: int) -> list[Problem]:
        """The first n problems of the fixed held-out split (the same on every call)."""

    @abstractmethod
    def verify(self, problem: Problem, completion: str) -> float:
        """Reward in [0, 1] of a completion; never raises on model output."""


class ProceduralTask(Task):
    """A task whose problems are generated from a random source; splits come from key hashing."""

    eval_seed = "held-out"

    @abstractmethod
    def generate(self, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
        """(canonical key, prompt, reference, data) of one random problem."""

    def _problem(self, split: str, number: int, key: str, prompt: str, reference: str, data: dict) -> Problem:
        return Problem(self.name, f"{self.name}/{split}/{number:06d}", prompt, reference, data | {"key": key})

    def train_problem(self, seed: int, index: int) -> Problem:
        for attempt in range(1000):
            rng = random.Random(f"{self.name}:{seed}:{index}:{attempt}")
            key, prompt, reference, data = self.generate(rng)
            if not is_eval_key(key):
                return self._problem("train", index, key, prompt, reference, data)
        raise RuntimeError(f"{self.name}: no training problem outside the held-out split after 1000 draws")

    def eval_split(self, n: int) -> list[Problem]:
        rng = random.Random(f"{self.name}:{self.eval_seed}")
        seen: set[str] = set()
        problems: list[Problem] = []
        draws = 0
        while len(problems) < n:
            draws += 1
            if draws > 200 * n + 10_000:
                raise ValueError(f"{self.name}: only {len(problems)} distinct held-out problems exist, asked for {n}")
            key, prompt, reference, data = self.generate(rng)
            if is_eval_key(key) and key not in seen:
                seen.add(key)
                problems.append(self._problem("eval", len(problems), key, prompt, reference, data))
        return problems
