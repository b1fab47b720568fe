"""HTTP front of the learner: liveness, readiness, Prometheus metrics and the latest step as JSON.

Invariant: the app only reads the learner's state (`app.state.learner`); it starts nothing and
owns nothing, so it is served by uvicorn beside the learner loop (main.py) or called in-process
(httpx.ASGITransport) in tests.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

REDIS_PING_TIMEOUT_S = 2.0


def create_app(learner: Any) -> FastAPI:
    """`learner` is a `learner.Learner` (typed loosely so the app imports no torch)."""
    app = FastAPI(title="AIS-RL learner", version="1", summary="Health, metrics and progress of the learner.")
    app.state.learner = learner

    @app.get("/healthz", tags=["health"], summary="Liveness: the process serves requests.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "run_id": learner.settings.run_id}

    @app.get("/readyz", tags=["health"], summary="Readiness: model loaded, weights served, Redis answers.")
    async def readyz() -> JSONResponse:
        problems = []
        if not learner.ready:
            problems.append("learner not started (model loading or weights server not up)")
        client = learner.client
        if client is None:
            problems.append("no Redis client")
        else:
            try:
                await asyncio.wait_for(client.ping(), timeout=REDIS_PING_TIMEOUT_S)
            except Exception as exc:  # any failure to reach Redis means not ready
                problems.append(f"redis unavailable: {exc!r}")
        body = {"status": "not ready" if problems else "ready", "problems": problems, "run_id": learner.settings.run_id,
                "step": learner.step, "policy_version": learner.version}  # fmt: skip
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics.")
    async def metrics() -> Response:
        return Response(generate_latest(learner.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/status", tags=["progress"], summary="Step, version, the latest step record and evaluation.")
    async def status() -> dict[str, Any]:
        record = learner.last_record
        latest = None
        if record is not None:
            latest = {k: v for k, v in asdict(record).items() if k != "entry_ids"}
        return {
            "run_id": learner.settings.run_id,
            "step": learner.step,
            "policy_version": learner.version,
            "weights_endpoint": getattr(learner, "endpoint", None),
            "last_checkpoint_step": learner.last_checkpoint_step,
            "latest_step": latest,
            "latest_eval": asdict(learner.last_eval) if learner.last_eval else None,
        }

    return app
