"""REST front of the diagnostics service (FastAPI) and the lifespan that owns its resources.

Invariants: every error is JSON `{"error", "field", "detail"}` with a 4xx status naming the
field (422 for bad input, 404 for an unknown run or step), never a 500 for bad input; the gRPC
server, the Redis client and the metrics registry live on `app.state` for exactly the life of
the app (started in the lifespan, stopped when it ends).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from aisrl.core.types import BatchValidationError
from aisrl.redis_conn import async_client
from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.services.diagnostics.dashboard import render_dashboard
from aisrl.services.diagnostics.grpc_server import start_grpc_server
from aisrl.services.diagnostics.history import History
from aisrl.services.diagnostics.metrics import DiagnosticsMetrics
from aisrl.services.diagnostics.rest_compute import BodyLimit, MiB, RestComputer
from aisrl.services.diagnostics.schemas import (
    BatchPageOut,
    BatchRecordOut,
    CoefficientOut,
    CoefficientRequest,
    ErrorOut,
    RunOut,
)
from aisrl.services.diagnostics.service import CoefficientService

RunId = Annotated[str, Path(min_length=1, max_length=200, description="Run identifier.")]
ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut}, 422: {"model": ErrorOut}}
DASHBOARD_POINTS = 2000


def _error(status: int, message: str, field: str | None = None, detail: list | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "field": field, "detail": detail or []})


def _loc_to_field(loc: tuple | list) -> str:
    """('body', 'lp_mu', 3) -> 'lp_mu[3]'."""
    path = ""
    for part in loc:
        if part in ("body", "query", "path"):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def create_app(settings: DiagnosticsSettings, redis_url: str) -> FastAPI:
    """The REST app; its lifespan also starts the gRPC server on settings.grpc_host/port."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = async_client(redis_url)
        metrics = DiagnosticsMetrics()
        history = History(client, prefix=settings.key_prefix, limit=settings.history_limit)
        service = CoefficientService(history, metrics, offload_tokens=settings.offload_tokens)
        server, grpc_port, health = await start_grpc_server(
            service, settings.grpc_host, settings.grpc_port, settings.max_message_mb
        )
        app.state.service, app.state.metrics, app.state.grpc_port = service, metrics, grpc_port
        app.state.rest_computer = RestComputer(settings.rest_inline_kb * 1024, settings.rest_workers)
        app.state.rest_computer.start()
        try:
            yield
        finally:
            app.state.rest_computer.close()
            await health.enter_graceful_shutdown()
            await server.stop(grace=2.0)
            await client.aclose()

    app = FastAPI(
        title="AIS-RL diagnostics",
        version="1",
        summary="Adaptive importance sampling coefficient and mismatch diagnostics, per batch and per run.",
        lifespan=lifespan,
    )

    # Outermost: a body over the limit is refused before any route reads it (rest_compute.py).
    app.add_middleware(BodyLimit, limit=int(settings.max_request_mb * MiB))

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.requests.labels(api="http", method=f"{request.method} {path}", code=str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def on_request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _loc_to_field(first["loc"]) or None
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e.get("type")} for e in errors]
        return _error(422, f"{field}: {first['msg']}" if field else first["msg"], field, detail)

    @app.exception_handler(BatchValidationError)
    async def on_batch_invalid(_: Request, exc: BatchValidationError) -> JSONResponse:
        return _error(422, str(exc), exc.field, [{"loc": ["body", exc.field], "msg": exc.message}])

    @app.exception_handler(HTTPException)
    async def on_http_error(_: Request, exc: HTTPException) -> JSONResponse:
        field = exc.headers.get("x-field") if exc.headers else None
        return _error(exc.status_code, str(exc.detail), field)

    def service(request: Request) -> CoefficientService:
        return request.app.state.service

    async def require_run(request: Request, run_id: str) -> None:
        if not await service(request).history.exists(run_id):
            raise HTTPException(404, f"unknown run {run_id!r}", headers={"x-field": "run"})

    @app.get("/healthz", tags=["health"], summary="Liveness: the process serves requests.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: Redis answers.")
    async def readyz(request: Request) -> JSONResponse:
        try:
            await service(request).history.ping()
        except Exception as exc:  # any Redis failure means not ready
            return _error(503, f"redis unavailable: {exc}", "redis")
        return JSONResponse({"status": "ready", "grpc_port": request.app.state.grpc_port})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics.")
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/coefficient",
        response_model=CoefficientOut,
        responses=ERRORS,
        tags=["coefficient"],
        summary="Compute alpha and every diagnostic for one batch (stateless, nothing recorded).",
        # The body is parsed off the event loop (rest_compute.py), not by FastAPI: its schema is declared here.
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/CoefficientRequest"}}}}},
    )  # fmt: skip
    async def coefficient(request: Request) -> dict[str, Any]:
        outcome = await request.app.state.rest_computer(await request.body())
        if outcome.errors:
            raise RequestValidationError(outcome.errors)
        if outcome.batch_error:
            raise BatchValidationError(*outcome.batch_error)
        return service(request).observe_stateless(outcome.fields, outcome.compute_s)

    @app.get("/v1/runs", response_model=list[RunOut], tags=["runs"], summary="Runs with recorded batches.")
    async def runs(request: Request) -> list[Any]:
        return [summary.__dict__ for summary in await service(request).history.runs()]

    @app.get(
        "/v1/runs/{run_id}/coefficient",
        response_model=BatchRecordOut,
        responses=ERRORS,
        tags=["runs"],
        summary="The latest recorded batch of a run.",
    )
    async def latest(request: Request, run_id: RunId) -> dict[str, Any]:
        record = await service(request).history.latest(run_id)
        if record is None:
            raise HTTPException(404, f"unknown run {run_id!r}", headers={"x-field": "run"})
        return record

    @app.get(
        "/v1/runs/{run_id}/batches",
        response_model=BatchPageOut,
        responses=ERRORS,
        tags=["runs"],
        summary="Recorded batches of a run, oldest first, paged by step.",
    )
    async def batches(
        request: Request,
        run_id: RunId,
        since_step: Annotated[int, Query(ge=0, description="Smallest step to return.")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000, description="Page size.")] = 100,
    ) -> dict[str, Any]:
        await require_run(request, run_id)
        page = await service(request).history.page(run_id, since_step, limit + 1)
        next_since = int(page[limit]["step"]) if len(page) > limit else None
        return {"run_id": run_id, "batches": page[:limit], "next_since_step": next_since}

    @app.get(
        "/v1/runs/{run_id}/batches/{step}",
        response_model=BatchRecordOut,
        responses=ERRORS,
        tags=["runs"],
        summary="One recorded batch.",
    )
    async def batch(request: Request, run_id: RunId, step: Annotated[int, Path(ge=0)]) -> dict[str, Any]:
        await require_run(request, run_id)
        record = await service(request).history.get(run_id, step)
        if record is None:
            raise HTTPException(404, f"run {run_id!r} has no batch at step {step}", headers={"x-field": "step"})
        return record

    @app.get(
        "/v1/runs/{run_id}/dashboard",
        response_class=HTMLResponse,
        responses=ERRORS,
        tags=["runs"],
        summary="HTML page with charts of alpha, rho, s, p and kl over steps.",
    )
    async def dashboard(request: Request, run_id: RunId) -> HTMLResponse:
        await require_run(request, run_id)
        records = await service(request).history.tail(run_id, DASHBOARD_POINTS)
        return HTMLResponse(render_dashboard(run_id, records))

    _declare_request_body(app)
    return app


def _declare_request_body(app: FastAPI) -> None:
    """Adds CoefficientRequest (and the models it uses) to the OpenAPI components its route refers to."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()  # caches itself in app.openapi_schema, which the lines below complete
        body = CoefficientRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(body.pop("$defs", {}))
        components["CoefficientRequest"] = body
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
