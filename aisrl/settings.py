"""Typed settings shared by every service, and CLI commands derived from them.

Invariant: a setting is declared once, on a pydantic-settings class (type, default, bounds,
description). The environment (with the service's prefix) and the command line both feed
that class; the command line wins. CLI options are generated from the fields, never
re-declared, so `--help`, the environment and the defaults cannot drift apart.
"""

from __future__ import annotations

import enum
import inspect
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import typer
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


def json_object_option(value: Any, field: str) -> Any:
    """A JSON-object setting given as text (env var or CLI) is parsed; anything else passes through."""
    if isinstance(value, str):
        parsed = json.loads(value or "{}")
        if not isinstance(parsed, dict):
            raise ValueError(f"{field} must be a JSON object")
        return parsed
    return value


def env_name(settings_cls: type[BaseSettings], field_name: str) -> str:
    """The environment variable that sets a field."""
    info = settings_cls.model_fields[field_name]
    alias = info.validation_alias
    if isinstance(alias, str):
        return alias
    prefix = settings_cls.model_config.get("env_prefix", "")
    return f"{prefix}{field_name}".upper()


def _option_annotation(annotation: Any) -> Any:
    """The type typer should parse a field as, always optional (None: not given on the command line)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else str
    if typing.get_origin(annotation) is typing.Literal:
        annotation = enum.Enum("Choice", {str(v): str(v) for v in typing.get_args(annotation)}, type=str)
    if annotation not in (bool, int, float, str) and not (
        isinstance(annotation, type) and issubclass(annotation, enum.Enum)
    ):
        annotation = str
    return annotation | None


@dataclass(frozen=True)
class SettingsCommand:
    """A CLI command whose options are the fields of a settings class."""

    name: str
    settings_cls: type[BaseSettings]
    function: Callable[..., Any]
    help: str

    def register(self, app: typer.Typer) -> None:
        app.command(name=self.name, help=self.help)(self.function)


def settings_parameters(settings_cls: type[BaseSettings]) -> list[inspect.Parameter]:
    """One `--field-name` option per field; unset options leave the environment and defaults alone."""
    params = []
    for name, info in settings_cls.model_fields.items():
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        shown = (
            "required"
            if info.is_required()
            else "unset"
            if default is None
            else (default.value if isinstance(default, enum.Enum) else default)
        )
        help_text = f"{info.description or ''} (env: {env_name(settings_cls, name)}; default: {shown})"
        option = typer.Option(None, "--" + name.replace("_", "-"), help=help_text, show_default=False)
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                              annotation=_option_annotation(info.annotation))
        )  # fmt: skip
    return params


def load_settings(settings_cls: type[S], overrides: dict[str, Any] | None = None) -> S:
    """Builds settings from the environment plus explicit overrides (None values are ignored)."""
    given = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in (overrides or {}).items() if v is not None}
    return settings_cls(**given)


def settings_command(
    name: str, settings_cls: type[S], run: Callable[[S], Any], help_text: str | None = None
) -> SettingsCommand:
    """A command whose options are the settings fields; it builds the settings and calls run(settings)."""

    def command(**kwargs: Any) -> Any:
        try:
            settings = load_settings(settings_cls, kwargs)
        except ValidationError as exc:
            problems = "; ".join(
                f"--{'.'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}" for err in exc.errors()
            )
            raise typer.BadParameter(f"invalid settings: {problems}") from None
        return run(settings)

    command.__signature__ = inspect.Signature(settings_parameters(settings_cls))  # type: ignore[attr-defined]
    command.__name__ = name.replace("-", "_")
    doc = help_text or (settings_cls.__doc__ or "").strip().splitlines()[0]
    return SettingsCommand(name, settings_cls, command, doc)
