"""gRPC front of the diagnostics service: `aisrl.v1.Diagnostics` plus the standard health service.

Invariants: invalid input is answered with INVALID_ARGUMENT and a message naming the field;
a batch whose caller's deadline has passed by the time it is computed is not recorded (the
learner will have computed it locally, and sends it with RecordLocal once the service answers
again; RecordLocal never replaces an existing record of that step); message size limits admit
batches of millions of tokens.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection

from aisrl.core.types import BatchValidationError
from aisrl.services.diagnostics.service import CoefficientService
from aisrl.v1 import diagnostics_pb2, diagnostics_pb2_grpc
from aisrl.wire.coefficient import batch_from_pb, config_from_pb, record_from_pb, record_to_pb, signals_from_pb

SERVICE_NAME = diagnostics_pb2.DESCRIPTOR.services_by_name["Diagnostics"].full_name


class DiagnosticsServicer(diagnostics_pb2_grpc.DiagnosticsServicer):
    def __init__(self, service: CoefficientService) -> None:
        self.service = service

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        self.service.metrics.requests.labels(api="grpc", method=method, code=code.name).inc()

    async def ComputeCoefficient(self, request, context):
        if not request.run_id:
            self._count("ComputeCoefficient", grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "run_id: must not be empty")
        try:
            config = config_from_pb(request.config)
            arrays = batch_from_pb(request)
            signals = signals_from_pb(request)

            def still_wanted() -> bool:
                remaining = context.time_remaining()
                return remaining is None or remaining > 0

            record = await self.service.compute_for_run(
                request.run_id,
                request.step,
                request.policy_version,
                arrays,
                config,
                dry_run=request.dry_run,
                still_wanted=still_wanted,
                signals=signals,
            )
        except BatchValidationError as exc:
            self._count("ComputeCoefficient", grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not still_wanted():
            self._count("ComputeCoefficient", grpc.StatusCode.DEADLINE_EXCEEDED)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while computing; not recorded")
        self._count("ComputeCoefficient", grpc.StatusCode.OK)
        return record_to_pb(record)

    async def RecordLocal(self, request, context):
        if not request.result.run_id:
            self._count("RecordLocal", grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "result.run_id: must not be empty")
        try:
            config = config_from_pb(request.config)
            record = record_from_pb(request.result) | {"config": config.model_dump(mode="json")}
        except (BatchValidationError, ValueError, KeyError) as exc:
            self._count("RecordLocal", grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        kept = await self.service.record_local(record)
        self._count("RecordLocal", grpc.StatusCode.OK)
        return record_to_pb(kept)

    async def GetLatest(self, request, context):
        record = await self.service.history.latest(request.run_id) if request.run_id else None
        if record is None:
            self._count("GetLatest", grpc.StatusCode.NOT_FOUND)
            await context.abort(grpc.StatusCode.NOT_FOUND, f"run_id: unknown run {request.run_id!r}")
        self._count("GetLatest", grpc.StatusCode.OK)
        return record_to_pb(record)


async def start_grpc_server(
    service: CoefficientService, host: str, port: int, max_message_mb: int, reflection: bool = True
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Starts the server (with server reflection when asked); returns it, the bound port (port 0 picks one) and
    its health servicer."""
    limit = max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )
    diagnostics_pb2_grpc.add_DiagnosticsServicer_to_server(DiagnosticsServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection:
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, grpc_reflection.SERVICE_NAME)
        grpc_reflection.enable_server_reflection(names, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpcio raises "Failed to bind" for an address in use
        raise OSError(f"cannot bind gRPC server to {host}:{port}: {exc}") from None
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer
