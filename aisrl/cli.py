"""The `aisrl` command: one sub-command per service, options derived from each service's settings.

Invariant: importing this module is cheap (no torch, no vLLM); each command imports its
service's heavy parts only when it runs.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import typer

from aisrl.cluster.cli import register as register_cluster
from aisrl.models.cli import model_app
from aisrl.services.diagnostics.cli import diagnostics_command
from aisrl.services.learner.cli import learner_command
from aisrl.services.rollout.cli import rollout_command
from aisrl.settings import TYPER_STYLE

app = typer.Typer(
    help="AIS-RL: FP8 rollouts, BF16 learner, adaptive importance sampling.",
    no_args_is_help=True,
    add_completion=False,
    **TYPER_STYLE,
)


def aisrl_version() -> str:
    try:
        return version("aisrl")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"aisrl {aisrl_version()}")
        raise typer.Exit()


@app.callback()
def callback(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """AIS-RL command line."""


# Commands whose options are generated from a service's settings class.
SETTINGS_COMMANDS = [diagnostics_command, rollout_command, learner_command]
for _command in SETTINGS_COMMANDS:
    _command.register(app)
app.add_typer(model_app, name="model")
register_cluster(app)  # `aisrl up`, `aisrl demo`


def main() -> None:
    app(prog_name="aisrl")
