"""Held-out accuracy of the initial policy (step 0), measured exactly as the learner measures it later.

Invariant: the same evaluator class, problems, token limit, temperature, samples, seed and compute
precision as the learner's own evaluations (`services/learner/evaluate.py`, step 0), on the weights
the learner starts from, so "initial" and "final" accuracy in the report are one measurement taken
at two points. The result is cached in the run directory: a resumed run keeps its step-0 figure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def evaluate_initial(learner_settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """Greedy and sampled held-out accuracy of `model_path` at step 0; None when the learner never evaluates."""
    from aisrl.services.learner.config import LearnerSettings

    settings = LearnerSettings(**learner_settings)
    if settings.eval_every == 0:
        return None
    import torch
    import transformers
    from transformers import AutoTokenizer

    from aisrl.models.tiny import load_model
    from aisrl.services.learner.evaluate import Evaluator
    from aisrl.tasks import get_task

    started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()  # no loading bars in the cluster's display
    task = get_task(settings.task, **settings.task_options)
    tokenizer = AutoTokenizer.from_pretrained(settings.model_path, local_files_only=True)
    model = load_model(settings.model_path, dtype=torch.float32)  # the learner's master weights
    s = settings
    evaluator = Evaluator(tokenizer, task, task.eval_split(s.eval_size), s.max_tokens, s.temperature, s.eval_samples,
                          s.seed, s.compute_dtype)  # fmt: skip
    result = evaluator.run(model, step=0)
    return {
        "step": 0, "greedy": result.greedy_accuracy, "sampled": result.sampled_accuracy, "n": result.n_problems,
        "greedy_reward": result.greedy_reward, "sampled_reward": result.sampled_reward,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip


def cached_initial(path: Path, learner_settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The step-0 evaluation from path when it was taken with the same model and evaluation settings, else a new one."""
    from aisrl.services.learner.config import LearnerSettings

    keys = {"model_path", "task", "task_options", "eval_every", "eval_size", "eval_samples", "max_tokens",
            "temperature", "seed", "compute_dtype"}  # fmt: skip
    identity = LearnerSettings(**learner_settings).model_dump(mode="json", include=keys)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("identity") == identity:
            return saved.get("result")
    result = evaluate_initial(learner_settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"identity": identity, "result": result}, indent=2) + "\n")
    return result
