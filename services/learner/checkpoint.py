"""Learner checkpoints: model, optimizer, counters, RNG state and stream state, written atomically.

Invariants:
- A checkpoint file `ckpt-<step>.pt` is complete or absent: it is written to a temporary file in
  the same directory, flushed and fsynced, renamed into place (atomic on POSIX), and the directory
  is fsynced. A crash mid-write leaves only a `.tmp` file, which `latest` ignores and `prune`
  removes.
- `stream.used_unacked` lists the trajectory-group entry ids whose updates the checkpoint holds
  but which were not acknowledged when it was written. The learner acknowledges them only after
  the file is on disk, and again on resume, so a group is never acknowledged before a checkpoint
  includes it, and never trained twice after a restart (learner.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
FORMAT = 1


@dataclass
class StreamState:
    used_unacked: list[str] = field(default_factory=list)
    consumed_groups: int = 0  # groups used by the steps this checkpoint holds (staleness re-seed)
    next_problem: int = 0  # the feeder's cursor (a floor for it when Redis lost its data)


@dataclass
class Checkpoint:
    step: int
    version: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    stream: StreamState
    trainer_updates: int = 0
    prev_ema: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # model path, settings: for people reading it

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "step": self.step,
            "version": self.version,
            "model": self.model,
            "optimizer": self.optimizer,
            "rng": self.rng,
            "stream": {
                "used_unacked": list(self.stream.used_unacked),
                "consumed_groups": self.stream.consumed_groups,
                "next_problem": self.stream.next_problem,
            },
            "trainer_updates": self.trainer_updates,
            "prev_ema": self.prev_ema,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Checkpoint:
        if data.get("format") != FORMAT:
            raise ValueError(f"checkpoint format {data.get('format')!r}, expected {FORMAT}")
        return cls(
            step=int(data["step"]),
            version=int(data["version"]),
            model=data["model"],
            optimizer=data["optimizer"],
            rng=data["rng"],
            stream=StreamState(
                list(data["stream"]["used_unacked"]),
                int(data["stream"]["consumed_groups"]),
                int(data["stream"].get("next_problem", 0)),
            ),
            trainer_updates=int(data.get("trainer_updates", 0)),
            prev_ema=data.get("prev_ema"),
            meta=dict(data.get("meta", {})),
        )


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"ckpt-{step:08d}.pt"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: str | Path, checkpoint: Checkpoint) -> Path:
    """Writes the checkpoint atomically (module invariant); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, checkpoint.step)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(checkpoint.to_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return final


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def load(path: str | Path) -> Checkpoint:
    # weights_only=False: the file holds our own optimizer and RNG state (numpy), written by save().
    return Checkpoint.from_dict(torch.load(path, map_location="cpu", weights_only=False))


def latest(directory: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(directory)
    return load(found[-1][1]) if found else None


def prune(directory: str | Path, keep: int) -> list[Path]:
    """Removes all but the newest `keep` checkpoints, and leftover temporary files; returns what was removed."""
    directory = Path(directory)
    removed = [p for _, p in list_checkpoints(directory)[:-keep]] if keep > 0 else []
    removed += [p for p in directory.glob(".ckpt-*.tmp") if p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
