"""Follows the learner's weight versions: notices on Redis, weights over the `Weights` gRPC stream.

Invariants:
- A version is handed to the worker only once it is complete and verified (chunk order, sizes,
  the sha256 of the stream and of the notice) and saved as a loadable checkpoint directory
  (`model.safetensors` plus the base model's config and tokenizer files), written under a
  temporary name and renamed into place. A failed fetch leaves nothing behind; the worker keeps
  its current version and the fetch is retried with exponential backoff (counted and logged).
- Only versions newer than the newest one loaded or ready are fetched; a newer notice that
  arrives during a backoff is fetched next, the stale one is dropped.
- The newest announcement wins: a re-announcement of the version being fetched (a learner that
  resumed, serving at a new address) replaces the old notice and is tried at once, so a replica
  never keeps retrying an address nobody serves from any more.
- Every fetch has a deadline (the whole gRPC stream), so a stuck server never wedges a replica.
- A replica that starts late catches up: the newest notice already on the stream is its first target.
- The follower stops when cancelled, also when a library dropped the CancelledError (`raise_if_cancelled`).
- The directory of the version the engine runs is kept until a newer one is loaded: a reload that
  breaks the engine is undone by loading it again (worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from aisrl import streams
from aisrl.logs import log_fields
from aisrl.services.rollout.metrics import RolloutMetrics
from aisrl.v1 import weights_pb2, weights_pb2_grpc
from aisrl.wire.weights import WeightsAssembler

log = logging.getLogger("aisrl.rollout.weights")

WEIGHTS_FILE = "model.safetensors"
# Files of a checkpoint directory that hold weights; everything else (config, tokenizer) is copied.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".gguf")
_IDLE_POLL_MS = 1000


@dataclass(frozen=True)
class FetchedWeights:
    """A verified version saved as a checkpoint directory, ready for `RolloutEngine.load_weights`."""

    version: int
    path: Path
    fetch_seconds: float


# ----------------------------------------------------------------------------- pure parts


def parse_notice(entry: streams.StreamEntry, run_id: str) -> weights_pb2.WeightVersionNotice:
    """The notice in a weights-stream entry; ValueError naming the field when it is unusable."""
    if entry.payload is None:
        raise ValueError("entry has no 'pb' field")
    try:
        notice = weights_pb2.WeightVersionNotice.FromString(entry.payload)
    except DecodeError as exc:
        raise ValueError(f"not a WeightVersionNotice protobuf: {exc}") from None
    if notice.run_id != run_id:
        raise ValueError(f"run_id {notice.run_id!r} is not this worker's run {run_id!r}")
    if notice.version == 0:
        raise ValueError("version: 0 is not a version")
    if not notice.endpoint:
        raise ValueError("endpoint: empty")
    return notice


def backoff_delay(failures: int, base_s: float, max_s: float) -> float:
    """base * 2^(failures - 1), capped at max_s (failures counts consecutive failures, from 1)."""
    return min(max_s, base_s * 2 ** max(0, failures - 1))


def copy_model_files(base_dir: Path, dest: Path) -> None:
    """Copies the base checkpoint's non-weight files (config, generation config, tokenizer) to dest."""
    for path in base_dir.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, dest / path.name)


