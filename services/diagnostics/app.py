"""REST front of the diagnostics service (FastAPI) and the lifespan that owns its resources.

Invariants: every error is JSON `{"error", "field", "detail"}` (services/diagnostics/errors.py) with a
4xx status naming the field (422 for bad input, 400 for malformed JSON, 415 for another content type,
404 for an unknown run, step or route), never a 500 for bad input; every page and its assets (the
dashboard's scripts, the API docs' Swagger UI) are served by this app, nothing from a CDN; the gRPC
server, the Redis client and the metrics registry live on `app.state` for exactly the life of
the app (started in the lifespan, stopped when it ends).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from aisrl.core.types import BatchValidationError
from aisrl.redis_conn import async_client
from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.services.diagnostics.dashboard import (
    DEFAULT_MAX_POINTS,
    STATIC_FILES,
    render_dashboard,
    render_index,
    series_payload,
)
from aisrl.services.diagnostics.errors import FIELD_HEADER, error_response, install_error_handlers, require_json
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
    SeriesOut,
)
from aisrl.services.diagnostics.service import CoefficientService

RunId = Annotated[str, Path(min_length=1, max_length=200, description="Run identifier.")]
ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut}, 422: {"model": ErrorOut}}
POST_ERRORS: dict[int | str, dict[str, Any]] = {400: {"model": ErrorOut}, 415: {"model": ErrorOut}, **ERRORS}
DASHBOARD_RECORDS = 10_000  # newest records a dashboard series is drawn from (downsampled to max_points)


def create_app(settings: DiagnosticsSettings, redis_url: str) -> FastAPI:
    """The REST app; its lifespan also starts the gRPC server on settings.grpc_host/port."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = async_client(redis_url)
        metrics = DiagnosticsMetrics()
        history = History(client, prefix=settings.key_prefix, limit=settings.history_limit)
        service = CoefficientService(history, metrics, offload_tokens=settings.offload_tokens)
        try:
            server, grpc_port, health = await start_grpc_server(
                service, settings.grpc_host, settings.grpc_port, settings.max_message_mb, settings.grpc_reflection
            )
        except OSError as exc:  # uvicorn would only log it and exit: start_diagnostics raises it instead
            app.state.startup_error = exc
            await client.aclose()
            yield
            return
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

    app = FastAPIOffline(  # the /docs page's Swagger UI assets come from the package, not a CDN
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

    install_error_handlers(app)

    def service(request: Request) -> CoefficientService:
        return request.app.state.service

    async def require_run(request: Request, run_id: str) -> None:
        if not await service(request).history.exists(run_id):
            raise HTTPException(404, f"unknown run {run_id!r}", headers={FIELD_HEADER: "run"})

    @app.get("/healthz", tags=["health"], summary="Liveness: the process serves requests.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: Redis answers.")
    async def readyz(request: Request) -> JSONResponse:
        try:
            await service(request).history.ping()
        except Exception as exc:  # any Redis failure means not ready
            return error_response(503, f"redis unavailable: {exc}", "redis")
        return JSONResponse({"status": "ready", "grpc_port": request.app.state.grpc_port})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics.")
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/coefficient",
        response_model=CoefficientOut,
        responses=POST_ERRORS,
        dependencies=[Depends(require_json)],
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
            raise HTTPException(404, f"unknown run {run_id!r}", headers={FIELD_HEADER: "run"})
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
            raise HTTPException(404, f"run {run_id!r} has no batch at step {step}", headers={FIELD_HEADER: "step"})
        return record

    @app.get(
        "/v1/runs/{run_id}/series",
        response_model=SeriesOut,
        responses=ERRORS,
        tags=["runs"],
        summary="What the dashboard charts: steps and each charted field, downsampled to max_points.",
    )
    async def series(
        request: Request,
        run_id: RunId,
        max_points: Annotated[int, Query(ge=2, le=DASHBOARD_RECORDS, description="Points per series.")] = (
            DEFAULT_MAX_POINTS
        ),
    ) -> dict[str, Any]:
        summary = await service(request).history.summary(run_id)
        if summary is None:
            raise HTTPException(404, f"unknown run {run_id!r}", headers={FIELD_HEADER: "run"})
        records = await service(request).history.tail(run_id, DASHBOARD_RECORDS)
        return series_payload(run_id, records, max_points, summary.n_batches, summary.updated_unix)

    @app.get(
        "/v1/runs/{run_id}/dashboard",
        response_class=HTMLResponse,
        responses=ERRORS,
        tags=["runs"],
        summary="Charts of the applied and shadow alpha, rho, s, p, kl (log scale) and masked shares over steps; "
        "values on hover; other runs overlaid with ?compare=<run> (repeatable); refreshes itself.",
    )
    async def dashboard(
        request: Request,
        run_id: RunId,
        compare: Annotated[list[str], Query(max_length=8, description="Runs drawn over this one.")] = [],  # noqa: B006
    ) -> HTMLResponse:
        run_ids = list(dict.fromkeys([run_id, *compare]))
        for name in run_ids:
            await require_run(request, name)
        return HTMLResponse(render_dashboard(run_ids, request.scope.get("root_path", "")))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(request: Request) -> HTMLResponse:
        runs = [summary.__dict__ for summary in await service(request).history.runs()]
        return HTMLResponse(render_index(runs, request.scope.get("root_path", "")))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        path = STATIC_FILES.get(name)
        if path is None:
            raise HTTPException(404, f"no static file {name!r}", headers={FIELD_HEADER: "name"})
        return FileResponse(path, media_type="text/javascript", headers={"cache-control": "public, max-age=3600"})

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
