"""Benchmark: the learner's compute (Trainer.prepare + update) with and without its two speed levers.

One real Countdown batch shape (prompts x G completions: each problem's reference answer, shortened by
0 or 1 character, then a newline, as the rollouts' answers look), the demo model (or a random tiny
one), float32, `--threads` torch threads, the learner's default settings otherwise. Four
configurations run back to back in this process: both levers off (the learner before issue 11),
`reuse_forward` only, `share_prompts` only, both (the default). Printed: median seconds of prepare
(lp_pi) and update per step and tokens/s, and each configuration's ratio to the first. Nothing is
asserted; on a shared machine, compare the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = (
    ("separate lp_pi pass, whole rows", {"reuse_forward": False, "share_prompts": False}),
    ("reuse_forward", {"reuse_forward": True, "share_prompts": False}),
    ("share_prompts", {"reuse_forward": False, "share_prompts": True}),
    ("both (default)", {"reuse_forward": True, "share_prompts": True}),
)


def countdown_groups(step: int, batch: int, group: int, seed: int = 0) -> list:
    """Groups shaped like the rollouts' Countdown answers (module docstring)."""
    from aisrl.models.tokenizer import encode
    from aisrl.services.learner.groups import Group, SampleArrays
    from aisrl.tasks import get_task

    task, rng = get_task("countdown"), np.random.default_rng(seed + step)
    groups = []
    for i in range(batch):
        problem = task.train_problem(seed, step * batch + i)
        prompt = np.asarray(encode(problem.prompt), dtype=np.int32)
        samples = []
        for _ in range(group):
            text = problem.reference[: max(1, len(problem.reference) - int(rng.integers(0, 2)))] + "\n"
            completion = np.asarray(encode(text)[1:], dtype=np.int32)  # no <bos> inside a completion
            lp_mu = np.full(len(completion), -0.5, dtype=np.float32)
            samples.append(SampleArrays(prompt, completion, lp_mu, float(rng.integers(0, 2))))
        groups.append(Group(str(i), f"p{i}-a0", 0, tuple(samples)))
    return groups


def run(model_dir: Path, levers: dict, args: argparse.Namespace) -> tuple[float, float, int]:
    """Median (prepare s, update s, tokens) over the timed steps (the first step warms up)."""
    import torch

    from aisrl.models.tiny import load_model
    from aisrl.services.learner.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    trainer = Trainer(load_model(model_dir, dtype=torch.float32), TrainConfig(lr=1e-4, compute_dtype="float32",
                                                                             **levers))  # fmt: skip
    rows = []
    for step in range(args.steps + 1):
        groups = countdown_groups(step, args.batch, args.group)
        t0 = time.perf_counter()
        prepared = trainer.prepare(groups)
        t1 = time.perf_counter()
        trainer.update(prepared, np.ones(prepared.n_tokens))
        if step:
            rows.append((t1 - t0, time.perf_counter() - t1, prepared.n_tokens))
    return tuple(statistics.median(r[k] for r in rows) for k in range(3))  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the cluster's learner has 1)")
    parser.add_argument("--model", default="auto", help="as bench_cluster: demo, tiny, a directory or auto")
    args = parser.parse_args(argv or [])

    import torch

    from bench.common import resolve_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="aisrl-bench-trainer-") as tmp:
        model_dir, label = resolve_model(args.model, Path(tmp))
        print(f"[learner compute, {args.batch} x {args.group} Countdown-shaped samples, model {label}, float32, "
              f"{args.threads} thread(s)]")  # fmt: skip
        first = None
        for name, levers in CONFIGS:
            prepare, update, tokens = run(model_dir, levers, args)
            rate = tokens / (prepare + update)
            first = first or rate
            print(f"  {name:<34} prepare {prepare:6.3f} s, update {update:6.3f} s, {rate:8,.0f} tokens/s "
                  f"({rate / first:.2f}x)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
