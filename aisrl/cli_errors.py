"""One-line errors, each with its fix, for the failures a user meets first (instead of a traceback).

Invariant: only failures recognised here are shortened (a port in use, a model directory that does
not exist, a Redis that does not answer); anything else propagates with its full traceback.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from aisrl.settings import option_name


class CommandFailure(Exception):
    """A failure the user can fix; its message says how."""


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or the exception itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def ports_in_use(settings: Any) -> list[str]:
    """`--x-port N on HOST` for each port setting whose address cannot be bound now."""
    busy = []
    for name, value in type(settings).model_fields.items():
        del value
        if not name.endswith("_port") or not getattr(settings, name):
            continue
        host = getattr(settings, name.removesuffix("port") + "host", "127.0.0.1")
        port = getattr(settings, name)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                busy.append(f"{option_name(name)} {port} on {host}")
    return busy


def explain(exc: BaseException, settings: Any) -> str | None:
    """The one-line explanation of a recognised failure, else None."""
    import redis.exceptions

    from aisrl.redis_conn import RedisUnavailableError

    if isinstance(exc, redis.exceptions.ConnectionError | RedisUnavailableError):
        url = getattr(settings, "redis_url", None) or "the embedded Redis"
        return (
            f"cannot reach Redis at {url} ({exc}); start it, fix --redis-url (AISRL_REDIS_URL), "
            "or leave it unset for an embedded Redis"
        )
    text = str(exc)
    if isinstance(exc, OSError) and (
        exc.errno == errno.EADDRINUSE or "address already in use" in text.lower() or "cannot bind" in text.lower()
    ):
        busy = ports_in_use(settings)
        where = ", ".join(busy) if busy else text
        return f"port already in use: {where}; choose another port (0 picks a free one) or stop what uses it"
    return None


def check_model_path(settings: Any) -> None:
    """A model_path that is set must be a directory (a typo otherwise surfaces deep inside the engine)."""
    path = getattr(settings, "model_path", None)
    if path and not Path(path).is_dir():
        raise CommandFailure(
            f"--model-path {path}: no such model directory; create one with `aisrl model init --out {path}`, "
            "or leave it unset for a random tiny model (demos and tests)"
        )


@contextlib.contextmanager
def one_line_failures(settings: Any) -> Iterator[None]:
    """Runs a command's body; a recognised failure exits with status 1 and one line on stderr."""
    try:
        check_model_path(settings)
        yield
    except CommandFailure as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (OSError, ExceptionGroup, Exception) as exc:
        for leaf in _leaves(exc):
            message = explain(leaf, settings)
            if message is not None:
                typer.echo(f"error: {message}", err=True)
                raise typer.Exit(1) from None
        raise
