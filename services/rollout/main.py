"""Runs one rollout replica: the worker loop, the weights follower and the HTTP endpoints, in one asyncio process.

Invariants: the HTTP port printed is the port bound (port 0 resolves first). The first SIGTERM
or SIGINT stops reading; the current batch finishes within `shutdown_grace_s`, otherwise (or on
a second signal) it is cancelled and its jobs are released, never acknowledged unwritten. The
engine is created, used and closed on one thread; everything this process started (engine,
HTTP server, embedded Redis, temporary work directory) is stopped on the way out, crash or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn

from aisrl.logs import configure_logging, log_fields
from aisrl.redis_conn import async_client, start_embedded_redis
from aisrl.services.rollout.app import RolloutState, create_app
from aisrl.services.rollout.config import RolloutSettings
from aisrl.services.rollout.engine import RolloutEngine, create_engine
from aisrl.services.rollout.metrics import RolloutMetrics
from aisrl.services.rollout.weights_client import WeightsFollower
from aisrl.services.rollout.worker import Problem, RolloutWorker, Task
from aisrl.streams import RunStreams, ensure_group

log = logging.getLogger("aisrl.rollout")

EngineFactory = Callable[[Path, Path], RolloutEngine]  # (model_dir, work_dir) -> engine


async def start_http(app: Any, host: str, port: int) -> tuple[uvicorn.Server, asyncio.Task, int]:
    """Serves app with uvicorn in the running loop; returns once it accepts connections."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    server.install_signal_handlers = lambda: None  # the caller owns signals
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("rollout HTTP server stopped during start-up")
        await asyncio.sleep(0.02)
    return server, task, sock.getsockname()[1]


def default_engine_factory(settings: RolloutSettings) -> EngineFactory:
    def factory(model_dir: Path, work_dir: Path) -> RolloutEngine:
        return create_engine(settings.engine, model_dir, settings.engine_config(work_dir / "engine"))

    return factory


def default_tasks() -> tuple[Callable[[str], Task], Callable[[str], Problem]]:
    from aisrl.tasks import get_task, problem_from_json

    return get_task, problem_from_json


def resolve_model_dir(settings: RolloutSettings, work_dir: Path) -> Path:
    """settings.model_path, or a random tiny model created in the work directory (demos and tests)."""
    if settings.model_path:
        path = Path(settings.model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_path {path} is not a checkpoint directory (no config.json)")
        return path
    from aisrl.models.tiny import init_model_dir

    log.warning("no model_path: sampling from a random tiny model (demo only)")
    return init_model_dir(work_dir / "tiny-model", seed=settings.seed)


async def serve(
    settings: RolloutSettings,
    redis_url: str,
    *,
    engine_factory: EngineFactory | None = None,
    tasks: Callable[[str], Task] | None = None,
    parse_problem: Callable[[str], Problem] | None = None,
    stop: asyncio.Event | None = None,
    install_signals: bool = True,
    on_http_port: Callable[[int], None] | None = None,
) -> None:
    """Runs the replica until stop is set (or a signal arrives); see the module invariants."""
    stop = stop or asyncio.Event()
    if tasks is None or parse_problem is None:
        tasks, parse_problem = default_tasks()
    owns_work_dir = settings.work_dir is None
    work_dir = Path(settings.work_dir or tempfile.mkdtemp(prefix="aisrl-rollout-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    client = async_client(redis_url)
    metrics = RolloutMetrics()
    state = RolloutState(client, metrics, settings.run_id, settings.worker_id)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    loop = asyncio.get_running_loop()
    engine: RolloutEngine | None = None
    background: list[asyncio.Task] = []
    server, http_task, port = await start_http(create_app(state), settings.http_host, settings.http_port)
    print(f"rollout: HTTP http://{settings.http_host}:{port}  (/healthz /readyz /metrics)", flush=True)
    if on_http_port:
        on_http_port(port)
    worker_task: asyncio.Task | None = None
    signals = (signal.SIGINT, signal.SIGTERM) if install_signals else ()

    def on_signal() -> None:
        if stop.is_set() and worker_task is not None:
            worker_task.cancel()  # second signal: do not wait for the batch
        stop.set()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        run_streams = RunStreams(settings.run_id, settings.key_prefix)
        await ensure_group(client, run_streams.prompts, settings.consumer_group)
        model_dir = await loop.run_in_executor(executor, resolve_model_dir, settings, work_dir)
        factory = engine_factory or default_engine_factory(settings)
        engine = await loop.run_in_executor(executor, factory, model_dir, work_dir)
        state.set_engine_loaded(True)
        follower = WeightsFollower(
            client, run_streams, base_model_dir=model_dir, out_dir=work_dir / "weights",
            current_version=settings.initial_version, fetch_timeout_s=settings.weights_fetch_timeout_s,
            retry_base_s=settings.weights_retry_base_s, retry_max_s=settings.weights_retry_max_s,
            chunk_bytes=settings.weights_chunk_bytes, max_message_bytes=settings.max_message_mb << 20,
            metrics=metrics,
        )  # fmt: skip
        background.append(asyncio.create_task(follower.run()))
        worker = RolloutWorker(
            client, engine, settings, metrics, tasks=tasks, parse_problem=parse_problem,
            model_id=settings.model_id or model_dir.name, weights=follower, executor=executor,
        )  # fmt: skip
        print(f"rollout: worker {settings.worker_id} on run {settings.run_id} ({settings.engine}, "
              f"{settings.precision}, model {model_dir})", flush=True)  # fmt: skip
        if settings.catch_up_timeout_s > 0 and not stop.is_set():
            await _catch_up(follower, settings.catch_up_timeout_s, stop)
        worker_task = asyncio.create_task(worker.run(stop))
        await _run_until_stopped(worker_task, stop, settings.shutdown_grace_s)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        state.set_engine_loaded(False)
        if engine is not None:
            await loop.run_in_executor(executor, engine.close)
        executor.shutdown(wait=True)
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await http_task
        await client.aclose()
        if owns_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        log.info("rollout stopped", extra=log_fields(worker=settings.worker_id))


async def _catch_up(follower: WeightsFollower, timeout_s: float, stop: asyncio.Event) -> None:
    """Before the first batch, waits (bounded) for the newest announced weights, so a late joiner is current."""
    waiter = asyncio.create_task(follower.wait_caught_up(timeout_s))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not waiter.done():
        waiter.cancel()
    elif not waiter.result():
        log.warning("starting with older weights: the announced version is not fetched yet",
                    extra=log_fields(announced=follower.target.version if follower.target else None,
                                     error=follower.last_error))  # fmt: skip


async def _run_until_stopped(worker_task: asyncio.Task, stop: asyncio.Event, grace_s: float) -> None:
    """Waits for the worker; once stop is set, gives it grace_s to finish its batch, then cancels it."""
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({worker_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not worker_task.done():
            log.info("stopping: finishing the current batch", extra=log_fields(grace_s=grace_s))
            done, _ = await asyncio.wait({worker_task}, timeout=grace_s)
            if not done:
                log.warning("grace period over: releasing the current batch")
                worker_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker_task  # re-raises a worker crash
    finally:
        stopper.cancel()


def run(settings: RolloutSettings) -> None:
    """Entry point of `aisrl rollout`."""
    configure_logging(settings.log_level, settings.log_json)
    if settings.redis_url:
        asyncio.run(serve(settings, settings.redis_url))
        return
    with start_embedded_redis() as redis_server:
        print(f"rollout: embedded Redis at {redis_server.url} (set AISRL_REDIS_URL to share one)", flush=True)
        asyncio.run(serve(settings, redis_server.url))
