"""`aisrl rollout`: options are the fields of RolloutSettings (see `--help`)."""

from __future__ import annotations

from aisrl.services.rollout.config import RolloutSettings
from aisrl.settings import settings_command


def _run(settings: RolloutSettings) -> None:
    from aisrl.services.rollout.main import run

    run(settings)


rollout_command = settings_command("rollout", RolloutSettings, _run)
