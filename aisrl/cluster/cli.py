"""`aisrl up` and `aisrl demo`: options derived from ClusterSettings, plus `--config`.

Invariant: every option is a scalar field of ClusterSettings (same name, description, default);
nested sections (ports, services, model_init, threads, task_options) come from the YAML file or
`AISRL_UP_<SECTION>__<KEY>` variables. Without `--config`, the shipped `deploy/cluster.yaml` is
used when it exists, so `aisrl up` and `aisrl demo` run the documented defaults.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import typer

from aisrl.cluster.config import ClusterSettings, SettingsError, load_cluster_settings
from aisrl.settings import settings_parameters

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "cluster.yaml"
SCALAR_FIELDS = [
    name for name, info in ClusterSettings.model_fields.items()
    if info.annotation in (int, float, str, bool, str | None)
]  # fmt: skip


def default_config() -> Path | None:
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def _config_parameter() -> inspect.Parameter:
    option = typer.Option(
        None,
        "--config",
        metavar="FILE",
        help=f"Cluster YAML file (default: {DEFAULT_CONFIG} when present).",
        show_default=False,
    )
    return inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Path | None)


def _load(config: Path | None, overrides: dict[str, Any]) -> ClusterSettings:
    try:
        return load_cluster_settings(config or default_config(), overrides)
    except SettingsError as exc:
        raise typer.BadParameter(str(exc)) from None


def up(config: Path | None = None, **overrides: Any) -> None:
    """Start Redis, diagnostics, the learner and N rollout replicas locally; train until --steps; write a report."""
    from aisrl.cluster.up import run_cluster
    from aisrl.logs import configure_logging

    settings = _load(config, overrides)
    configure_logging("WARNING")
    raise typer.Exit(run_cluster(settings))


def demo(
    diagnostics_only: bool = typer.Option(
        False, "--diagnostics-only", help="Only the diagnostics service on synthetic FP8-like batches (quick look)."
    ),
    steps: int | None = typer.Option(None, help="Learner steps (cluster) or synthetic batches (--diagnostics-only)."),
    keep_serving: bool = typer.Option(False, help="--diagnostics-only: keep the dashboard running afterwards."),
) -> None:
    """The full local cluster on the defaults of deploy/cluster.yaml (`aisrl up`), or --diagnostics-only."""
    if diagnostics_only:
        from aisrl.demo import run_demo

        run_demo(steps=steps or 20, keep_serving=keep_serving)
        return
    up(None, steps=steps)


_up_params = [p for p in settings_parameters(ClusterSettings) if p.name in SCALAR_FIELDS]
up.__signature__ = inspect.Signature([_config_parameter(), *_up_params])  # type: ignore[attr-defined]


def register(app: typer.Typer) -> None:
    """Adds `up` and `demo` to the `aisrl` command."""
    app.command(name="up")(up)
    app.command(name="demo")(demo)
