"""Server-rendered HTML dashboard of a run: inline SVG charts, no script, no CDN (offline machines).

Invariant: a pure function of the records; every value shown is escaped; an empty history
renders a page that says so instead of failing.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from aisrl.core.types import CORRECTION_STAT_FIELDS

# (fields with their legend labels, title, y-range or None for auto, health threshold line or None).
# The first chart draws the alpha the loss applied and the shadow alpha (what ais mode would use),
# so a none/tis/mis run still shows what AIS would have done.
CHARTS: tuple[tuple[tuple[tuple[str, str], ...], str, tuple[float, float] | None, float | None], ...] = (
    ((("alpha", "applied alpha"), ("alpha_ais", "shadow alpha (ais)")), "alpha: applied and shadow", (0.0, 1.0),
     None),
    ((("reliability", "rho"),), "rho = ESS/N (weight reliability)", (0.0, 1.0), 0.3),
    ((("severity", "s"),), "s (divergence severity)", (0.0, 1.0), None),
    ((("penalty", "p"),), "p = min(1, 1/v) (variance penalty)", (0.0, 1.0), None),
    ((("kl", "kl"),), "kl (k3 estimate)", None, 0.1),
    ((("frac_masked", "masked"), ("frac_mask_low", "low side"), ("frac_mask_high", "high side"),
      ("frac_rejected", "divergence"), ("frac_m2po", "m2po")), "share of tokens masked, by reason", (0.0, 1.0), None),
    ((("weight_std", "std of loss weights"),), "loss weights' std (kept tokens)", None, None),
)  # fmt: skip
COLORS = ("#1565c0", "#e65100", "#2e7d32", "#6a1b9a", "#c62828")
# The latest batch's table.
LATEST_FIELDS = ("alpha", "alpha_ais", "alpha_raw", "reliability", "severity", "penalty", "kl",
                 "variance_amplification", "chi2_token", "frac_truncated", "frac_masked", "frac_vetoed", "frac_opsm",
                 *CORRECTION_STAT_FIELDS)  # fmt: skip
WIDTH, HEIGHT, PAD_L, PAD_R, PAD_T, PAD_B = 460, 200, 52, 12, 14, 28


def _fmt(value: float) -> str:
    if value == 0 or (1e-3 <= abs(value) < 1e4):
        return f"{value:.4g}"
    return f"{value:.3e}"


def line_chart_svg(
    steps: Sequence[float],
    series: Sequence[tuple[str, Sequence[float]]],
    y_range: tuple[float, float] | None,
    threshold: float | None,
) -> str:
    """One SVG chart of one or more labelled series against steps (a legend when there are several)."""
    finite = [v for _, values in series for v in values if math.isfinite(v)]
    if y_range is None:
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        if threshold is not None:
            hi = max(hi, threshold)
        lo = min(lo, 0.0)
        if hi <= lo:
            hi = lo + 1.0
    else:
        lo, hi = y_range
    x0, x1 = (min(steps), max(steps)) if steps else (0.0, 1.0)
    if x1 <= x0:
        x1 = x0 + 1.0
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def sx(x: float) -> float:
        return PAD_L + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        y = min(max(y, lo), hi)
        return PAD_T + (1 - (y - lo) / (hi - lo)) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img">',
        f'<rect x="{PAD_L}" y="{PAD_T}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = lo + frac * (hi - lo)
        parts.append(f'<text x="{PAD_L - 4}" y="{sy(y) + 4:.1f}" font-size="10" text-anchor="end">{_fmt(y)}</text>')
    parts.append(f'<text x="{PAD_L}" y="{HEIGHT - 8}" font-size="10">step {_fmt(x0)}</text>')
    parts.append(f'<text x="{WIDTH - PAD_R}" y="{HEIGHT - 8}" font-size="10" text-anchor="end">{_fmt(x1)}</text>')
    if threshold is not None and lo <= threshold <= hi:
        ty = sy(threshold)
        parts.append(
            f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#d33" '
            f'stroke-dasharray="4 3"><title>health threshold {_fmt(threshold)}</title></line>'
        )
    for k, (label, values) in enumerate(series):
        color = COLORS[k % len(COLORS)]
        dash = ' stroke-dasharray="5 3"' if k else ""
        points = [(sx(x), sy(y)) for x, y in zip(steps, values, strict=True) if math.isfinite(y)]
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6"{dash} points="{path}">'
                         f"<title>{html.escape(label)}</title></polyline>")  # fmt: skip
        if len(points) <= 200:  # markers only while they stay readable
            parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{color}"/>' for x, y in points)
        if len(series) > 1:
            ly = PAD_T + 12 + 12 * k
            parts.append(f'<text x="{WIDTH - PAD_R - 4}" y="{ly}" font-size="10" text-anchor="end" fill="{color}" '
                         f'class="legend">{html.escape(label)}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _series(records: Sequence[dict[str, Any]], name: str) -> list[float]:
    """A field over the records; NaN (not drawn) where a record predates the field."""
    return [float(r.get(name, math.nan)) for r in records]


def render_dashboard(run_id: str, records: Sequence[dict[str, Any]], refresh_s: int = 5) -> str:
    """The HTML page for a run's records (oldest first)."""
    title = f"AIS-RL diagnostics: {html.escape(run_id)}"
    head = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>'
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">'
        "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
        ".grid{display:flex;flex-wrap:wrap;gap:16px}.card{border:1px solid #ddd;padding:8px;border-radius:6px}"
        "table{border-collapse:collapse}td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}"
        ".warn{color:#b71c1c}</style></head><body>"
    )
    if not records:
        return head + f"<h1>{title}</h1><p>No batches recorded yet.</p></body></html>"
    latest = records[-1]
    steps = [float(r["step"]) for r in records]
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(_fmt(float(latest[name])))}</td></tr>"
        for name in LATEST_FIELDS
        if name in latest
    )
    warnings = "".join(f'<li class="warn">{html.escape(w)}</li>' for w in latest.get("warnings", []))
    charts = "".join(
        f'<div class="card"><div>{html.escape(title)}</div>'
        f"{line_chart_svg(steps, [(label, _series(records, name)) for name, label in fields], y_range, threshold)}"
        "</div>"
        for fields, title, y_range, threshold in CHARTS
    )
    body = (
        f"<h1>{title}</h1>"
        f"<p>{len(records)} batches, steps {int(steps[0])} to {int(steps[-1])}; mode "
        f"<b>{html.escape(str(latest['mode']))}</b>, level <b>{html.escape(str(latest['level']))}</b>. "
        f"Dashed red lines are health thresholds (ESS/N &lt; 0.3, kl &gt; 0.1). The shadow alpha is what ais mode "
        f"would use on the same batch, whatever the mode. Token entropy is not shown: rollouts do not report it.</p>"
        f'<div class="grid">{charts}</div>'
        f"<h2>Latest batch (step {int(latest['step'])})</h2><table>{rows}</table>"
        + (f"<h3>Warnings</h3><ul>{warnings}</ul>" if warnings else "<p>No health warnings.</p>")
    )
    return head + body + "</body></html>"
