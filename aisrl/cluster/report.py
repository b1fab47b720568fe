"""The run report: a JSON summary and PNG plots, built from the records the services left behind.

Invariant: the summary and the figures are pure functions of the records (the learner's JSON log
events, the diagnostics service's batch records, the step-0 evaluation, timings); only
`write_report` touches the disk. A quantity that was not measured is null in the JSON and absent
from the plots, never a made-up zero. Sources:
- per step (reward, alpha, kl, loss, tokens, tokens/s, staleness): the learner's `step` log events;
- where a resumed run picked up: the learner's `learner started` events (its log is appended to);
- held-out accuracy: the learner's `evaluation` events, plus the step-0 evaluation run before training;
- rho, s, p, the shadow alpha alpha_ais, the masked share, the loss weights' std and the sequence-level
  ESS (and alpha/kl as diagnostics recorded them): GET /v1/runs/{run}/batches; the learner's step
  events carry alpha_ais and frac_masked too, used when diagnostics has no record of the step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def precision_note(services: Mapping[str, Mapping[str, Any]]) -> str:
    """What the rollouts of this run sampled with, from the rollout processes' own settings (never a constant:
    a report must not name a precision its samples were not produced with)."""
    seen = sorted(
        {
            (str(cfg.get("engine", "vllm")), str(cfg.get("precision", "bf16")), str(cfg.get("kv_cache_dtype", "auto")))
            for name, cfg in services.items()
            if name.startswith("rollout")
        }
    )
    if not seen:
        return "No rollout process in this report."
    runs = "; ".join(f"{p} on {e}" + (f", {kv} KV cache" if kv != "auto" else "") for e, p, kv in seen)
    return (
        f"Rollouts: {runs}. On the CPU every low-precision scheme (and `fp8`, which is fp8_w8 there) is emulated: "
        "values rounded to the format and computed in BF16/float32, which reproduces the rounding part of the "
        "mismatch and gives no speedup; every trajectory group carries the exact label (docs/precision.md)."
    )


def _learner_json(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The learner's own JSON log events that carry a step; non-JSON lines (prints, library warnings) are skipped."""
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("logger") == "aisrl.learner" and "step" in event:
            yield event


