"""The `aisrl` command: one sub-command per service."""

import typer

app = typer.Typer(help="AIS-RL: FP8 rollouts, BF16 learner, adaptive importance sampling.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """AIS-RL command line."""
