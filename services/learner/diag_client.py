"""Alpha for each batch: from the diagnostics service when it answers in time, else computed here.

Invariants:
- Every step gets a coefficient: the service's alpha when ComputeCoefficient answers within
  the deadline; otherwise (deadline, unavailable, any RPC error, or no service configured) the
  learner computes it itself with the same pure core (`aisrl.core.ais.compute_coefficient`), and
  the step's record says `computed_locally: true` (and the metric counts it, with the reason).
- One failure does not stick: the next step asks the service again, on a fresh channel, so the
  learner resumes using the service as soon as it answers.
- No hole in the service's history: the records of steps computed locally while a service is
  configured are kept (up to `MAX_UNSENT`, oldest dropped and logged) and sent with RecordLocal,
  oldest first, after the next answer of the service; they stay marked `computed_locally`. They
  live in the learner's memory: a learner restarted meanwhile does not send them.
- The per-token loss coefficients always come from the local computation's masks and weights with
  the alpha actually used (the service returns statistics, not per-token arrays). Both sides see
  the same float32 logprobs, so their alphas agree (up to the service's own EMA history when beta > 0).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from aisrl.core.ais import compute_coefficient
from aisrl.core.types import CoefficientResult, CorrectionConfig, MismatchArrays
from aisrl.logs import log_fields
from aisrl.services.learner.metrics import LearnerMetrics
from aisrl.services.learner.trainer import token_coefficients
from aisrl.v1 import diagnostics_pb2, diagnostics_pb2_grpc
from aisrl.wire.coefficient import config_to_pb, encode_batch, record_from_pb, record_to_pb, result_fields

log = logging.getLogger("aisrl.learner.diagnostics")

_COMPUTE_METHOD = "/{}/ComputeCoefficient".format(diagnostics_pb2.DESCRIPTOR.services_by_name["Diagnostics"].full_name)
# Batches at least this large are computed in a worker thread, off the event loop.
_OFFLOAD_TOKENS = 50_000
MAX_UNSENT = 10_000  # local records kept for the service (the service's default history limit)
_SEND_PER_STEP = 64  # local records sent after one answer: a long outage is caught up over a few steps


@dataclass(frozen=True)
class Coefficient:
    alpha: float
    alpha_ema: float
    token_coef: np.ndarray  # float64[N]: c_i with the alpha used, 0 on masked tokens
    n_kept: int
    record: dict[str, Any]  # every reported scalar, plus run_id, step, computed_locally, ...
    computed_locally: bool
    reason: str | None = None  # why it was computed locally


def local_record(result: CoefficientResult, run_id: str, step: int, version: int, compute_ms: float) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "step": step,
        "policy_version": version,
        **result_fields(result),
        "computed_unix": time.time(),
        "compute_ms": compute_ms,
        "computed_locally": True,
    }


class DiagnosticsClient:
    def __init__(
        self,
        target: str | None,
        run_id: str,
        config: CorrectionConfig,
        timeout_s: float,
        metrics: LearnerMetrics,
        max_message_mb: int = 128,
    ) -> None:
        self.target = target
        self.run_id = run_id
        self.config = config
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.max_message_bytes = max_message_mb << 20
        self._channel: grpc.aio.Channel | None = None
        self._was_local = False
        self.unsent: deque[dict[str, Any]] = deque()  # local records the service has not got yet, oldest first

    def _channel_open(self) -> grpc.aio.Channel:
        if self._channel is None:
            options = [
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
            ]
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        return self._channel

    def _compute(self) -> grpc.aio.UnaryUnaryMultiCallable:
        """ComputeCoefficient taking the request already serialized (`encode_batch`: much faster than protobuf's)."""
        return self._channel_open().unary_unary(
            _COMPUTE_METHOD, request_serializer=None, response_deserializer=diagnostics_pb2.CoefficientResult.FromString
        )

    def _stub(self) -> diagnostics_pb2_grpc.DiagnosticsStub:
        return diagnostics_pb2_grpc.DiagnosticsStub(self._channel_open())

    async def _reset(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(grace=None)

    async def close(self) -> None:
        await self._reset()

    async def _local(self, arrays: MismatchArrays, prev_ema: float | None) -> tuple[CoefficientResult, float]:
        started = time.perf_counter()
        if arrays.lp_pi.size >= _OFFLOAD_TOKENS:
            result = await asyncio.to_thread(compute_coefficient, arrays, self.config, prev_ema)
        else:
            result = compute_coefficient(arrays, self.config, prev_ema)
        return result, (time.perf_counter() - started) * 1e3

    async def coefficient(
        self,
        arrays: MismatchArrays,
        step: int,
        version: int,
        prev_ema: float | None,
        signals: dict[str, float | int | None] | None = None,
    ) -> Coefficient:
        """The coefficient of one batch (module invariants). Invalid batches raise BatchValidationError.

        signals: what the learner measured (wire.coefficient.LEARNER_SIGNALS), sent for the service to record.
        """
        local, compute_ms = await self._local(arrays, prev_ema)  # validates, and gives the masks
        n_kept = int(np.count_nonzero(local.token_keep))
        reason = "no_service"
        if self.target:
            request = encode_batch(arrays, self.config, run_id=self.run_id, step=step, policy_version=version,
                                   signals=signals)  # fmt: skip
            try:
                answer = await self._compute()(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                reason = exc.code().name.lower()
                await self._reset()
                log.warning(
                    "diagnostics service did not answer; alpha computed locally",
                    extra=log_fields(step=step, code=exc.code().name, details=exc.details(), target=self.target),
                )
            else:
                if self._was_local:
                    log.info("diagnostics service answers again", extra=log_fields(step=step, target=self.target))
                self._was_local = False
                record = record_from_pb(answer)
                coef = token_coefficients(arrays, self.config, answer.alpha, local.token_keep)
                await self._send_unsent()
                return Coefficient(answer.alpha, answer.alpha_ema, coef, n_kept, record, computed_locally=False)
        self._was_local = bool(self.target)
        self.metrics.local_alpha.labels(reason=reason).inc()
        record = local_record(local, self.run_id, step, version, compute_ms)
        if self.target:
            self._keep_unsent(record)
        return Coefficient(local.alpha, local.alpha_ema, np.asarray(local.token_coef), n_kept, record, True, reason)

    def _keep_unsent(self, record: dict[str, Any]) -> None:
        self.unsent.append(record)
        if len(self.unsent) > MAX_UNSENT:
            dropped = self.unsent.popleft()
            log.warning("too many local records for the diagnostics service: the oldest is dropped",
                        extra=log_fields(step=dropped["step"], kept=MAX_UNSENT))  # fmt: skip

    async def _send_unsent(self) -> None:
        """Sends up to _SEND_PER_STEP kept local records, oldest first; stops (keeping the rest) on an error."""
        sent = 0
        config = config_to_pb(self.config)
        while self.unsent and sent < _SEND_PER_STEP:
            record = self.unsent[0]
            request = diagnostics_pb2.LocalRecord(result=record_to_pb(record), config=config)
            try:
                await self._stub().RecordLocal(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                fields = log_fields(step=record["step"], code=exc.code().name, details=exc.details(),
                                    left=len(self.unsent))  # fmt: skip
                log.warning("local records not sent to the diagnostics service yet", extra=fields)
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    self.unsent.popleft()  # refused for good: sending it again would not help
                return
            self.unsent.popleft()
            sent += 1
        if sent:
            log.info("local records sent to the diagnostics service",
                     extra=log_fields(count=sent, left=len(self.unsent)))  # fmt: skip
