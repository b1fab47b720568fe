"""Runs the learner: the step loop, the feeder, the Weights gRPC server and HTTP, in one asyncio process.

Invariants: the ports printed are the ports bound (port 0 resolves first). The first SIGTERM or
SIGINT stops taking batches; the step in progress finishes, then a checkpoint is written and the
groups it includes are acknowledged, and unused groups are handed back. Everything this process
started (servers, clients, an embedded Redis) is stopped on the way out, crash or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from aisrl.http_server import start_http
from aisrl.logs import configure_logging, log_fields
from aisrl.redis_conn import run_on_redis
from aisrl.services.learner.app import create_app
from aisrl.services.learner.config import LearnerSettings
from aisrl.services.learner.learner import Learner

log = logging.getLogger("aisrl.learner")


async def serve(
    settings: LearnerSettings,
    redis_url: str,
    *,
    learner: Learner | None = None,
    stop: asyncio.Event | None = None,
    install_signals: bool = True,
    on_ready: Callable[[Learner, int], None] | None = None,
) -> Learner:
    """Runs the learner until stop is set, a signal arrives or max_steps is reached; returns it closed."""
    stop = stop or asyncio.Event()
    learner = learner or Learner(settings, redis_url)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if install_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    server = http_task = None
    try:
        server, http_task, port = await start_http(create_app(learner), settings.http_host, settings.http_port)
        print(f"learner: HTTP http://{settings.http_host}:{port}  (/healthz /readyz /metrics /status)", flush=True)
        await learner.start()
        print(f"learner: weights gRPC {learner.endpoint}; run {settings.run_id} at step {learner.step}, "
              f"version {learner.version}", flush=True)  # fmt: skip
        if on_ready:
            on_ready(learner, port)
        await learner.run(stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await learner.close()
        if server is not None:
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await http_task
    log.info("learner exited", extra=log_fields(step=learner.step, version=learner.version))
    return learner


def run(settings: LearnerSettings) -> None:
    """Entry point of `aisrl learner`."""
    configure_logging(settings.log_level, settings.log_json)
    run_on_redis("learner", settings.redis_url, lambda url: serve(settings, url), settings.embedded_redis_dir)
