"""What the cluster benchmarks share: the demo's files, the model they run on, their common options."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "runs" / "models" / "countdown-tiny"  # created by `make demo`
CLUSTER_YAML = ROOT / "deploy" / "cluster.yaml"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and --in-process, the same for every benchmark that runs the demo's services."""
    parser.add_argument(
        "--model",
        default="auto",
        help="'demo' (the warm-started runs/models/countdown-tiny), 'tiny' (a random tiny model made here), "
        "a checkpoint directory, or 'auto': demo when it exists, else tiny",
    )
    parser.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rollout setting in_process: vLLM's engine core in the worker (default: deploy/cluster.yaml's)",
    )


def resolve_model(choice: str, tmp: Path) -> tuple[Path, str]:
    """(model directory, label to print) for a --model choice; 'tiny' is created under tmp."""
    if choice == "auto":
        choice = "demo" if (DEMO_MODEL / "config.json").is_file() else "tiny"
    if choice == "tiny":
        from aisrl.models.tiny import init_model_dir

        return init_model_dir(tmp / "tiny", seed=0), "random tiny model"
    model_dir = DEMO_MODEL if choice == "demo" else Path(choice)
    return model_dir, str(model_dir)
