"""Runs one rollout replica: the worker loop, the weights follower and the HTTP endpoints, in one asyncio process.

Invariants: the HTTP port printed is the port bound (port 0 resolves first). The first SIGTERM
or SIGINT stops reading; the current batch finishes within `shutdown_grace_s`, otherwise (or on
a second signal) it is cancelled and its jobs are released, never acknowledged unwritten. The
engine is created, used and closed on one thread; everything this process started (engine,
HTTP server, embedded Redis, temporary work directory) is stopped on the way out, crash or not.
A stop while the engine is still loading is honoured at once: the load, which cannot be
interrupted, is abandoned (EngineLoad) and `aisrl rollout` stops its child processes and exits 0
without waiting for it. On the way out the weights follower is cancelled until it stops (a
dropped cancellation is retried, for BACKGROUND_STOP_S at most), in-flight HTTP requests get
a few seconds (aisrl.http_server), and closing the engine waits for an engine call still running
(one batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import uvicorn

from aisrl.http_server import start_http
from aisrl.logs import configure_logging, log_fields
from aisrl.redis_conn import async_client, run_on_redis
from aisrl.services.rollout.app import RolloutState, create_app
from aisrl.services.rollout.config import RolloutSettings
from aisrl.services.rollout.engine import RolloutEngine, create_engine
from aisrl.services.rollout.metrics import RolloutMetrics
from aisrl.services.rollout.weights_client import WeightsFollower
from aisrl.services.rollout.worker import Problem, RolloutWorker, Task
from aisrl.streams import RunStreams, ensure_group

log = logging.getLogger("aisrl.rollout")

EngineFactory = Callable[[Path, Path], RolloutEngine]  # (model_dir, work_dir) -> engine
BACKGROUND_STOP_S = 10.0  # longest wait for the weights follower to stop


def default_engine_factory(settings: RolloutSettings) -> EngineFactory:
    def factory(model_dir: Path, work_dir: Path) -> RolloutEngine:
        return create_engine(settings.engine, model_dir, settings.engine_config())

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


class EngineLoad:
    """The engine's start-up (model directory, then the factory) as one call on the engine thread, abandonable.

    Neither step can be interrupted (vLLM on the CPU takes 15-40 s), so a stop during start-up abandons the load
    instead of waiting for it: an engine made after `abandon()` is closed right away, on the thread that made it,
    and never handed over. The load's child processes (vLLM's engine core) are the process entry point's to stop
    (`exit_abandoning_load`) when it cannot wait for the load to end.
    """

    def __init__(self, settings: RolloutSettings, work_dir: Path, factory: EngineFactory) -> None:
        self.settings = settings
        self.work_dir = work_dir
        self.factory = factory
        self._lock = threading.Lock()
        self._abandoned = False
        self._handed_over = False

    def __call__(self) -> tuple[Path, RolloutEngine] | None:
        model_dir = resolve_model_dir(self.settings, self.work_dir)
        if self.abandoned:
            return None
        engine = self.factory(model_dir, self.work_dir)
        with self._lock:
            self._handed_over = not self._abandoned
        if self._handed_over:
            return model_dir, engine
        engine.close()
        log.info("engine load finished after a stop: engine closed", extra=log_fields(model=str(model_dir)))
        return None

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    def abandon(self) -> bool:
        """True when the load was still running (it is abandoned); False when its engine is already handed over."""
        with self._lock:
            self._abandoned = not self._handed_over
            return self._abandoned


async def start_engine(load: EngineLoad, executor: Executor, stop: asyncio.Event) -> tuple[Path, RolloutEngine] | None:
    """Runs `load` on the engine thread; None when stop is set first (the load is then abandoned, not waited for)."""
    future = asyncio.wrap_future(executor.submit(load))
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({future, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if future.done() or not load.abandon():  # finished, or handed over just now: the result is on its way
        return await future
    future.cancel()  # nobody will read the result (and a closed loop is never called back)
    return None


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
) -> bool:
    """Runs the replica until stop is set (or a signal arrives); see the module invariants.

    Returns True once everything it started has stopped. Returns False after a stop during start-up that left
    the engine load running on the engine thread (it cannot be interrupted; see EngineLoad): a process entry
    point then ends with `exit_abandoning_load()` rather than waiting for that thread, as `run` does.
    """
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
    load = EngineLoad(settings, work_dir, engine_factory or default_engine_factory(settings))
    engine: RolloutEngine | None = None
    background: list[asyncio.Task] = []
    server: uvicorn.Server | None = None
    http_task: asyncio.Task | None = None
    worker_task: asyncio.Task | None = None
    signals = (signal.SIGINT, signal.SIGTERM) if install_signals else ()

    def on_signal() -> None:
        if stop.is_set() and worker_task is not None:
            worker_task.cancel()  # second signal: do not wait for the batch
        stop.set()

    for sig in signals:  # before anything slow: a stop during start-up is honoured at once
        loop.add_signal_handler(sig, on_signal)
    try:
        server, http_task, port = await start_http(create_app(state), settings.http_host, settings.http_port)
        print(f"rollout: HTTP http://{settings.http_host}:{port}  (/healthz /readyz /metrics)", flush=True)
        if on_http_port:
            on_http_port(port)
        run_streams = RunStreams(settings.run_id, settings.key_prefix)
        await ensure_group(client, run_streams.prompts, settings.consumer_group)
        started = await start_engine(load, executor, stop) if not stop.is_set() else None
        if started is None:
            log.info("stopped during start-up", extra=log_fields(worker=settings.worker_id,
                                                                 engine_load_abandoned=load.abandoned))  # fmt: skip
            return not load.abandoned
        model_dir, engine = started
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
        return True
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await _cancel_and_wait(background, BACKGROUND_STOP_S)
        state.set_engine_loaded(False)
        if engine is not None:
            await loop.run_in_executor(executor, engine.close)
        # An abandoned load still runs on the engine thread: never wait for it (it closes its own engine).
        executor.shutdown(wait=not load.abandoned, cancel_futures=True)
        if server is not None and http_task is not None:
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await http_task
        await client.aclose()
        if owns_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        log.info("rollout stopped", extra=log_fields(worker=settings.worker_id))


async def _cancel_and_wait(tasks: list[asyncio.Task], timeout_s: float) -> None:
    """Cancels the tasks and waits for them, cancelling again while one keeps running (a dropped cancellation,
    see weights_client.raise_if_cancelled), for at most timeout_s; a task that crashed has its error logged."""
    pending = {task for task in tasks if not task.done()}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
    for task in pending:
        log.error("background task still running after being cancelled", extra=log_fields(task=repr(task)))
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("background task failed", extra=log_fields(task=task.get_name(), error=repr(task.exception())))


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


def exit_abandoning_load(status: int = 0, grace_s: float = 2.0) -> NoReturn:
    """Ends this process without waiting for an abandoned engine load (see EngineLoad).

    Python would wait for the engine thread at exit, and what it is doing cannot be interrupted. So every process
    this one still has below it is the load's (vLLM's engine core, which defers SIGTERM while it starts): it
    gets SIGTERM, SIGKILL after grace_s, and the process exits with os._exit once output is flushed. Call it after
    everything else this process started has stopped (e.g. the embedded Redis).
    """
    import psutil

    me = psutil.Process()
    children = me.children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for _ in range(3):  # the load may have started another one meanwhile
        alive += [p for p in me.children(recursive=True) if p not in alive]
        if not alive:
            break
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        _, alive = psutil.wait_procs(alive, timeout=grace_s)
    if alive:
        log.error("processes of the abandoned engine load did not stop", extra=log_fields(pids=[p.pid for p in alive]))
    log.info("exiting without waiting for the abandoned engine load", extra=log_fields(stopped=len(children)))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run(settings: RolloutSettings) -> None:
    """Entry point of `aisrl rollout`."""
    configure_logging(settings.log_level, settings.log_json)
    finished = run_on_redis("rollout", settings.redis_url, lambda url: serve(settings, url))
    if not finished:
        exit_abandoning_load(0)  # a requested stop: status 0
