"""The dashboard's pure parts: downsampling that keeps the latest batch, series, and escaped pages."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from aisrl.services.diagnostics.dashboard import (
    CHARTS,
    SERIES_FIELDS,
    downsample_indices,
    render_dashboard,
    render_index,
    series_payload,
)


@pytest.mark.parametrize(("n", "max_points"), [(1, 5), (5, 5), (6, 5), (23, 5), (10_000, 1000), (9_999, 1000)])
def test_downsampling_keeps_the_latest_and_at_most_max_points(n, max_points):
    indices, stride = downsample_indices(n, max_points)
    assert indices[-1] == n - 1 and len(indices) <= max_points
    assert all(b - a == stride for a, b in itertools.pairwise(indices))
    assert (stride == 1) == (n <= max_points)


def test_series_payload_fields_and_missing_values():
    records = [{"step": s, "alpha": 0.1 * s, "kl": float("nan"), "warnings": [], "mode": "ais", "level": "token"}
               for s in range(4)]  # fmt: skip
    series = series_payload("r", records, max_points=10, total=4, updated_unix=1.0)
    assert series["steps"] == [0, 1, 2, 3] and set(series["fields"]) == set(SERIES_FIELDS)
    assert series["fields"]["alpha"] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert series["fields"]["kl"] == [None] * 4  # non-finite: no point
    assert series["fields"]["frac_m2po"] == [None] * 4  # a record that predates the field
    json.dumps(series, allow_nan=False)  # valid JSON for the browser
    assert {c["id"] for c in CHARTS} >= {"alpha", "rho", "s", "p", "kl", "masked"}
    assert next(c for c in CHARTS if c["id"] == "kl")["axis"] == "log"


def test_pages_escape_run_names():
    evil = "</script><b>x"
    page = render_dashboard([evil])
    assert "</script><b>" not in page and "&lt;/script&gt;" in page
    config = json.loads(re.search(r'id="dashboard-config">(.*?)</script>', page).group(1))
    assert config["runs"] == [evil]
    index = render_index([{"run_id": evil, "n_batches": 1, "latest_step": 0, "trimmed": 0}])
    assert "</script><b>" not in index
