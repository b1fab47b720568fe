"""The diagnostics service's HTML pages: the index of runs and a run's dashboard (one or more runs overlaid).

Invariants: pages and the series they chart are pure functions of the records; every value put into
HTML is escaped (the page's data travel as JSON that scripts insert as text); every script and style
is served by this service (plotly.min.js from the installed `plotly` package, dashboard.js from this
package), so the pages work on a machine with no internet access; when a series has more batches than
it draws, it says so (how many of how many, every how many-th).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import plotly

from aisrl.core.types import CORRECTION_STAT_FIELDS

STATIC_DIR = Path(__file__).parent / "static"
# Files the pages load, all served by this service (GET /static/<name>).
STATIC_FILES = {
    "plotly.min.js": Path(plotly.__file__).parent / "package_data" / "plotly.min.js",
    "dashboard.js": STATIC_DIR / "dashboard.js",
}
DEFAULT_MAX_POINTS = 1000  # points per series drawn; longer histories are downsampled (and the page says so)
REFRESH_S = 5
RELIABILITY_THRESHOLD = 0.3
KL_THRESHOLD = 0.1

# Charts: id, title, [(record field, legend label)], y axis ("linear", "log"), fixed y range, health threshold; a point
# per drawn batch, or with "x": "eval" a point per held-out evaluation (series' eval_steps and evaluations).
# The first draws the alpha the loss applied and the shadow alpha (what ais mode would use), so a none/tis/mis run
# still shows what AIS would have done.
CHARTS: tuple[dict[str, Any], ...] = (
    {"id": "alpha", "title": "alpha: applied and shadow", "axis": "linear", "range": [0, 1], "threshold": None,
     "fields": [["alpha", "applied alpha"], ["alpha_ais", "shadow alpha (ais)"]]},
    {"id": "reward", "title": "mean training reward of the batch", "axis": "linear", "range": None, "threshold": None,
     "fields": [["reward_mean", "reward"]]},
    {"id": "accuracy", "title": "held-out accuracy (at evaluation steps)", "axis": "linear", "range": [0, 1],
     "threshold": None, "x": "eval", "fields": [["accuracy_greedy", "greedy"], ["accuracy_sampled", "sampled"]]},
    {"id": "rho", "title": "rho = ESS/N (weight reliability)", "axis": "linear", "range": [0, 1],
     "threshold": RELIABILITY_THRESHOLD, "fields": [["reliability", "rho"]]},
    {"id": "s", "title": "s (divergence severity)", "axis": "linear", "range": [0, 1], "threshold": None,
     "fields": [["severity", "s"]]},
    {"id": "p", "title": "p = min(1, 1/v) (variance penalty)", "axis": "linear", "range": [0, 1], "threshold": None,
     "fields": [["penalty", "p"]]},
    {"id": "kl", "title": "kl (k3 estimate), log scale", "axis": "log", "range": None, "threshold": KL_THRESHOLD,
     "fields": [["kl", "kl"]]},
    {"id": "masked", "title": "share of tokens masked, by reason", "axis": "linear", "range": [0, 1],
     "threshold": None, "fields": [["frac_masked", "masked"], ["frac_mask_low", "low side"],
                                   ["frac_mask_high", "high side"], ["frac_rejected", "divergence"],
                                   ["frac_m2po", "m2po"]]},
    {"id": "weight_std", "title": "loss weights' std (kept tokens)", "axis": "linear", "range": None,
     "threshold": None, "fields": [["weight_std", "std of loss weights"]]},
)  # fmt: skip
SERIES_FIELDS = tuple(dict.fromkeys(name for c in CHARTS if c.get("x") != "eval" for name, _ in c["fields"]))
EVAL_FIELDS = tuple(dict.fromkeys(name for c in CHARTS if c.get("x") == "eval" for name, _ in c["fields"]))
# The latest batch's table.
LATEST_FIELDS = ("alpha", "alpha_ais", "alpha_raw", "reward_mean", "reliability", "severity", "penalty", "kl",
                 "variance_amplification", "chi2_token", "frac_truncated", "frac_masked", "frac_vetoed", "frac_opsm",
                 *CORRECTION_STAT_FIELDS)  # fmt: skip
SIGNALS_NOTE = (
    "Reward is the mean training reward of each batch; held-out accuracy has a point per learner evaluation, at the "
    "step it ran after (the learner sends it with its next batch, so the newest evaluation appears one batch later). "
    "Batches recorded without them (an older learner) leave gaps. Token entropy is not shown: rollouts do not "
    "report it."
)

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
    ".grid{display:flex;flex-wrap:wrap;gap:16px}.card{border:1px solid #ddd;padding:4px;border-radius:6px}"
    "table{border-collapse:collapse}td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}"
    ".warn{color:#b71c1c}.note{color:#555}"
)


def _number(value: Any) -> float | None:
    """A JSON-safe number: None where the record lacks the field or holds a non-finite value."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def downsample_indices(n: int, max_points: int) -> tuple[list[int], int]:
    """Indices of the records drawn (every stride-th, the latest always kept) and the stride."""
    if n <= max_points:
        return list(range(n)), 1
    stride = math.ceil(n / max_points)
    indices = list(range((n - 1) % stride, n, stride))  # aligned so that the latest batch is drawn
    return indices, stride


