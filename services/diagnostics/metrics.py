"""Prometheus metrics of the diagnostics service, on a registry owned by one app instance.

Invariant: no global registry is used, so several service instances (tests, one process
running two apps) never share or collide on metrics.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aisrl.core.types import CORRECTION_STAT_FIELDS

# The per-run gauges exported for the latest batch of each run (alpha_ais: the shadow alpha, what
# ais mode would use, in every mode), then every CorrectionStats field.
GAUGED_FIELDS = (
    "alpha",
    "alpha_ais",
    "alpha_raw",
    "reliability",
    "ess",
    "severity",
    "kl",
    "variance_amplification",
    "penalty",
    "kl_k1",
    "chi2_token",
    "frac_truncated",
    "frac_masked",
    "frac_vetoed",
    "frac_opsm",
    *CORRECTION_STAT_FIELDS,
)


class DiagnosticsMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latest = {
            name: Gauge(f"aisrl_diag_{name}", f"Latest {name} of the run's most recent batch", ["run"],
                        registry=self.registry)
            for name in GAUGED_FIELDS
        }  # fmt: skip
        self.step = Gauge("aisrl_diag_step", "Step of the run's most recent batch", ["run"], registry=self.registry)
        self.compute_seconds = Histogram(
            "aisrl_diag_compute_seconds",
            "Time to compute the coefficient of one batch",
            ["path"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.requests = Counter(
            "aisrl_diag_requests", "Requests served", ["api", "method", "code"], registry=self.registry
        )
        self.tokens = Counter("aisrl_diag_tokens", "Tokens processed", ["path"], registry=self.registry)
        self.trimmed = Counter("aisrl_diag_history_trimmed", "History records trimmed", ["run"], registry=self.registry)

    def observe_record(self, run_id: str, record: dict[str, Any]) -> None:
        for name, gauge in self.latest.items():
            gauge.labels(run=run_id).set(record[name])
        self.step.labels(run=run_id).set(record["step"])
