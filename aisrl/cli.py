"""The `aisrl` command: one sub-command per service, options derived from each service's settings.

Invariant: importing this module is cheap (no torch, no vLLM); each command imports its
service's heavy parts only when it runs.
"""

from __future__ import annotations

import typer

from aisrl.services.diagnostics.cli import diagnostics_command

app = typer.Typer(help="AIS-RL: FP8 rollouts, BF16 learner, adaptive importance sampling.", no_args_is_help=True)


@app.callback()
def callback() -> None:
    """AIS-RL command line."""


@app.command()
def demo(
    steps: int = typer.Option(20, min=1, max=10_000, help="Batches to send."),
    keep_serving: bool = typer.Option(False, help="Keep the service (and its dashboard) running after the demo."),
) -> None:
    """Run the diagnostics service on generated FP8-like batches and print what AIS computes."""
    from aisrl.demo import run_demo

    run_demo(steps=steps, keep_serving=keep_serving)


# Commands whose options are generated from a service's settings class.
SETTINGS_COMMANDS = [diagnostics_command]
for _command in SETTINGS_COMMANDS:
    _command.register(app)


def main() -> None:
    app(prog_name="aisrl")
