"""The dashboard's pure parts: downsampling that keeps the latest batch, series, and escaped pages."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from aisrl.services.diagnostics.dashboard import (
    CHARTS,
    EVAL_FIELDS,
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


def test_series_draws_reward_per_batch_and_every_evaluation_even_when_downsampled():
    def record(step: int) -> dict:
        out = {"step": step, "alpha": 0.5, "warnings": [], "mode": "ais", "level": "token"}
        if step >= 10:  # older records (before the learner sent its signals) have none of the fields
            out["reward_mean"] = 0.01 * step
        if step % 10 == 1 and step > 1:  # an evaluation travels with the batch after the one it ran after
            out |= {"eval_step": step - 1, "accuracy_greedy": step / 100, "accuracy_sampled": None}
        return out

    records = [record(s) for s in range(40)]
    series = series_payload("r", records, max_points=7, total=40, updated_unix=None)
    assert series["stride"] == 6 and 11 not in series["steps"]  # downsampled: step 11 is not a drawn batch
    assert series["eval_steps"] == [10, 20, 30] and set(series["evaluations"]) == set(EVAL_FIELDS)
    assert series["evaluations"]["accuracy_greedy"] == [0.11, 0.21, 0.31]
    assert series["evaluations"]["accuracy_sampled"] == [None] * 3  # sampled accuracy not measured
    reward = dict(zip(series["steps"], series["fields"]["reward_mean"], strict=True))
    assert reward[3] is None and reward[39] == pytest.approx(0.39)
    assert not set(EVAL_FIELDS) & set(series["fields"])
    json.dumps(series, allow_nan=False)
    empty = series_payload("r", [record(0)], max_points=7, total=1, updated_unix=None)
    assert empty["eval_steps"] == [] and empty["evaluations"] == {name: [] for name in EVAL_FIELDS}


def test_page_no_longer_says_reward_and_accuracy_are_missing():
    page = render_dashboard(["r"])
    assert 'id="chart-reward"' in page and 'id="chart-accuracy"' in page
    assert "not charted" not in page and "does not send" not in page


def test_pages_escape_run_names():
    evil = "</script><b>x"
    page = render_dashboard([evil])
    assert "</script><b>" not in page and "&lt;/script&gt;" in page
    config = json.loads(re.search(r'id="dashboard-config">(.*?)</script>', page).group(1))
    assert config["runs"] == [evil]
    index = render_index([{"run_id": evil, "n_batches": 1, "latest_step": 0, "trimmed": 0}])
    assert "</script><b>" not in index
