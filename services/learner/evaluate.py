"""Held-out evaluation of the policy: greedy accuracy and sampled accuracy on the task's eval split.

Invariant: evaluation never changes the training state: it runs with no grad on the learner's own
model, leaves the model in the mode it found it in, and samples inside a forked RNG seeded per
evaluation, so training randomness is the same with or without evaluation. Completions stop at
the first newline or EOS for first-line tasks, at EOS only for tasks whose answers span lines
(`multiline_answers`); the task's verifier scores the whole completion (it extracts its answer
itself, aisrl.tasks.base). Accuracy is the share of completions with reward >= 1.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aisrl.services.rollout.engine import newline_token_ids


@dataclass(frozen=True)
class EvalResult:
    greedy_accuracy: float
    greedy_reward: float
    sampled_accuracy: float | None  # None when no samples were asked for
    sampled_reward: float | None
    n_problems: int
    seconds: float


class Evaluator:
    def __init__(self, tokenizer: Any, task: Any, problems: Sequence[Any], max_tokens: int, temperature: float,
                 samples: int, seed: int, compute_dtype: str = "bfloat16", batch_size: int = 64) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # batched generation
        self.task = task
        self.problems = list(problems)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.samples = samples
        self.seed = seed
        self.compute_dtype = compute_dtype
        self.batch_size = batch_size
        newlines = [] if getattr(task, "multiline_answers", False) else newline_token_ids(tokenizer)
        self.stop_ids = sorted({*newlines, tokenizer.eos_token_id} - {None})

    def _generate(self, model: torch.nn.Module, prompts: list[str], n: int, greedy: bool) -> list[str]:
        device = next(model.parameters()).device
        tok = self.tokenizer
        out: list[str] = []
        autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if self.compute_dtype == "bfloat16"
            else contextlib.nullcontext()
        )
        for start in range(0, len(prompts), self.batch_size):
            batch = tok(prompts[start : start + self.batch_size], return_tensors="pt", padding=True).to(device)
            # top_k=0 turns off transformers' default top-k of 50: sample from the full tempered distribution.
            kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": self.temperature,
                                                          "top_k": 0, "top_p": 1.0}  # fmt: skip
            with autocast:
                seqs = model.generate(
                    **batch, **kwargs, num_return_sequences=n, max_new_tokens=self.max_tokens,
                    eos_token_id=self.stop_ids, pad_token_id=tok.pad_token_id,
                )  # fmt: skip
            width = batch["input_ids"].shape[1]
            out.extend(tok.batch_decode(seqs[:, width:], skip_special_tokens=True))
        return out

    def _score(self, problems: Sequence[Any], texts: Sequence[str], n: int) -> tuple[float, float]:
        rewards = [float(self.task.verify(problems[i // n], t)) for i, t in enumerate(texts)]
        return sum(r >= 1.0 for r in rewards) / len(rewards), sum(rewards) / len(rewards)

    @torch.no_grad()
    def run(self, model: torch.nn.Module, step: int) -> EvalResult:
        started = time.perf_counter()
        prompts = [p.prompt for p in self.problems]
        was_training = model.training
        model.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed + step)
                greedy = self._score(self.problems, self._generate(model, prompts, 1, greedy=True), 1)
                sampled = None
                if self.samples > 0:
                    texts = self._generate(model, prompts, self.samples, greedy=False)
                    sampled = self._score(self.problems, texts, self.samples)
        finally:
            model.train(was_training)
        return EvalResult(
            greedy[0], greedy[1], sampled[0] if sampled else None, sampled[1] if sampled else None,
            len(self.problems), time.perf_counter() - started,
        )  # fmt: skip
