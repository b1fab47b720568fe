"""`aisrl learner`: options are the fields of LearnerSettings (see `--help`)."""

from __future__ import annotations

from aisrl.services.learner.config import LearnerSettings
from aisrl.settings import settings_command


def _run(settings: LearnerSettings) -> None:
    from aisrl.services.learner.main import run

    run(settings)


learner_command = settings_command("learner", LearnerSettings, _run)