def series_payload(
    run_id: str, records: Sequence[dict[str, Any]], max_points: int, total: int, updated_unix: float | None
) -> dict[str, Any]:
    """What a run's dashboard charts: steps and every charted field, downsampled to max_points, and the latest
    record. `total` is how many batches the run holds (records may be only the newest of them)."""
    indices, stride = downsample_indices(len(records), max_points)
    chosen = [records[i] for i in indices]
    evaluated = [r for r in records if r.get("eval_step") is not None]  # sparse: all of them, never downsampled
    return {
        "run_id": run_id,
        "total": total,
        "loaded": len(records),
        "shown": len(chosen),
        "stride": stride,
        "updated_unix": updated_unix,
        "steps": [int(r["step"]) for r in chosen],
        "fields": {name: [_number(r.get(name)) for r in chosen] for name in SERIES_FIELDS},
        "eval_steps": [int(r["eval_step"]) for r in evaluated],
        "evaluations": {name: [_number(r.get(name)) for r in evaluated] for name in EVAL_FIELDS},
        "latest": {name: _number(records[-1].get(name)) for name in LATEST_FIELDS} if records else {},
        "latest_step": int(records[-1]["step"]) if records else None,
        "mode": str(records[-1].get("mode")) if records else None,
        "level": str(records[-1].get("level")) if records else None,
        "warnings": [str(w) for w in records[-1].get("warnings", [])] if records else [],
    }


def _head(title: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>"
    )


def dashboard_path(run_id: str, compare: Sequence[str] = ()) -> str:
    query = "".join(f"{'&' if i else '?'}compare={quote(c, safe='')}" for i, c in enumerate(compare))
    return f"/v1/runs/{quote(run_id, safe='')}/dashboard{query}"


def _inline_script(path: Path) -> str:
    # "</script" inside a script would end it early; "<\\/" means the same in JS strings and regexes.
    return "<script>" + path.read_text(encoding="utf-8").replace("</script", "<\\/script") + "</script>"


