"""Runs the diagnostics service: REST (uvicorn) and gRPC in one asyncio process.

Invariant: the ports printed are the ports bound (port 0 resolves before anything is printed);
SIGINT/SIGTERM stop both servers gracefully and, when this process started an embedded Redis,
that Redis too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import uvicorn

from aisrl.http_server import start_http
from aisrl.logs import configure_logging, log_fields
from aisrl.redis_conn import run_on_redis
from aisrl.services.diagnostics.app import create_app
from aisrl.services.diagnostics.config import DiagnosticsSettings

log = logging.getLogger("aisrl.diagnostics")


@dataclass
class RunningDiagnostics:
    """A started service: its ports and the handles needed to stop it."""

    http_port: int
    grpc_port: int
    server: uvicorn.Server
    task: asyncio.Task

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def start_diagnostics(settings: DiagnosticsSettings, redis_url: str) -> RunningDiagnostics:
    """Starts both servers in the running loop and returns once they accept connections."""
    app = create_app(settings, redis_url)
    server, task, http_port = await start_http(app, settings.http_host, settings.http_port, lifespan="on")
    startup_error = getattr(app.state, "startup_error", None)
    if startup_error is not None:  # the gRPC server could not start (e.g. its port is in use)
        server.should_exit = True
        await task
        raise startup_error
    return RunningDiagnostics(http_port, app.state.grpc_port, server, task)


async def serve(settings: DiagnosticsSettings, redis_url: str) -> None:
    running = await start_diagnostics(settings, redis_url)
    print(f"diagnostics: REST http://{settings.http_host}:{running.http_port}  (docs at /docs)", flush=True)
    print(f"diagnostics: gRPC {settings.grpc_host}:{running.grpc_port}", flush=True)
    log.info("started", extra=log_fields(http_port=running.http_port, grpc_port=running.grpc_port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, running.task}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    log.info("stopping")
    await running.stop()


def run(settings: DiagnosticsSettings) -> None:
    """Entry point of `aisrl diagnostics`."""
    configure_logging(settings.log_level, settings.log_json)
    run_on_redis("diagnostics", settings.redis_url, lambda url: serve(settings, url), settings.embedded_redis_dir)
