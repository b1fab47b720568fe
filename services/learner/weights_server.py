"""Serves policy weights over gRPC (`aisrl.v1.Weights.Fetch`) and announces each version on Redis.

Invariants:
- A version is announced (a `WeightVersionNotice` on the run's weights stream) only after it is
  servable, and the notice's sha256 / byte count / tensor count are those of exactly the bytes
  `Fetch` streams for it (`aisrl.wire.weights`: same order, same digest).
- The newest `keep` versions stay servable; a stored state dict is an immutable CPU copy, so a
  fetch in progress never sees a later update. Version 0 in a request means the newest.
- Notices carry versions >= 1 only (rollout workers start from the initial checkpoint, version 0).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import redis.asyncio as aioredis
import torch

from aisrl import streams
from aisrl.v1 import weights_pb2, weights_pb2_grpc
from aisrl.wire.weights import WeightsDigest, iter_weight_chunks, weights_digest


@dataclass(frozen=True)
class StoredVersion:
    version: int
    step: int
    state: Mapping[str, torch.Tensor]
    digest: WeightsDigest


class WeightStore:
    """The newest `keep` versions, by version number."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self._versions: OrderedDict[int, StoredVersion] = OrderedDict()

    def put(self, version: int, step: int, state: Mapping[str, torch.Tensor]) -> StoredVersion:
        """Stores a version (the caller hands over state and must not modify it); computes its digest."""
        if self._versions and version <= next(reversed(self._versions)):
            raise ValueError(f"version {version} is not newer than {next(reversed(self._versions))}")
        stored = StoredVersion(version, step, dict(state), weights_digest(state))
        self._versions[version] = stored
        while len(self._versions) > self.keep:
            self._versions.popitem(last=False)
        return stored

    def get(self, version: int) -> StoredVersion | None:
        if version == 0:
            return self.latest
        return self._versions.get(version)

    @property
    def latest(self) -> StoredVersion | None:
        return next(reversed(self._versions.values())) if self._versions else None

    @property
    def versions(self) -> list[int]:
        return list(self._versions)


class WeightsServicer(weights_pb2_grpc.WeightsServicer):
    def __init__(self, store: WeightStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    async def Fetch(self, request, context):
        if request.run_id and request.run_id != self.run_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"run_id: this server holds run {self.run_id!r}")
        stored = self.store.get(request.version)
        if stored is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"version: {request.version} is not held (held: {self.store.versions})"
            )
        chunks = iter_weight_chunks(stored.state, stored.version, request.max_chunk_bytes)
        while True:
            # Copying a chunk of megabytes is done off the event loop, which keeps serving.
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                return
            yield chunk


async def start_weights_server(
    store: WeightStore, run_id: str, host: str, port: int, max_message_mb: int
) -> tuple[grpc.aio.Server, int]:
    """Starts the server; returns it and the bound port (port 0 picks one)."""
    limit = max_message_mb << 20
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )
    weights_pb2_grpc.add_WeightsServicer_to_server(WeightsServicer(store, run_id), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the Weights gRPC server to {host}:{port}")
    await server.start()
    return server, bound


def make_notice(run_id: str, stored: StoredVersion, endpoint: str, now: float) -> weights_pb2.WeightVersionNotice:
    return weights_pb2.WeightVersionNotice(
        run_id=run_id,
        version=stored.version,
        step=stored.step,
        endpoint=endpoint,
        sha256=stored.digest.sha256,
        total_bytes=stored.digest.total_bytes,
        num_tensors=stored.digest.num_tensors,
        created_unix=now,
    )


async def announce(
    client: aioredis.Redis, run_streams: streams.RunStreams, notice: weights_pb2.WeightVersionNotice, maxlen: int
) -> str:
    if notice.version < 1:
        raise ValueError("version: notices carry versions >= 1")
    return await streams.append(client, run_streams.weights, notice.SerializeToString(), maxlen=maxlen)


async def last_announced(client: aioredis.Redis, run_streams: streams.RunStreams) -> int:
    """The newest version on the run's weights stream (0 when none)."""
    newest = 0
    for entry in streams.parse_entries(await client.xrevrange(run_streams.weights, max="+", min="-", count=16)):
        if entry.payload is None:
            continue
        try:
            newest = max(newest, weights_pb2.WeightVersionNotice.FromString(entry.payload).version)
        except Exception:  # a foreign entry says nothing about our versions
            continue
    return newest


def resume_version(checkpoint_version: int, announced: int) -> int:
    """The version under which restored weights are served after a restart.

    Versions announced after the checkpoint belong to updates lost in the crash; reusing their
    numbers for different weights would make rollout workers (which fetch only newer versions)
    keep the lost weights. So the restored weights get a version newer than any announced.
    """
    return checkpoint_version if announced <= checkpoint_version else announced + 1
