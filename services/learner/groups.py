"""Trajectory groups as the trainer uses them: decoded, validated arrays.

Invariant: a group either decodes completely (every sample with its prompt ids, at least one
completion token, exactly one finite, non-positive rollout logprob per completion token, and a
finite reward) or raises `InvalidGroup` with a reason; the batcher dead-letters it. Logprobs are
never repaired or replaced by zeros (docs/ais.md, "Broken logits are rejected").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from aisrl.v1 import rollout_pb2
from aisrl.wire.arrays import WireArrayError, bytes_to_float32, bytes_to_int32

# The rollout engines' tolerance for a sampled token's logprob above 0 (float32 rounding).
ROLLOUT_LOGPROB_SLACK = 1e-4


class InvalidGroup(ValueError):
    """A trajectory group that cannot be trained on; `kind` labels the metric, `reason` says why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class SampleArrays:
    prompt_ids: np.ndarray  # int32
    completion_ids: np.ndarray  # int32, >= 1 token
    lp_mu: np.ndarray  # float32, one per completion token
    reward: float


@dataclass(frozen=True)
class Group:
    """One decoded group and the stream entry it came from."""

    entry_id: str
    job_id: str
    policy_version: int
    samples: tuple[SampleArrays, ...]
    rounded: int = 0  # rollout logprobs in (0, slack] used as 0

    @property
    def rewards(self) -> np.ndarray:
        return np.array([s.reward for s in self.samples], dtype=np.float64)

    @property
    def n_tokens(self) -> int:
        return sum(len(s.completion_ids) for s in self.samples)


def parse_group(payload: bytes | None, run_id: str) -> rollout_pb2.TrajectoryGroup:
    """The protobuf of a stream entry, or InvalidGroup."""
    if payload is None:
        raise InvalidGroup("payload", "entry has no 'pb' field")
    try:
        pb = rollout_pb2.TrajectoryGroup.FromString(payload)
    except DecodeError as exc:
        raise InvalidGroup("protobuf", f"payload is not a TrajectoryGroup protobuf: {exc}") from None
    if pb.run_id != run_id:
        raise InvalidGroup("run", f"run_id {pb.run_id!r} is not this learner's run {run_id!r}")
    return pb


def decode_group(
    entry_id: str, pb: rollout_pb2.TrajectoryGroup, vocab_size: int | None = None, max_length: int | None = None
) -> Group:
    """The arrays of a group (module invariant); token ids are checked against vocab_size and the
    prompt + completion length against max_length (the model's context) when given."""
    if not pb.samples:
        raise InvalidGroup("samples", "group has no samples")
    samples = []
    rounded = 0
    for i, s in enumerate(pb.samples):
        try:
            prompt = bytes_to_int32(s.prompt_ids, f"samples[{i}].prompt_ids")
            completion = bytes_to_int32(s.completion_ids, f"samples[{i}].completion_ids")
            lp = bytes_to_float32(s.logprobs, f"samples[{i}].logprobs", expected=len(completion))
        except WireArrayError as exc:
            raise InvalidGroup("arrays", str(exc)) from None
        if len(prompt) == 0:
            raise InvalidGroup("arrays", f"samples[{i}].prompt_ids: empty prompt")
        if len(completion) == 0:
            raise InvalidGroup("arrays", f"samples[{i}].completion_ids: no completion tokens")
        if max_length is not None and len(prompt) + len(completion) > max_length:
            raise InvalidGroup(
                "length", f"samples[{i}]: {len(prompt) + len(completion)} tokens exceed the model's {max_length}"
            )
        if vocab_size is not None:
            ids = np.concatenate([prompt, completion])
            if ids.min() < 0 or ids.max() >= vocab_size:
                raise InvalidGroup("arrays", f"samples[{i}]: token id outside [0, {vocab_size})")
        bad = ~np.isfinite(lp) | (lp > ROLLOUT_LOGPROB_SLACK)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise InvalidGroup("logprobs", f"samples[{i}].logprobs[{k}] = {lp[k]!r} is not a log-probability")
        positive = lp > 0
        if positive.any():
            rounded += int(positive.sum())
            lp = np.minimum(lp, np.float32(0.0))
        if not math.isfinite(s.reward):
            raise InvalidGroup("reward", f"samples[{i}].reward = {s.reward!r} is not finite")
        samples.append(SampleArrays(prompt, completion, lp, float(s.reward)))
    return Group(entry_id, pb.job_id, int(pb.policy_version), tuple(samples), rounded)


def group_staleness(current_version: int, group_version: int) -> int:
    """Versions between the policy a group was sampled under and the current one (never negative)."""
    return max(0, current_version - group_version)
