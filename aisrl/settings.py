"""Typed settings shared by every service, and CLI commands derived from them.

Invariant: a setting is declared once, on a pydantic-settings class (type, default, bounds,
description). The environment (with the service's prefix) and the command line both feed
that class; the command line wins. CLI options are generated from the fields, never
re-declared, so `--help`, the environment and the defaults cannot drift apart.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound=BaseSettings)


class CommonSettings(BaseSettings):
    """Fields every service has. Subclasses set their own env prefix."""

    model_config = SettingsConfigDict(env_prefix="AISRL_", extra="forbid", validate_default=True, populate_by_name=True)

    redis_url: str | None = Field(
        None,
        description="Redis URL (redis://host:port/db). Unset: an embedded Redis is started for this process.",
        validation_alias="AISRL_REDIS_URL",
    )
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING or ERROR.")
    log_json: bool = Field(False, description="Write logs as JSON lines instead of text.")


def env_name(settings_cls: type[BaseSettings], field_name: str) -> str:
    """The environment variable that sets a field."""
    info = settings_cls.model_fields[field_name]
    alias = info.validation_alias
    if isinstance(alias, str):
        return alias
    prefix = settings_cls.model_config.get("env_prefix", "")
    return f"{prefix}{field_name}".upper()


def _click_type(annotation: Any) -> tuple[click.ParamType | type, bool]:
    """Maps a field annotation to a click type; the flag says it is a boolean switch."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _click_type(args[0])
        return click.STRING, False
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return click.Choice([str(m.value) for m in annotation]), False
    if annotation is bool:
        return click.BOOL, True
    if annotation is int:
        return click.INT, False
    if annotation is float:
        return click.FLOAT, False
    return click.STRING, False


def settings_options(settings_cls: type[BaseSettings]) -> list[click.Option]:
    """One `--field-name` option per settings field; unset options leave env/defaults alone."""
    options = []
    for name, info in settings_cls.model_fields.items():
        click_type, is_flag = _click_type(info.annotation)
        default = info.get_default(call_default_factory=True)
        shown = "unset" if default is None else (default.value if isinstance(default, enum.Enum) else default)
        help_text = f"{info.description or ''} [env: {env_name(settings_cls, name)}; default: {shown}]"
        flag = "--" + name.replace("_", "-")
        if is_flag:
            decls = [f"{flag}/--no-{name.replace('_', '-')}", name]
            options.append(click.Option(decls, default=None, help=help_text))
        else:
            options.append(click.Option([flag, name], type=click_type, default=None, help=help_text))
    return options


def load_settings(settings_cls: type[S], overrides: dict[str, Any] | None = None) -> S:
    """Builds settings from the environment plus explicit overrides (None values are ignored)."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return settings_cls(**given)


def settings_command(
    name: str, settings_cls: type[S], run: Callable[[S], Any], help_text: str | None = None
) -> click.Command:
    """A click command whose options are the settings fields; it calls run(settings)."""

    def callback(**kwargs: Any) -> Any:
        try:
            settings = load_settings(settings_cls, kwargs)
        except ValidationError as exc:
            problems = "; ".join(
                f"--{'.'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}" for err in exc.errors()
            )
            raise click.UsageError(f"invalid settings: {problems}") from None
        return run(settings)

    return click.Command(
        name,
        params=settings_options(settings_cls),
        callback=callback,
        help=help_text or (settings_cls.__doc__ or "").strip().splitlines()[0],
    )
