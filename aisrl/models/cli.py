"""`aisrl model ...`: create models. Options are the fields of WarmStartSettings (see `--help`)."""

from __future__ import annotations

import typer

from aisrl.models.config import WarmStartSettings
from aisrl.settings import TYPER_STYLE, settings_command


def _init(settings: WarmStartSettings) -> None:
    from aisrl.models.warmstart import warm_start

    warm_start(settings)


model_app = typer.Typer(help="Create models: a tiny Llama warm-started on a task.", no_args_is_help=True, **TYPER_STYLE)
settings_command(
    "init", WarmStartSettings, _init, "Create a tiny model and warm-start it on a task's reference solutions."
).register(model_app)
