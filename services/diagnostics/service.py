"""The transport-independent heart of the diagnostics service, shared by gRPC and REST.

Invariant: a batch is validated and computed by the pure core (`aisrl.core.ais`) and is
recorded only after it computed successfully; a record carries every reported quantity plus
the config it was computed with, so any recorded number can be recomputed and checked, and what
the learner sent beside the batch (reward, held-out evaluation; null where it sent none).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aisrl.core.ais import compute_coefficient
from aisrl.core.types import CoefficientResult, CorrectionConfig, MismatchArrays
from aisrl.services.diagnostics.history import History
from aisrl.services.diagnostics.metrics import DiagnosticsMetrics
from aisrl.wire.coefficient import LEARNER_SIGNALS, result_fields


class CoefficientService:
    def __init__(self, history: History, metrics: DiagnosticsMetrics, offload_tokens: int = 50_000) -> None:
        self.history = history
        self.metrics = metrics
        self.offload_tokens = offload_tokens

    async def compute(
        self, arrays: MismatchArrays, config: CorrectionConfig, prev_ema: float | None, path: str
    ) -> tuple[CoefficientResult, float]:
        """Computes off the event loop when the batch is large; returns (result, milliseconds)."""
        started = time.perf_counter()
        if arrays.lp_pi.size >= self.offload_tokens:
            result = await asyncio.to_thread(compute_coefficient, arrays, config, prev_ema)
        else:
            result = compute_coefficient(arrays, config, prev_ema)
        elapsed = time.perf_counter() - started
        self._count(path, elapsed, result.n_tokens)
        return result, elapsed * 1e3

    def _count(self, path: str, seconds: float, n_tokens: int) -> None:
        self.metrics.compute_seconds.labels(path=path).observe(seconds)
        self.metrics.tokens.labels(path=path).inc(n_tokens)

    def observe_stateless(self, fields: dict[str, Any], compute_s: float) -> dict[str, Any]:
        """The REST answer for a batch computed elsewhere (rest_compute.py), counted like compute() counts."""
        self._count("rest", compute_s, fields["n_tokens"])
        return fields | {"compute_ms": compute_s * 1e3}

    async def record_local(self, record: dict[str, Any]) -> dict[str, Any]:
        """Stores a record the learner computed itself (kept `computed_locally`) unless its step already has
        one (the service's own result wins); returns the record kept for the step. The latest-record gauges
        are left alone: a late local record is older than what they show."""
        run_id, step = record["run_id"], int(record["step"])
        existing = await self.history.get(run_id, step)
        if existing is not None:
            return existing
        record = {**record, "computed_locally": True}
        trimmed = await self.history.record(run_id, record)
        if trimmed:
            self.metrics.trimmed.labels(run=run_id).inc(trimmed)
        return record

    async def compute_for_run(
        self,
        run_id: str,
        step: int,
        policy_version: int,
        arrays: MismatchArrays,
        config: CorrectionConfig,
        dry_run: bool = False,
        still_wanted: Any = None,
        signals: dict[str, float | int | None] | None = None,
    ) -> dict[str, Any]:
        """Computes with the run's EMA state and records the batch unless dry_run.

        signals: what the learner measured (wire.coefficient.LEARNER_SIGNALS), recorded as given (None: null).

        still_wanted, when given, is called before recording; if it returns False (the caller
        gave up, e.g. its deadline passed) nothing is recorded.
        """
        prev_ema = await self.history.prev_ema(run_id, step) if config.beta > 0 else None
        result, compute_ms = await self.compute(arrays, config, prev_ema, path="grpc")
        record = {
            "run_id": run_id,
            "step": step,
            "policy_version": policy_version,
            **result_fields(result),
            "computed_unix": time.time(),
            "compute_ms": compute_ms,
            "computed_locally": False,
            "config": config.model_dump(mode="json"),
            **{name: (signals or {}).get(name) for name in LEARNER_SIGNALS},
        }
        if dry_run or (still_wanted is not None and not still_wanted()):
            return record
        trimmed = await self.history.record(run_id, record)
        if trimmed:
            self.metrics.trimmed.labels(run=run_id).inc(trimmed)
        self.metrics.observe_record(run_id, record)
        return record