def render_dashboard(
    run_ids: Sequence[str],
    root_path: str = "",
    max_points: int = DEFAULT_MAX_POINTS,
    snapshot: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The page for one run, or several overlaid (the first is the one whose latest batch is tabled). The charts
    are drawn by dashboard.js from GET /v1/runs/<run>/series, refreshed every REFRESH_S seconds; with `snapshot`
    (series_payload of each run) the page is a self-contained file instead: data and scripts inline, no refresh."""
    title = "AIS-RL diagnostics: " + " vs ".join(run_ids)
    config = {
        "runs": list(run_ids),
        "base": root_path,
        "charts": CHARTS,
        "latest_fields": LATEST_FIELDS,
        "max_points": max_points,
        "refresh_s": REFRESH_S,
        "snapshot": list(snapshot) if snapshot is not None else None,
    }
    # "</" cannot end the script element early: JSON escapes of "<" keep any run name inert.
    data = json.dumps(config).replace("<", "\\u003c")
    charts = "".join(f'<div class="card"><div id="chart-{c["id"]}" class="chart"></div></div>' for c in CHARTS)
    if snapshot is None:
        scripts = "".join(f'<script src="{html.escape(root_path)}/static/{name}"></script>' for name in STATIC_FILES)
        back = f'<p><a href="{html.escape(root_path)}/">all runs</a></p>'
    else:
        scripts = "".join(_inline_script(path) for path in STATIC_FILES.values())
        back = '<p class="note">A snapshot saved from the diagnostics service; it does not refresh.</p>'
    return (
        _head(title)
        + f"<h1>{html.escape(title)}</h1>{back}"
        + '<p id="status" class="note">loading...</p><ul id="sampling" class="note"></ul>'
        + '<p class="note">Dashed red lines are health thresholds (ESS/N &lt; '
        + f"{RELIABILITY_THRESHOLD}, kl &gt; {KL_THRESHOLD}). The shadow alpha is what ais mode would use on the "
        + "same batch, whatever the mode. The x axis is the training step; kl is drawn on a log scale "
        + "(batches with kl = 0 have no point there). "
        + f"{html.escape(SIGNALS_NOTE)}</p>"
        + f'<div class="grid">{charts}</div>'
        + '<h2 id="latest-title">Latest batch</h2><table id="latest"></table><div id="warnings"></div>'
        + f'<script type="application/json" id="dashboard-config">{data}</script>'
        + scripts
        + "</body></html>"
    )


def render_index(runs: Sequence[dict[str, Any]], root_path: str = "") -> str:
    """GET /: every run with a link to its dashboard, and a form that opens several overlaid."""
    head = _head("AIS-RL diagnostics")
    links = (
        f'<a href="{html.escape(root_path)}/docs">API docs</a> &middot; '
        f'<a href="{html.escape(root_path)}/metrics">metrics</a> &middot; '
        f'<a href="{html.escape(root_path)}/v1/runs">runs (JSON)</a>'
    )
    if not runs:
        return head + f"<h1>AIS-RL diagnostics</h1><p>{links}</p><p>No runs recorded yet.</p></body></html>"
    rows = "".join(
        "<tr>"
        f'<td><input type="checkbox" name="run" value="{html.escape(r["run_id"])}"></td>'
        f'<td><a class="run" href="{html.escape(root_path + dashboard_path(r["run_id"]))}">'
        f"{html.escape(r['run_id'])}</a></td>"
        f"<td>{int(r['n_batches'])}</td><td>{'' if r['latest_step'] is None else int(r['latest_step'])}</td>"
        f"<td>{int(r['trimmed'])}</td></tr>"
        for r in runs
    )
    compare = (
        "<script>function openCompare(form){const runs=[...form.querySelectorAll('input[name=run]:checked')]"
        ".map(i=>i.value);if(!runs.length)return false;const [first,...rest]=runs;"
        "location.href=" + json.dumps(root_path) + "+'/v1/runs/'+encodeURIComponent(first)+'/dashboard'+"
        "rest.map((r,i)=>(i?'&':'?')+'compare='+encodeURIComponent(r)).join('');return false;}</script>"
    )
    return (
        head
        + f"<h1>AIS-RL diagnostics</h1><p>{links}</p>"
        + '<form onsubmit="return openCompare(this)"><table><tr><th></th><th>run</th><th>batches</th>'
        + f"<th>latest step</th><th>trimmed</th></tr>{rows}</table>"
        + '<p><button type="submit">Compare the checked runs</button></p></form>'
        + compare
        + "</body></html>"
    )