def save_checkpoint(state: Mapping[str, torch.Tensor], base_dir: Path, dest: Path) -> Path:
    """Writes state as a checkpoint directory at dest, atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    tmp = dest.with_name(f".{dest.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    try:
        copy_model_files(base_dir, tmp)
        save_file(dict(state), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# ----------------------------------------------------------------------------- I/O


async def fetch_weights(
    notice: weights_pb2.WeightVersionNotice,
    run_id: str,
    timeout_s: float,
    chunk_bytes: int,
    max_message_bytes: int,
) -> dict[str, torch.Tensor]:
    """Fetches and verifies one version from notice.endpoint; any failure raises (grpc.RpcError, ValueError)."""
    options = [("grpc.max_receive_message_length", max_message_bytes)]
    assembler = WeightsAssembler(
        expected_version=notice.version,
        expected_sha256=notice.sha256 or None,
        expected_total_bytes=notice.total_bytes or None,
        expected_num_tensors=notice.num_tensors or None,
    )
    request = weights_pb2.FetchWeightsRequest(run_id=run_id, version=notice.version, max_chunk_bytes=chunk_bytes)
    async with grpc.aio.insecure_channel(notice.endpoint, options=options) as channel:
        call = weights_pb2_grpc.WeightsStub(channel).Fetch(request, timeout=timeout_s)
        async for chunk in call:
            # Hashing and copying megabytes per chunk would stall the event loop; hashlib releases the GIL.
            await asyncio.to_thread(assembler.add, chunk)
    return assembler.finish()


def raise_if_cancelled() -> None:
    """Raises CancelledError when the current task was cancelled but never received the CancelledError.

    Python 3.11's `asyncio.wait_for` returns its result and drops the cancellation when the cancellation lands in
    the loop iteration the awaited operation completes in (fixed in 3.12), and redis-py sends every command
    through it: a loop that runs until cancelled checks this every round, or it may never stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class WeightsFollower:
    """Background task (`run`) plus the worker's side (`take_ready`, `loaded`, `reload_failed`, the waits)."""

    def __init__(
        self,
        client: Any,
        run_streams: streams.RunStreams,
        *,
        base_model_dir: Path,
        out_dir: Path,
        current_version: int,
        fetch_timeout_s: float,
        retry_base_s: float,
        retry_max_s: float,
        chunk_bytes: int,
        max_message_bytes: int,
        metrics: RolloutMetrics,
    ) -> None:
        self.client = client
        self.streams = run_streams
        self.base_model_dir = Path(base_model_dir)
        self.out_dir = Path(out_dir)
        self.fetch_timeout_s = fetch_timeout_s
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.chunk_bytes = chunk_bytes
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics
        self.loaded_version = current_version
        self.target: weights_pb2.WeightVersionNotice | None = None
        self.failures = 0  # consecutive; reset by a success
        self.total_failures = 0
        self.last_error: str | None = None
        self._ready: FetchedWeights | None = None
        self._taken: FetchedWeights | None = None
        self._retry_at = 0.0
        self._changed = asyncio.Event()  # set on every change of target, ready version or failure
        self._started = asyncio.Event()  # set once the notices already on the stream are known

    # -- the worker's side

    def take_ready(self) -> FetchedWeights | None:
        """The newest verified version not yet handed over, if any."""
        ready, self._ready = self._ready, None
        if ready is not None:
            self._taken = ready
        return ready

    def loaded(self, fetched: FetchedWeights) -> None:
        """The engine now runs `fetched`: older saved versions are deleted (fetched's stays, see the invariants)."""
        self.loaded_version = max(self.loaded_version, fetched.version)
        self._taken = None
        keep = {fetched.path} | ({self._ready.path} if self._ready else set())
        for path in self.out_dir.glob("v*"):
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        self._changed.set()

    def reload_failed(self, fetched: FetchedWeights, error: BaseException) -> None:
        """The engine could not load `fetched`: drop it and fetch it again after a backoff."""
        self._taken = None
        shutil.rmtree(fetched.path, ignore_errors=True)
        self._failed(f"reload of version {fetched.version} failed: {error!r}")

    @property
    def newest_known(self) -> int:
        """Newest version loaded, ready or being loaded."""
        versions = [self.loaded_version] + [f.version for f in (self._ready, self._taken) if f is not None]
        return max(versions)

    def behind(self) -> bool:
        """True while an announced version is newer than anything loaded, ready or being loaded."""
        return self.target is not None and self.target.version > self.newest_known

    async def wait_caught_up(self, timeout_s: float) -> bool:
        """Waits until the newest announced version is ready (or loaded); False on timeout."""
        return await self._wait_until(lambda: self._started.is_set() and not self.behind(), timeout_s)

    async def wait_for_version(self, version: int, timeout_s: float) -> bool:
        """Waits until a version >= `version` is ready (or loaded); False on timeout."""
        return await self._wait_until(lambda: self.newest_known >= version, timeout_s)

    async def _wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Re-checks `done` whenever the follower's state changes, until it holds (True) or timeout_s passes."""
        deadline = time.monotonic() + timeout_s
        while not done():
            raise_if_cancelled()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()  # no await since done() was checked: no change can be missed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=remaining)
        return True

    # -- the background task

    async def run(self) -> None:
        """Watches notices and fetches newer versions until cancelled (also when the cancellation was dropped)."""
        last_id = await self._start_position()
        self._started.set()
        self._changed.set()
        while True:
            raise_if_cancelled()
            if self.behind() and time.monotonic() >= self._retry_at:
                await self._fetch(self.target)
            wait_s = max(0.001, self._retry_at - time.monotonic()) if self.behind() else _IDLE_POLL_MS / 1000
            last_id = await self._read_notices(last_id, block_ms=max(1, int(min(wait_s, 1.0) * 1000)))

    async def _start_position(self) -> str:
        """The id after which to read: the newest notice already written becomes the first target."""
        newest = await self.client.xrevrange(self.streams.weights, max="+", min="-", count=1)
        entries = streams.parse_entries(newest)
        if not entries:
            return "0-0"
        self._consider(entries)
        return entries[-1].id

    async def _read_notices(self, last_id: str, block_ms: int) -> str:
        reply = await self.client.xread({self.streams.weights: last_id}, count=100, block=block_ms)
        entries = streams.parse_entries(reply[0][1]) if reply else []
        if entries:
            self._consider(entries)
            return entries[-1].id
        return last_id

    def _consider(self, entries: list[streams.StreamEntry]) -> None:
        for entry in entries:
            try:
                notice = parse_notice(entry, self.streams.run_id)
            except ValueError as exc:
                log.warning("ignoring a weight notice", extra=log_fields(entry=entry.id, error=str(exc)))
                continue
            if notice.version <= self.newest_known:
                continue
            if self.target is None or notice.version >= self.target.version:
                if self.target is not None and notice.version == self.target.version:
                    log.info("weight version re-announced: following the new notice", extra=log_fields(
                        version=notice.version, endpoint=notice.endpoint, previous=self.target.endpoint))  # fmt: skip
                self.target = notice
                self._retry_at = 0.0  # a newer notice is worth trying at once
                self._changed.set()

    async def _fetch(self, notice: weights_pb2.WeightVersionNotice) -> None:
        t0 = time.perf_counter()
        dest = self.out_dir / f"v{notice.version}"
        try:
            state = await fetch_weights(
                notice, self.streams.run_id, self.fetch_timeout_s, self.chunk_bytes, self.max_message_bytes
            )
            await asyncio.to_thread(save_checkpoint, state, self.base_model_dir, dest)
        except (grpc.RpcError, ValueError, OSError) as exc:
            detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            self._failed(f"fetch of version {notice.version} from {notice.endpoint} failed: {detail}")
            return
        seconds = time.perf_counter() - t0
        if self._ready is not None and self._ready.path != dest:
            shutil.rmtree(self._ready.path, ignore_errors=True)  # superseded before the worker took it
        self._ready = FetchedWeights(notice.version, dest, seconds)
        self.failures = 0
        self.metrics.fetch_seconds.set(seconds)
        log.info("weights fetched", extra=log_fields(version=notice.version, seconds=round(seconds, 4),
                                                     bytes=notice.total_bytes))  # fmt: skip
        self._changed.set()

    def _failed(self, message: str) -> None:
        self.failures += 1
        self.total_failures += 1
        self.last_error = message
        delay = backoff_delay(self.failures, self.retry_base_s, self.retry_max_s)
        self._retry_at = time.monotonic() + delay
        self.metrics.fetch_failures.inc()
        log.error("weights not updated, keeping the current version",
                  extra=log_fields(error=message, failures=self.failures, retry_in_s=round(delay, 3),
                                   version=self.loaded_version))  # fmt: skip
        self._changed.set()
