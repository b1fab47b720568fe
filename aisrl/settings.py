"""Typed settings shared by every service, and CLI commands derived from them.

Invariant: a setting is declared once, on a pydantic-settings class (type, default, bounds,
description). A YAML file (`--config`), the environment (with the service's prefix) and the
command line all feed that class, in that order of precedence from lowest to highest. CLI options
are generated from the fields, never re-declared, so `--help`, the environment and the defaults
cannot drift apart. Booleans are click's own `--x/--no-x` flag pairs; every optional setting
takes `null` (or `none`, or an empty value) from any source to mean "unset".
"""

from __future__ import annotations

import enum
import inspect
import json
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

S = TypeVar("S", bound=BaseSettings)

NULL_WORDS = frozenset({"null", "none", ""})
# Plain click help: typer's rich help shows a `<bool>` type beside every flag, --help included.
TYPER_STYLE: dict[str, Any] = {
    "rich_markup_mode": None,
    "context_settings": {"help_option_names": ["-h", "--help"], "max_content_width": 120},
}


def allows_none(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )


def _file_env_init_sources(
    cls: type[BaseSettings],
    settings_cls: type[BaseSettings],
    init_settings: PydanticBaseSettingsSource,
    env_settings: PydanticBaseSettingsSource,
    dotenv_settings: PydanticBaseSettingsSource,
    file_secret_settings: PydanticBaseSettingsSource,
) -> tuple[PydanticBaseSettingsSource, ...]:
    # Command line (init) > environment > YAML file (`yaml_file`; none: nothing) > defaults.
    return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


class NullableSettings(BaseSettings):
    """Settings whose optional fields read `null`, `none` or an empty value (any case) as None, from any source."""

    @field_validator("*", mode="before")
    @classmethod
    def _null_words(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and value.strip().lower() in NULL_WORDS:
            field = cls.model_fields.get(info.field_name or "")
            if field is not None and allows_none(field.annotation):
                return None
        return value

    settings_customise_sources = classmethod(_file_env_init_sources)  # type: ignore[assignment]


class CommonSettings(NullableSettings):
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


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _value_type(annotation: Any) -> Any:
    """The field's type without None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _choices(value_type: Any) -> list[str] | None:
    if typing.get_origin(value_type) is typing.Literal:
        return [str(v) for v in typing.get_args(value_type)]
    if isinstance(value_type, type) and issubclass(value_type, enum.Enum):
        return [str(m.value) for m in value_type]
    return None


def _metavar(annotation: Any) -> str:
    """What the option takes, e.g. FLOAT, [token|sequence], FLOAT|null."""
    value_type = _value_type(annotation)
    choices = _choices(value_type)
    if choices:
        text = "[" + "|".join(choices) + "]"
    else:
        text = {int: "INT", float: "FLOAT", str: "TEXT"}.get(value_type, "JSON")
    return f"{text}|null" if allows_none(annotation) else text


def shown_default(info: FieldInfo) -> str | None:
    """The default as help shows it; None where it is computed when the process starts (a time, a hostname):
    the description says what it is, so help stays the same from one call to the next."""
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        return json.dumps(info.default_factory()) if info.default_factory in (dict, list) else None  # type: ignore[call-arg]
    default = info.default
    if default is None:
        return "null"
    if isinstance(default, enum.Enum):
        return str(default.value)
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def settings_parameters(settings_cls: type[BaseSettings]) -> list[inspect.Parameter]:
    """One option per field (`--x/--no-x` for booleans); unset options leave the file, environment and defaults
    alone. Values other than booleans reach pydantic as text, so its validators (and `null`) apply."""
    params = []
    for name, info in settings_cls.model_fields.items():
        shown = shown_default(info)
        default_text = f"; default: {shown}" if shown is not None else ""
        help_text = f"{info.description or ''} [env: {env_name(settings_cls, name)}{default_text}]"
        flag = option_name(name)
        if _value_type(info.annotation) is bool:
            option = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
        else:
            option = typer.Option(None, flag, help=help_text, show_default=False, metavar=_metavar(info.annotation))
        annotation = bool | None if _value_type(info.annotation) is bool else str | None
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def settings_class_with_file(settings_cls: type[S], config: str | Path | None) -> type[S]:
    """settings_cls reading the given YAML file as its lowest-precedence source (the class itself without one)."""
    if config is None:
        return settings_cls
    read_settings_file(config)  # a clear error for a missing or malformed file before pydantic reads it
    model_config = SettingsConfigDict(**{**settings_cls.model_config, "yaml_file": str(config)})  # type: ignore[typeddict-item]
    namespace = {"model_config": model_config, "settings_customise_sources": classmethod(_file_env_init_sources)}
    return type(settings_cls.__name__, (settings_cls,), namespace)  # type: ignore[return-value]


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """The mapping a settings YAML file holds; ValueError naming the file for a missing file or a non-mapping."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {p}: expected a mapping of settings at the top level")
    return data


