"""HTTP front of a rollout worker: liveness, readiness and Prometheus metrics.

Invariant: the app only reads the worker's state (`RolloutState` on `app.state.rollout`); it
starts nothing and owns nothing, so it can be served by uvicorn beside the worker loop or
called in-process (httpx.ASGITransport) in tests.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from aisrl.services.rollout.metrics import RolloutMetrics

REDIS_PING_TIMEOUT_S = 2.0


@dataclass
class RolloutState:
    """What the HTTP endpoints report; the worker's wiring (main.py) keeps it current."""

    redis: Any  # redis.asyncio.Redis
    metrics: RolloutMetrics
    run_id: str
    worker_id: str
    engine_loaded: bool = False

    def set_engine_loaded(self, loaded: bool) -> None:
        self.engine_loaded = loaded
        self.metrics.ready.set(1 if loaded else 0)


def create_app(state: RolloutState) -> FastAPI:
    app = FastAPI(title="AIS-RL rollout worker", version="1", summary="Health and metrics of one rollout replica.")
    app.state.rollout = state

    @app.get("/healthz", tags=["health"], summary="Liveness: the process serves requests.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "worker_id": state.worker_id}

    @app.get("/readyz", tags=["health"], summary="Readiness: Redis answers and the engine is loaded.")
    async def readyz() -> JSONResponse:
        problems = []
        try:
            await asyncio.wait_for(state.redis.ping(), timeout=REDIS_PING_TIMEOUT_S)
        except Exception as exc:  # any failure to reach Redis means not ready
            problems.append(f"redis unavailable: {exc!r}")
        if not state.engine_loaded:
            problems.append("engine not loaded yet")
        body = {
            "status": "not ready" if problems else "ready",
            "problems": problems,
            "run_id": state.run_id,
            "worker_id": state.worker_id,
            "policy_version": state.metrics.current_version,
        }
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics.")
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
