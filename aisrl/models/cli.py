"""`aisrl model ...`: create models, measure precision mismatch. Options are settings fields (see `--help`)."""

from __future__ import annotations

import typer

from aisrl.models.config import MismatchSettings, WarmStartSettings
from aisrl.settings import TYPER_STYLE, settings_command


def _mismatch(settings: MismatchSettings) -> None:
    from aisrl.models.mismatch import run

    run(settings)


def _init(settings: WarmStartSettings) -> None:
    from aisrl.models.warmstart import warm_start

    warm_start(settings)


model_app = typer.Typer(
    help="Create models (a tiny Llama warm-started on a task) and measure their rollout precision mismatch.",
    no_args_is_help=True,
    **TYPER_STYLE,
)
settings_command(
    "init", WarmStartSettings, _init, "Create a tiny model and warm-start it on a task's reference solutions."
).register(model_app)
settings_command(
    "mismatch",
    MismatchSettings,
    _mismatch,
    "Sample held-out prompts with each rollout precision (vLLM) and measure the mismatch to the float32 learner.",
).register(model_app)