def learner_events(lines: Iterable[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step events, evaluation events) from the learner's log: JSON lines with msg `step` / `evaluation`.

    A step logged twice (a resumed run redoing a step) keeps the latest.
    """
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for event in _learner_json(lines):
        if event.get("msg") == "step":
            steps[int(event["step"])] = event
        elif event.get("msg") == "evaluation":
            evals[int(event["step"])] = event
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def learner_starts(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Every start of the learner, oldest first: the step it started at and the checkpoint step it resumed
    from (None: the initial model). A run resumed with the same run id appends to the same log."""
    return [{"step": int(e["step"]), "resumed_from": e.get("resumed_from")}
            for e in _learner_json(lines) if e.get("msg") == "learner started"]  # fmt: skip


def _num(value: Any) -> float | None:
    """A finite float, or None (the learner logs kl as a formatted string; None stays None)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def per_step_rows(steps: Sequence[Mapping[str, Any]], batches: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per learner step, joined with the diagnostics record of the same step (when there is one)."""
    by_step = {int(b["step"]): b for b in batches}
    rows = []
    for event in steps:
        step = int(event["step"])
        diag = by_step.get(step, {})
        rows.append({
            "step": step, "version": event.get("version"), "reward": _num(event.get("reward")),
            "alpha": _num(event.get("alpha")), "alpha_ais": _num(diag.get("alpha_ais", event.get("alpha_ais"))),
            "frac_masked": _num(diag.get("frac_masked", event.get("frac_masked"))),
            "weight_std": _num(diag.get("weight_std")), "ess_sequence": _num(diag.get("ess_sequence")),
            "kl": _num(diag.get("kl", event.get("kl"))),
            "rho": _num(diag.get("reliability")), "s": _num(diag.get("severity")), "p": _num(diag.get("penalty")),
            "alpha_raw": _num(diag.get("alpha_raw")), "loss": _num(event.get("loss")),
            "grad_norm": _num(event.get("grad_norm")), "tokens": event.get("tokens"),
            "tokens_per_s": _num(event.get("tok_s")), "stale": event.get("stale"),
            "skipped": bool(event.get("skipped", False)), "alpha_computed_locally": bool(event.get("local", False)),
            "warnings": list(diag.get("warnings") or []), "seconds": event.get("seconds"),
        })  # fmt: skip
    return rows


def eval_rows(evals: Sequence[Mapping[str, Any]], initial: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Held-out evaluations by step; the step-0 one (before any update) first when it was run."""
    rows = []
    if initial is not None:
        rows.append({"step": 0, "greedy": _num(initial.get("greedy")), "sampled": _num(initial.get("sampled")),
                     "n": initial.get("n"), "seconds": _num(initial.get("seconds"))})  # fmt: skip
    for event in evals:
        if int(event["step"]) == 0 and initial is not None:
            continue
        rows.append({"step": int(event["step"]), "greedy": _num(event.get("greedy")),
                     "sampled": _num(event.get("sampled")), "n": event.get("n"),
                     "seconds": _num(event.get("seconds"))})  # fmt: skip
    return rows


def build_summary(
    *,
    run_id: str,
    outcome: str,
    error: str | None,
    settings: Mapping[str, Any],
    services: Mapping[str, Mapping[str, Any]],
    steps: Sequence[Mapping[str, Any]],
    evals: Sequence[Mapping[str, Any]],
    batches: Sequence[Mapping[str, Any]],
    initial_eval: Mapping[str, Any] | None,
    timings: Mapping[str, float],
    dashboard_url: str | None = None,
    starts: Sequence[Mapping[str, Any]] = (),
    restarts: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The JSON summary of a run (see the module docstring for where each figure comes from).

    A resumed run (same run id) is reported as a whole: every step since the run began, `starts` (each
    start of the learner) and `resumed_from` (the checkpoint step the latest start resumed from, null
    for a fresh start); `timings_s` are of the latest `aisrl up` only.
    """
    rows = per_step_rows(steps, batches)
    evaluations = eval_rows(evals, initial_eval)
    first, last = (evaluations[0], evaluations[-1]) if evaluations else (None, None)
    if last is first:
        last = None
    rewards = [r["reward"] for r in rows if r["reward"] is not None]
    window = max(1, min(5, len(rewards) // 4)) if rewards else 0
    return {
        "run_id": run_id,
        "outcome": outcome,
        "error": error,
        "steps": {"target": settings.get("steps"), "reached": rows[-1]["step"] if rows else 0},
        "resumed_from": starts[-1].get("resumed_from") if starts else None,
        "starts": [dict(s) for s in starts],
        "restarts": dict(restarts or {}),  # per process the supervisor restarted after a crash (this `aisrl up`)
        "accuracy": {
            "metric": "accuracy on the task's held-out split (share of answers with reward 1): greedy, and "
                      "sampled at the rollout temperature when eval_samples > 0",
            "initial": first, "final": last,
            "change": _change(first, last, "greedy"), "sampled_change": _change(first, last, "sampled"),
        },
        "reward": {
            "first_steps_mean": _mean(rewards[:window]), "last_steps_mean": _mean(rewards[-window:]),
            "window": window, "curve": [[r["step"], r["reward"]] for r in rows],
        },
        "per_step": rows,
        "evaluations": evaluations,
        "diagnostics_records": len(batches),
        "steps_with_local_alpha": sum(r["alpha_computed_locally"] for r in rows),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "dashboard_url": dashboard_url,
        "precision_note": precision_note(services),
        "settings": dict(settings),
        "services": {k: dict(v) for k, v in services.items()},
    }  # fmt: skip


def _change(first: Mapping[str, Any] | None, last: Mapping[str, Any] | None, key: str) -> float | None:
    if not first or not last or first.get(key) is None or last.get(key) is None:
        return None
    return last[key] - first[key]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the (up to) window - 1 values before it."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def plot_learning(summary: Mapping[str, Any]) -> Figure:
    """Mean reward per step and held-out accuracy (greedy, sampled) vs step."""
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    curve = [(s, r) for s, r in summary["reward"]["curve"] if r is not None]
    if curve:
        ax.plot(*zip(*curve, strict=True), color="tab:blue", alpha=0.35, label="mean reward (training batch)")
        smooth = rolling_mean([r for _, r in curve], 5)
        ax.plot([s for s, _ in curve], smooth, color="tab:blue", label="mean reward, rolling mean of 5 steps")
    for key, style, label in (("greedy", "o-", "held-out accuracy (greedy)"),
                              ("sampled", "s--", "held-out accuracy (sampled)")):  # fmt: skip
        points = [(e["step"], e[key]) for e in summary["evaluations"] if e[key] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xlabel("learner step")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    _legend(ax)
    ax.set_title(f"run {summary['run_id']}: reward and held-out accuracy")
    return fig


def plot_ais(summary: Mapping[str, Any]) -> Figure:
    """Applied and shadow alpha, masked share, rho, s and p (top, in [0, 1]) and kl (bottom, log scale) vs step."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, layout="constrained")
    rows = summary["per_step"]
    styles = {"alpha": ("applied alpha (used by the loss)", "k", "-", 2.2),
              "alpha_ais": ("shadow alpha (what ais would use)", "tab:orange", "--", 1.8),
              "frac_masked": ("share of tokens masked", "tab:purple", (0, (1, 1)), 1.2),
              "rho": ("rho (ESS/N)", "tab:blue", "--", 1.2),
              "s": ("s (severity)", "tab:green", ":", 1.6), "p": ("p (penalty)", "tab:red", "-.", 1.2)}  # fmt: skip
    for key, (label, color, line, width) in styles.items():
        points = [(r["step"], r[key]) for r in rows if r[key] is not None]
        if points:
            top.plot(*zip(*points, strict=True), color=color, linestyle=line, linewidth=width, marker=".", label=label)
    top.set_ylabel("value")
    top.set_ylim(-0.02, 1.02)
    top.grid(alpha=0.3)
    _legend(top)
    top.set_title(f"run {summary['run_id']}: AIS coefficient and diagnostics")
    kl = [(r["step"], r["kl"]) for r in rows if r["kl"] is not None and r["kl"] > 0]
    if kl:
        bottom.plot(*zip(*kl, strict=True), marker=".", color="tab:red", label="kl (k3, mu || pi)")
        bottom.set_yscale("log")
        _legend(bottom)
    bottom.set_xlabel("learner step")
    bottom.set_ylabel("kl per token")
    bottom.grid(alpha=0.3)
    return fig


def _legend(ax: Any) -> None:
    """A legend when something was plotted, else a note that nothing was measured."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=ax.transAxes, color="gray")


def write_report(run_dir: Path, summary: dict[str, Any]) -> dict[str, Path]:
    """Writes report.json, learning.png and ais.png into run_dir; returns their paths."""
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"summary": run_dir / "report.json", "learning": run_dir / "learning.png", "ais": run_dir / "ais.png"}
    summary = {**summary, "files": {k: str(v) for k, v in paths.items()}}
    paths["summary"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    for key, make in (("learning", plot_learning), ("ais", plot_ais)):
        fig = make(summary)
        try:
            fig.savefig(paths[key], dpi=110)
        finally:
            plt.close(fig)
    return paths
