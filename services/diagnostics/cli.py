"""`aisrl diagnostics`: options are the fields of DiagnosticsSettings (see `--help`)."""

from __future__ import annotations

from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.settings import settings_command


def _run(settings: DiagnosticsSettings) -> None:
    from aisrl.services.diagnostics.main import run

    run(settings)


diagnostics_command = settings_command("diagnostics", DiagnosticsSettings, _run)
