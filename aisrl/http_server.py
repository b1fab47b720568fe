"""uvicorn inside a service's own asyncio loop: one home for how every service serves HTTP.

Invariants: the socket is bound before anything is printed (port 0 resolves to the real port); the
caller owns SIGINT/SIGTERM (uvicorn never installs its own handlers); in-flight requests get
`graceful_s` on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, Literal

import uvicorn

GRACEFUL_SHUTDOWN_S = 5.0  # longest wait for in-flight HTTP requests on the way out


async def start_http(
    app: Any,
    host: str,
    port: int,
    *,
    lifespan: Literal["on", "off"] = "off",
    graceful_s: float = GRACEFUL_SHUTDOWN_S,
) -> tuple[uvicorn.Server, asyncio.Task, int]:
    """Serves app with uvicorn in the running loop; returns (server, its task, the bound port) once it accepts
    connections. Stop it with `server.should_exit = True` and await the task."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan=lifespan, timeout_graceful_shutdown=graceful_s
    )
    server = uvicorn.Server(config)
    # uvicorn >= 0.29 swaps in its own SIGINT/SIGTERM handlers while it serves (and raises the signals again when
    # it stops): a signal would stop the HTTP server behind the service's back and reach the service twice.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    server.install_signal_handlers = lambda: None  # the same for older uvicorn
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # re-raises the start-up failure
            raise RuntimeError(f"HTTP server on {host}:{port} stopped during start-up")
        await asyncio.sleep(0.02)
    return server, task, sock.getsockname()[1]
