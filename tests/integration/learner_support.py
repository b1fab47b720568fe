"""Helpers of the learner's integration tests: a tiny model, hand-made trajectory groups, settings.

The rollout side is played by hand-made `TrajectoryGroup` messages written to the real Redis
stream: these tests test the learner, not the rollout workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aisrl import streams
from aisrl.models.config import TinyModelConfig
from aisrl.models.tiny import init_model_dir
from aisrl.models.tokenizer import encode
from aisrl.services.learner.config import LearnerSettings
from aisrl.v1 import rollout_pb2
from aisrl.wire.arrays import float32_to_bytes, int32_to_bytes

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=64)
PRINTABLE = (5, 99)  # token ids of printable characters in the character vocabulary


def tiny_model(directory: Path, seed: int = 0) -> Path:
    return init_model_dir(directory, TINY, seed=seed)


def toy_source(index: int) -> tuple[str, str]:
    """The feeder's problem source for these tests (no task module needed)."""
    return "toy", json.dumps({"index": index})


def make_group(
    run_id: str,
    job_id: str,
    version: int,
    seed: int,
    group_size: int = 4,
    lp_mu: list[np.ndarray] | None = None,
    completions: list[np.ndarray] | None = None,
) -> rollout_pb2.TrajectoryGroup:
    """A group of `group_size` samples with random completions, rewards of both kinds, plausible logprobs."""
    rng = np.random.default_rng(seed)
    prompt = np.asarray(encode(f"{seed % 97}+{seed % 13}="), dtype=np.int32)
    samples = []
    for i in range(group_size):
        comp = completions[i] if completions else rng.integers(*PRINTABLE, size=int(rng.integers(3, 9)), dtype=np.int32)
        lp = lp_mu[i] if lp_mu else -rng.uniform(3.5, 5.5, size=len(comp))
        reward = float(i % 2) if i < 2 else float(rng.integers(0, 2))
        samples.append(
            rollout_pb2.Sample(
                prompt_ids=int32_to_bytes(prompt),
                completion_ids=int32_to_bytes(np.asarray(comp, dtype=np.int32)),
                logprobs=float32_to_bytes(np.asarray(lp, dtype=np.float32)),
                text="x",
                reward=reward,
                finish_reason="length",
            )
        )
    return rollout_pb2.TrajectoryGroup(
        run_id=run_id, job_id=job_id, task="toy", problem_uid=job_id, policy_version=version, samples=samples
    )


async def put_groups(client, run_streams: streams.RunStreams, groups) -> list[str]:
    return [await streams.append(client, run_streams.trajectories, g.SerializeToString()) for g in groups]


def learner_settings(tmp_path: Path, redis_url: str, model_dir: Path, **overrides) -> LearnerSettings:
    values = dict(
        redis_url=redis_url, run_id="t", model_path=str(model_dir), work_dir=str(tmp_path / "learner"),
        batch_size=2, group_size=4, max_tokens=8, max_staleness=1, lr=1e-3, checkpoint_every=2,
        grpc_port=0, http_port=0, read_block_ms=50, seed=0, compute_dtype="float32",
    )  # fmt: skip
    values.update(overrides)
    return LearnerSettings(**values)


class ToyProblem:
    def __init__(self, index: int) -> None:
        self.task, self.uid, self.index = "toy", f"toy-{index}", index
        self.prompt = f"{index % 10}+0="
        self.reference = str(index % 10)


class ToyTask:
    """A hand-made task for evaluation mechanics: the answer is the first digit of the prompt."""

    def eval_split(self, n: int) -> list[ToyProblem]:
        return [ToyProblem(10_000 + i) for i in range(n)]

    def verify(self, problem: ToyProblem, completion: str) -> float:
        return 1.0 if completion.strip() == problem.reference else 0.0
