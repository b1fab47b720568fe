"""Live progress of a running cluster, read from the services' own HTTP endpoints.

Invariant: the display only reads (GET /metrics from the learner and rollouts, GET
/v1/runs/{run}/batches from diagnostics); a service that does not answer shows as unknown and
never stops the cluster. Parsing (`parse_metrics`, `snapshot_from`) and rendering (`render`,
`one_line`) are pure functions of the fetched text and JSON.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.table import Table
from rich.text import Text

from aisrl.cluster.topology import Topology

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def metric(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@dataclass(frozen=True)
class Snapshot:
    """What the display shows at one moment (None: unknown yet)."""

    run_id: str
    steps_target: int
    elapsed_s: float
    step: int | None = None
    version: int | None = None
    reward: float | None = None
    accuracy: float | None = None  # greedy, held-out, latest evaluation
    accuracy_sampled: float | None = None
    initial_accuracy: float | None = None
    alpha: float | None = None
    kl: float | None = None
    rho: float | None = None
    severity: float | None = None
    penalty: float | None = None
    tokens_per_s: float | None = None  # learner: trained tokens per second of update
    rollout_tokens_per_s: float | None = None  # sum over replicas, latest batch each
    stale_groups: float | None = None
    rollout_versions: Mapping[str, int | None] = field(default_factory=dict)
    states: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    dashboard_url: str = ""
    restarts: Mapping[str, int] = field(default_factory=dict)  # per process restarted by the supervisor


def snapshot_from(
    topology: Topology,
    steps_target: int,
    elapsed_s: float,
    learner: Samples | None,
    rollouts: Mapping[str, Samples | None],
    latest_batch: Mapping[str, Any] | None,
    states: Mapping[str, str],
    initial_accuracy: float | None = None,
) -> Snapshot:
    """Builds the snapshot from parsed learner/rollout metrics and the latest diagnostics record."""
    lm = learner or {}

    def lv(name: str, **labels: str) -> float | None:
        return metric(lm, name, **labels)

    step = lv("aisrl_learner_step")
    version = lv("aisrl_learner_policy_version")
    evaluated = lv("aisrl_learner_accuracy", kind="greedy")
    rollout_tps = [metric(m, "aisrl_rollout_tokens_per_second") for m in rollouts.values() if m]
    batch = latest_batch or {}
    return Snapshot(
        run_id=topology.run_id, steps_target=steps_target, elapsed_s=elapsed_s,
        step=int(step) if step is not None else None, version=int(version) if version is not None else None,
        reward=lv("aisrl_learner_reward_mean") if step else None, accuracy=evaluated,
        accuracy_sampled=lv("aisrl_learner_accuracy", kind="sampled"), initial_accuracy=initial_accuracy,
        alpha=lv("aisrl_learner_alpha") if step else None, kl=lv("aisrl_learner_kl") if step else None,
        rho=batch.get("reliability"), severity=batch.get("severity"), penalty=batch.get("penalty"),
        tokens_per_s=lv("aisrl_learner_tokens_per_second") if step else None,
        rollout_tokens_per_s=sum(v for v in rollout_tps if v is not None) if rollout_tps else None,
        stale_groups=lv("aisrl_learner_stale_groups_total"),
        rollout_versions={name: _int(metric(m, "aisrl_rollout_policy_version")) if m else None
                          for name, m in rollouts.items()},
        states=dict(states), warnings=tuple(batch.get("warnings") or ()), dashboard_url=topology.dashboard_url,
    )  # fmt: skip


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render(snap: Snapshot) -> Group:
    """The live display: one table of training figures, one of processes, the dashboard URL."""
    progress = f"{snap.step if snap.step is not None else '-'} / {snap.steps_target}"
    figures = Table(title=f"aisrl up: run {snap.run_id}  ({snap.elapsed_s:.0f} s)", show_header=True)
    for column in ("step", "reward", "held-out acc", "alpha", "kl", "rho", "s", "p", "tokens/s", "version", "stale"):
        figures.add_column(column, justify="right")
    accuracy = _fmt(snap.accuracy, ".1%")
    if snap.initial_accuracy is not None:
        accuracy += f" (step 0: {snap.initial_accuracy:.1%})"
    figures.add_row(
        progress, _fmt(snap.reward), accuracy, _fmt(snap.alpha), _fmt(snap.kl, ".2e"), _fmt(snap.rho),
        _fmt(snap.severity), _fmt(snap.penalty),
        f"{_fmt(snap.tokens_per_s, '.0f')} train / {_fmt(snap.rollout_tokens_per_s, '.0f')} sample",
        _fmt(snap.version, "d") if snap.version is not None else "-", _fmt(snap.stale_groups, ".0f"),
    )  # fmt: skip
    procs = Table(show_header=True, box=None)
    for column in ("process", "state", "weights version"):
        procs.add_column(column)
    for name, state in snap.states.items():
        version = snap.rollout_versions.get(name) if name.startswith("rollout") else snap.version
        procs.add_row(name, state, "-" if version is None else str(version))
    parts: list[Any] = [figures, procs]
    if snap.restarts:
        shown = ", ".join(f"{name} {count}x" for name, count in snap.restarts.items())
        parts.append(Text(f"restarts: {shown}", style="yellow"))
    if snap.warnings:
        parts.append(Text("health warnings: " + "; ".join(snap.warnings), style="yellow"))
    parts.append(Text(f"dashboard: {snap.dashboard_url}   (Ctrl-C stops every process cleanly)", style="bold"))
    return Group(*parts)


def one_line(snap: Snapshot) -> str:
    """A plain-text progress line (for logs and terminals without live display)."""
    return (
        f"step {snap.step}/{snap.steps_target} reward={_fmt(snap.reward)} acc={_fmt(snap.accuracy, '.1%')} "
        f"alpha={_fmt(snap.alpha)} kl={_fmt(snap.kl, '.2e')} train_tok/s={_fmt(snap.tokens_per_s, '.0f')} "
        f"sample_tok/s={_fmt(snap.rollout_tokens_per_s, '.0f')} version={snap.version} "
        f"stale={_fmt(snap.stale_groups, '.0f')} restarts={sum(snap.restarts.values())}"
    )


class Poller:
    """Fetches what the display needs; keeps every diagnostics record seen (oldest first)."""

    def __init__(self, topology: Topology, steps_target: int, timeout_s: float = 2.0) -> None:
        self.topology = topology
        self.steps_target = steps_target
        self.http = httpx.Client(timeout=timeout_s)
        self.batches: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.initial_accuracy: float | None = None
        self._last: dict[str, Samples] = {}  # last metrics read per process (a stopped process keeps its figures)

    def _text(self, url: str) -> str | None:
        with contextlib.suppress(httpx.HTTPError):
            answer = self.http.get(url)
            if answer.status_code == 200:
                return answer.text
        return None

    def _metrics(self, name: str, base_url: str) -> Samples | None:
        """The process's metrics now, else the last ones read (None before the first answer)."""
        text = self._text(base_url + "/metrics")
        if text is not None:
            with contextlib.suppress(ValueError):
                self._last[name] = parse_metrics(text)
        return self._last.get(name)

    def fetch_new_batches(self) -> list[dict[str, Any]]:
        """Diagnostics records after the last one seen (paged)."""
        new: list[dict[str, Any]] = []
        since = self.batches[-1]["step"] + 1 if self.batches else 0
        url = f"{self.topology.diagnostics_url}/v1/runs/{self.topology.run_id}/batches"
        while since is not None:
            try:
                answer = self.http.get(url, params={"since_step": since, "limit": 1000})
            except httpx.HTTPError:
                break
            if answer.status_code != 200:  # 404: nothing recorded for the run yet
                break
            page = answer.json()
            new.extend(page["batches"])
            since = page.get("next_since_step")
        self.batches.extend(new)
        return new

    def poll(self, states: Mapping[str, str]) -> Snapshot:
        learner = next(p for p in self.topology.processes if p.main)
        rollouts = {
            p.name: self._metrics(p.name, p.http_url) for p in self.topology.processes if p.service == "rollout"
        }
        self.fetch_new_batches()
        learner_metrics = self._metrics(learner.name, learner.http_url)
        latest = self.batches[-1] if self.batches else None
        elapsed = time.monotonic() - self.started
        return snapshot_from(
            self.topology, self.steps_target, elapsed, learner_metrics, rollouts, latest, states, self.initial_accuracy
        )

    def close(self) -> None:
        self.http.close()
