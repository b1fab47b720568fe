"""The run report from synthetic records: parsing the learner's JSON log, the summary, the PNG plots."""

from __future__ import annotations

import io
import json
import logging
import math

from aisrl.cluster.progress import parse_metrics, render, snapshot_from
from aisrl.cluster.report import build_summary, learner_events, learner_starts, per_step_rows, write_report
from aisrl.logs import _Formatter, log_fields

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def learner_log(steps: int, eval_every: int) -> list[str]:
    """Lines as the learner writes them with log_json (the real formatter), mixed with plain prints."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Formatter(as_json=True))
    log = logging.getLogger("aisrl.learner")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for step in range(1, steps + 1):
            log.info("step", extra=log_fields(
                step=step, version=step, reward=round(0.2 + 0.02 * step, 4), alpha=round(0.1 * (step % 3), 4),
                local=step == 2, kl=f"{1e-3 * step:.3g}", loss=0.01, tokens=500, grad_norm=0.5, tok_s=900,
                stale=0, skipped=False, seconds={"wait": 0.1, "update": 0.5}))  # fmt: skip
            if step % eval_every == 0:
                log.info("evaluation", extra=log_fields(step=step, greedy=0.2 + 0.01 * step, sampled=None, n=64,
                                                        seconds=1.0))  # fmt: skip
        log.info("learner stopped", extra=log_fields(step=steps, version=steps))
    finally:
        log.removeHandler(handler)
        log.propagate = True
    return ["learner: HTTP http://127.0.0.1:1234", *stream.getvalue().splitlines(), "Traceback? not JSON {"]


def batches(steps: int) -> list[dict]:
    record = {"reliability": 0.9, "severity": 0.5, "penalty": 1.0, "alpha_raw": 0.45, "warnings": []}
    return [{"step": s, "kl": 1e-3 * s, **record} for s in range(1, steps + 1) if s != 2]  # step 2: alpha was local


def test_learner_events_parse_the_real_log_format():
    steps, evals = learner_events(learner_log(10, 5))
    assert [e["step"] for e in steps] == list(range(1, 11))
    assert [e["step"] for e in evals] == [5, 10]
    assert steps[0]["reward"] == 0.22 and steps[1]["local"] is True


def test_a_resumed_run_is_reported_whole_and_says_where_it_resumed():
    # `aisrl up` twice with one run id appends to one learner log: steps 1..3, then a start that resumed
    # from the checkpoint of step 2 and redid step 3 (its latest record counts) before step 4.
    def event(msg: str, step: int, **fields) -> str:
        return json.dumps({"ts": 1.0, "level": "info", "logger": "aisrl.learner", "msg": msg, "step": step, **fields})

    lines = [event("learner started", 0, resumed_from=None), *learner_log(3, 100),
             event("learner started", 2, resumed_from=2), event("step", 3, reward=0.9),
             event("step", 4, reward=0.5)]  # fmt: skip
    steps, _ = learner_events(lines)
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and steps[2]["reward"] == 0.9
    starts = learner_starts(lines)
    assert starts == [{"step": 0, "resumed_from": None}, {"step": 2, "resumed_from": 2}]
    common = {"run_id": "r", "outcome": "finished", "error": None, "settings": {"steps": 4}, "services": {},
              "steps": steps, "evals": [], "batches": [], "initial_eval": None, "timings": {}}  # fmt: skip
    summary = build_summary(**common, starts=starts)
    assert summary["resumed_from"] == 2 and summary["starts"] == starts
    assert summary["steps"]["reached"] == 4 and [r["step"] for r in summary["per_step"]] == [1, 2, 3, 4]
    assert build_summary(**common, starts=starts[:1])["resumed_from"] is None


def test_rows_join_diagnostics_and_keep_missing_as_null():
    steps, _ = learner_events(learner_log(4, 2))
    rows = per_step_rows(steps, batches(4))
    assert rows[0]["rho"] == 0.9 and rows[0]["s"] == 0.5 and rows[0]["p"] == 1.0
    assert rows[1]["rho"] is None and rows[1]["alpha_computed_locally"]  # no diagnostics record: null, not 0
    assert math.isclose(rows[1]["kl"], 2e-3)  # from the learner's own log when diagnostics has none


def test_summary_and_plots_are_written(tmp_path):
    steps, evals = learner_events(learner_log(12, 4))
    initial = {"step": 0, "greedy": 0.15, "sampled": None, "n": 64, "seconds": 2.0}
    summary = build_summary(
        run_id="r1", outcome="finished", error=None, settings={"steps": 12}, services={"learner": {"lr": 1e-4}},
        steps=steps, evals=evals, batches=batches(12), initial_eval=initial, timings={"total_s": 61.234},
        dashboard_url="http://127.0.0.1:1/v1/runs/r1/dashboard",
    )  # fmt: skip
    assert summary["steps"] == {"target": 12, "reached": 12}
    assert summary["accuracy"]["initial"]["step"] == 0 and summary["accuracy"]["final"]["step"] == 12
    assert math.isclose(summary["accuracy"]["change"], 0.32 - 0.15)
    assert summary["accuracy"]["sampled_change"] is None  # not measured: null, not 0
    assert summary["steps_with_local_alpha"] == 1 and summary["diagnostics_records"] == 11
    assert summary["reward"]["last_steps_mean"] > summary["reward"]["first_steps_mean"]
    paths = write_report(tmp_path, summary)
    saved = json.loads(paths["summary"].read_text())
    assert saved["timings_s"]["total_s"] == 61.23 and saved["files"]["learning"].endswith("learning.png")
    for key in ("learning", "ais"):
        data = paths[key].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_report_of_a_run_that_never_stepped(tmp_path):
    summary = build_summary(run_id="r2", outcome="failed", error="learner: exited with status 1", settings={},
                            services={}, steps=[], evals=[], batches=[], initial_eval=None, timings={})  # fmt: skip
    assert summary["accuracy"]["initial"] is None and summary["reward"]["first_steps_mean"] is None
    paths = write_report(tmp_path, summary)
    assert paths["ais"].read_bytes().startswith(PNG_MAGIC)


def test_progress_snapshot_from_metrics_text():
    from aisrl.cluster.config import load_cluster_settings
    from aisrl.cluster.topology import build_topology, resolve_ports
    from aisrl.redis_conn import free_port

    text = "\n".join([
        "# TYPE aisrl_learner_step gauge", "aisrl_learner_step 7.0",
        "# TYPE aisrl_learner_policy_version gauge", "aisrl_learner_policy_version 7.0",
        "# TYPE aisrl_learner_reward_mean gauge", "aisrl_learner_reward_mean 0.25",
        "# TYPE aisrl_learner_accuracy gauge", 'aisrl_learner_accuracy{kind="greedy"} 0.3',
        "# TYPE aisrl_learner_alpha gauge", "aisrl_learner_alpha 0.12",
        "# TYPE aisrl_learner_stale_groups counter", "aisrl_learner_stale_groups_total 2.0",
    ]) + "\n"  # fmt: skip
    settings = load_cluster_settings(None, {"run_id": "r3", "replicas": 1})
    topo = build_topology(settings, resolve_ports(settings, free_port), "redis://x:1/0")
    rollout = parse_metrics("# TYPE aisrl_rollout_policy_version gauge\naisrl_rollout_policy_version 6.0\n")
    snap = snapshot_from(topo, 40, 12.0, parse_metrics(text), {"rollout-0": rollout, "rollout-1": None},
                         {"reliability": 0.8, "warnings": ["ESS/N < 0.3"]}, {"learner": "running"}, 0.2)  # fmt: skip
    assert (snap.step, snap.version, snap.reward, snap.accuracy, snap.alpha) == (7, 7, 0.25, 0.3, 0.12)
    assert snap.stale_groups == 2.0 and snap.rollout_versions == {"rollout-0": 6, "rollout-1": None}
    assert snap.rho == 0.8 and snap.kl is None
    render(snap)  # renders with unknown values


def test_rolling_mean():
    from aisrl.cluster.report import rolling_mean

    assert rolling_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert rolling_mean([], 5) == []


def test_shadow_alpha_is_reported_and_drawn_beside_the_applied_alpha():
    """A `none` run applies alpha = 0; report.json carries the shadow alpha per step (from diagnostics, else
    from the learner's step event) and ais.png draws both lines, labelled."""
    from aisrl.cluster.report import plot_ais

    steps = [{"step": s, "alpha": 0.0, "alpha_ais": 0.1 * s, "frac_masked": 0.0, "reward": 0.5} for s in (1, 2, 3)]
    diag = [{"step": 1, "alpha_ais": 0.15, "frac_masked": 0.25, "weight_std": 0.3, "ess_sequence": 7.5}]
    rows = per_step_rows(steps, diag)
    assert [r["alpha_ais"] for r in rows] == [0.15, 0.2, 0.30000000000000004]
    assert rows[0]["frac_masked"] == 0.25 and rows[0]["weight_std"] == 0.3 and rows[1]["weight_std"] is None
    common = {"run_id": "r", "outcome": "finished", "error": None, "settings": {}, "services": {},
              "evals": [], "initial_eval": None, "timings": {}}  # fmt: skip
    fig = plot_ais(build_summary(**common, steps=steps, batches=diag))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["applied alpha (used by the loss)"].get_ydata()) == [0.0, 0.0, 0.0]
    assert list(lines["shadow alpha (what ais would use)"].get_ydata()) == [r["alpha_ais"] for r in rows]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "shadow alpha (what ais would use)" in legend and "applied alpha (used by the loss)" in legend


def test_the_precision_note_names_what_the_rollouts_ran():
    from aisrl.cluster.report import precision_note

    services = {
        "learner": {"correction_mode": "ais"},
        "rollout-0": {"engine": "vllm", "precision": "nvfp4_w4a4", "kv_cache_dtype": "fp8_e4m3"},
        "rollout-1": {"engine": "vllm", "precision": "nvfp4_w4a4", "kv_cache_dtype": "fp8_e4m3"},
    }
    note = precision_note(services)
    assert "nvfp4_w4a4 on vllm, fp8_e4m3 KV cache" in note and "fp8_w8" not in note.split(".")[0]
    assert precision_note({"rollout-0": {}}).startswith("Rollouts: bf16 on vllm.")  # the service's default
    assert precision_note({"learner": {}}) == "No rollout process in this report."
