"""When a crashed process is restarted, and when its crashes are a crash loop that fails the run.

Pure bookkeeping (no processes, the clock is passed in), shared by the supervisor's children and
the embedded Redis: a crash is restarted after a backoff that doubles with each crash inside the
window (`backoff_base_s`, 2x, ... up to `backoff_max_s`); the `max_restarts + 1`-th crash within
`window_s` seconds is a crash loop.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field


class RestartSettings(BaseModel):
    """How `aisrl up` heals a crashed service (every service: see docs/reliability.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_restarts: int = Field(
        5, ge=0, le=1000, description="Restarts of one service within window_s before the run fails (0: never restart)."
    )
    window_s: float = Field(
        300.0, gt=0, le=86_400, description="Seconds over which crashes count towards max_restarts."
    )
    backoff_base_s: float = Field(1.0, ge=0, le=600, description="Wait before the first restart; doubles per crash.")
    backoff_max_s: float = Field(30.0, ge=0, le=3600, description="Longest wait before a restart.")


@dataclass
class CrashHistory:
    """One service's crashes; `crashed()` says how long to wait before restarting it, or None (crash loop)."""

    settings: RestartSettings
    crashes: deque[float] = field(default_factory=deque)
    restarts: int = 0  # over the whole run

    def crashed(self, now: float) -> float | None:
        """Records a crash at `now`; the backoff before the restart, or None when this crash makes a loop."""
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - self.settings.window_s:
            self.crashes.popleft()
        recent = len(self.crashes)
        if recent > self.settings.max_restarts:
            return None
        self.restarts += 1
        return min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (recent - 1))
