"""`POST /v1/coefficient` off the event loop that serves gRPC: body size limit, JSON parsing and computation.

Invariants:
- A request body larger than the limit is refused with 413 (the limit in the message) before it
  is read whole (`BodyLimit`, for every route): by its Content-Length, or, without one, as soon
  as the bytes received pass the limit.
- Parsing a large JSON body holds the GIL for its whole length (pydantic's and the standard
  library's parsers never release it: measured 1.4 s for 41 MB, during which a thread offload
  still froze the loop), so a body of at least `inline_bytes` is parsed, validated and computed
  in a worker process; the event loop (REST and the learner's gRPC calls) only moves bytes.
  Small bodies are handled inline (a round trip to the worker would cost more than they do).
- The worker answers with plain data (`Outcome`): the fields of the result, or the validation
  errors with their locations, so the REST errors are the same whichever side parsed the body.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from aisrl.core.ais import arrays_from_ragged, compute_coefficient
from aisrl.core.types import BatchValidationError, CorrectionConfig
from aisrl.services.diagnostics.schemas import CoefficientRequest
from aisrl.wire.coefficient import config_error, result_fields

MiB = 1 << 20


@dataclass(frozen=True)
class Outcome:
    """What a parse-and-compute returns across the process boundary (only plain values)."""

    fields: dict[str, Any] | None = None  # result_fields(...) of the batch
    compute_s: float = 0.0  # seconds in compute_coefficient alone
    errors: list[dict[str, Any]] = field(default_factory=list)  # pydantic errors, loc relative to the body
    batch_error: tuple[str, str] | None = None  # (field, message) of a BatchValidationError


def coefficient_from_json(raw: bytes) -> Outcome:
    """Parses, validates and computes one stateless REST batch (pure: bytes in, plain data out)."""
    try:
        body = CoefficientRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = [
            {
                "loc": ("body", *e["loc"]),
                "msg": e["msg"],
                "type": e["type"],
                "ctx": {k: str(v) for k, v in e.get("ctx", {}).items()},
            }
            for e in exc.errors(include_url=False)
        ]
        return Outcome(errors=errors)
    try:
        try:
            config = CorrectionConfig(**body.config.model_dump())
        except ValidationError as exc:
            raise config_error(exc) from None
        arrays = arrays_from_ragged(body.lp_pi, body.lp_mu, body.advantages)
        started = time.perf_counter()
        result = compute_coefficient(arrays, config)
        return Outcome(fields=result_fields(result), compute_s=time.perf_counter() - started)
    except BatchValidationError as exc:
        return Outcome(batch_error=(exc.field, exc.message))


class BodyTooLarge(Exception):
    def __init__(self, size: int | None, limit: int) -> None:
        seen = f"is {size:,} bytes" if size is not None else "passed the limit while it was read"
        super().__init__(f"request body {seen}; the limit is {limit:,} bytes ({limit / MiB:g} MiB, max_request_mb)")


class BodyLimit:
    """ASGI middleware: 413 (JSON error naming the limit) for a request body larger than `limit` bytes."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, BodyTooLarge(int(declared), self.limit))
        received, started = 0, False

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(None, self.limit)
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await self._refuse(send, exc)

    @staticmethod
    async def _refuse(send: Any, exc: BodyTooLarge) -> None:
        body = json.dumps({"error": str(exc), "field": "body", "detail": []}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _ready() -> bool:
    return True  # unpickling this function in the worker imports this module and what it needs


class RestComputer:
    """Runs `coefficient_from_json` inline for small bodies and in one worker process for large ones."""

    def __init__(self, inline_bytes: int, workers: int) -> None:
        self.inline_bytes = inline_bytes
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Starts the worker now (its imports take about a second), so that the first large body does not wait."""
        if self.workers:
            self._executor().submit(_ready)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: this process runs gRPC threads, which fork must not copy
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    async def __call__(self, raw: bytes) -> Outcome:
        if len(raw) < self.inline_bytes:
            return coefficient_from_json(raw)
        if self.workers == 0:  # off the loop, but the parse still holds the GIL (module docstring)
            return await asyncio.to_thread(coefficient_from_json, raw)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor(), coefficient_from_json, raw)
        except BrokenProcessPool:  # a worker died (e.g. out of memory): start a fresh pool for the next call
            self.close()
            raise

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # wait: the worker must be gone when the service stops (a stopped service leaves no process
            # behind); queued bodies are cancelled, one being computed finishes (seconds at most).
            pool.shutdown(wait=True, cancel_futures=True)