def load_settings(
    settings_cls: type[S], overrides: dict[str, Any] | None = None, config: str | Path | None = None
) -> S:
    """Builds settings from the YAML file (if any), the environment, then explicit overrides (None values ignored)."""
    given = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in (overrides or {}).items() if v is not None}
    return settings_class_with_file(settings_cls, config)(**given)


def describe_settings_error(
    exc: ValidationError, settings_cls: type[BaseSettings], given: dict[str, Any], config: str | Path | None
) -> str:
    """One line per problem, each under the name the user set it by: the option, the variable, or the file's key."""
    file_keys = read_settings_file(config) if config is not None else {}
    problems = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        message = err.get("ctx", {}).get("error", err["msg"])
        message = str(message).removeprefix("Value error, ")
        if field in given:
            where = option_name(field)
        elif field in settings_cls.model_fields and env_name(settings_cls, field) in os.environ:
            where = f"environment variable {env_name(settings_cls, field)}"
        elif field in file_keys:
            where = f"{config}: {field}"
        elif err["type"] == "extra_forbidden" and config is not None:
            where = f"{config}: {field} is not a setting of {settings_cls.__name__}; it"
            message = "must be removed"
        else:
            where = field
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


@dataclass(frozen=True)
class SettingsCommand:
    """A CLI command whose options are the fields of a settings class."""

    name: str
    settings_cls: type[BaseSettings]
    function: Callable[..., Any]
    help: str

    def register(self, app: typer.Typer) -> None:
        app.command(name=self.name, help=self.help)(self.function)


def config_parameter() -> inspect.Parameter:
    option = typer.Option(
        None,
        "--config",
        metavar="FILE",
        help="YAML file of settings (field names as keys); the environment and options override it.",
        show_default=False,
    )
    return inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Path | None)


def settings_command(
    name: str, settings_cls: type[S], run: Callable[[S], Any], help_text: str | None = None
) -> SettingsCommand:
    """A command whose options are `--config` and the settings fields; it builds the settings and calls
    run(settings). Common failures (a port in use, a model or Redis that cannot be reached) end with one
    line that says how to fix them (aisrl.cli_errors)."""
    from aisrl.cli_errors import one_line_failures

    def command(config: Path | None = None, **kwargs: Any) -> Any:
        given = {k: v for k, v in kwargs.items() if v is not None}
        try:
            settings = load_settings(settings_cls, given, config)
        except ValidationError as exc:
            problems = describe_settings_error(exc, settings_cls, given, config)
            raise typer.BadParameter(f"invalid settings: {problems}") from None
        except ValueError as exc:  # the config file itself
            raise typer.BadParameter(str(exc)) from None
        with one_line_failures(settings):
            return run(settings)

    command.__signature__ = inspect.Signature([config_parameter(), *settings_parameters(settings_cls)])  # type: ignore[attr-defined]
    command.__name__ = name.replace("-", "_")
    doc = help_text or (settings_cls.__doc__ or "").strip().splitlines()[0]
    return SettingsCommand(name, settings_cls, command, doc)
