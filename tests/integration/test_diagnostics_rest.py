"""The diagnostics REST API over real HTTP (uvicorn on an ephemeral port) with a real Redis."""

from __future__ import annotations

import json
import re
import zlib

import grpc
import httpx
import numpy as np
import pytest

from aisrl.core.ais import arrays_from_ragged, compute_coefficient
from aisrl.core.synthetic import synthetic_batch
from aisrl.core.types import CORRECTION_STAT_FIELDS, CorrectionConfig, CorrectionMode, WeightLevel
from aisrl.redis_conn import start_embedded_redis
from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.services.diagnostics.dashboard import CHARTS
from aisrl.services.diagnostics.main import start_diagnostics
from aisrl.v1 import diagnostics_pb2_grpc
from aisrl.wire.coefficient import batch_to_pb
from tests.correction_cases import CORRECTION_CASES


@pytest.fixture
async def service(redis_url):
    running = await start_diagnostics(DiagnosticsSettings(http_port=0, grpc_port=0, redis_url=redis_url), redis_url)
    yield running
    await running.stop()


@pytest.fixture
async def http(service):
    async with httpx.AsyncClient(base_url=service.http_url, timeout=30) as client:
        yield client


def _ragged(seed: int = 0, n: int = 6):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, size=n)
    lp_pi = [(-rng.gamma(0.6, 1.0, size=k)).tolist() for k in lengths]
    lp_mu = [np.minimum(np.array(p) + rng.normal(0, 0.2, size=len(p)), 0).tolist() for p in lp_pi]
    advantages = rng.normal(size=n).tolist()
    return lp_pi, lp_mu, advantages


@pytest.mark.parametrize("mode", [m.value for m in CorrectionMode])
@pytest.mark.parametrize("level", [lv.value for lv in WeightLevel])
@pytest.mark.parametrize("cap", [None, 1.5, 2.0, 5.0])
async def test_coefficient_matches_core(http, mode, level, cap):
    lp_pi, lp_mu, adv = _ragged(seed=zlib.crc32(f"{mode}{level}{cap}".encode()))
    body = {"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv,
            "config": {"mode": mode, "level": level, "cap": cap, "fixed_alpha": 0.3}}  # fmt: skip
    reply = await http.post("/v1/coefficient", json=body)
    assert reply.status_code == 200, reply.text
    got = reply.json()
    want = compute_coefficient(
        arrays_from_ragged(lp_pi, lp_mu, adv), CorrectionConfig(mode=mode, level=level, cap=cap, fixed_alpha=0.3)
    )
    for name in ("alpha", "alpha_raw", "reliability", "ess", "severity", "kl", "variance_amplification", "penalty"):
        assert got[name] == pytest.approx(getattr(want, name), rel=1e-12, abs=1e-300), name
    assert got["raw"]["reliability"] == pytest.approx(want.raw.reliability, rel=1e-12)
    assert got["n_tokens"] == sum(len(x) for x in lp_pi)


async def test_defaults_apply_when_config_is_omitted(http):
    lp_pi, lp_mu, adv = _ragged(1)
    got = (await http.post("/v1/coefficient", json={"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv})).json()
    want = compute_coefficient(arrays_from_ragged(lp_pi, lp_mu, adv), CorrectionConfig())
    assert got["mode"] == "ais" and got["level"] == "token"
    assert got["alpha"] == pytest.approx(want.alpha, rel=1e-12, abs=1e-300)


def _bad_bodies():
    lp_pi, lp_mu, adv = _ragged(2)
    ragged_mu = [*lp_mu[:-1], [*lp_mu[-1], -0.1]]
    positive = [[0.5, *lp_mu[0][1:]], *lp_mu[1:]]
    return [
        ("ragged", {"lp_pi": lp_pi, "lp_mu": ragged_mu, "advantages": adv}, f"lp_mu[{len(lp_mu) - 1}]"),
        ("sequence count", {"lp_pi": lp_pi, "lp_mu": lp_mu[:-1], "advantages": adv}, "lp_mu"),
        ("advantages", {"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv[:-1]}, "advantages"),
        ("empty", {"lp_pi": [], "lp_mu": [], "advantages": []}, "lp_pi"),
        ("positive logprob", {"lp_pi": lp_pi, "lp_mu": positive, "advantages": adv}, "lp_mu"),
        ("mode", {"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv, "config": {"mode": "magic"}}, "config.mode"),
        ("level", {"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv, "config": {"level": "word"}}, "config.level"),
        ("beta", {"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv, "config": {"beta": 0.5}}, "config.beta"),
        (
            "bounds",
            {"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv, "config": {"alpha_min": 0.8, "alpha_max": 0.2}},
            "config",
        ),
        ("cap", {"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv, "config": {"cap": -1}}, "config.cap"),
        (
            "reversed ratio bounds",
            {"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv, "config": {"mask_ratio_lo": 2.0, "mask_ratio_hi": 0.5}},
            "config.mask_ratio_hi",
        ),
        (
            "negative m2po",
            {"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv, "config": {"m2po_threshold": -0.1}},
            "config.m2po_threshold",
        ),
        (
            "unknown reject rule",
            {
                "lp_pi": lp_pi,
                "lp_mu": lp_mu,
                "advantages": adv,
                "config": {"reject_rule": "seq_max_k1", "reject_threshold": 1.0},
            },
            "config.reject_rule",
        ),
        (
            "rule without threshold",
            {"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv, "config": {"reject_rule": "token_k2"}},
            "config.reject_threshold",
        ),
        (
            "negative reject threshold",
            {
                "lp_pi": lp_pi,
                "lp_mu": lp_mu,
                "advantages": adv,
                "config": {"reject_rule": "token_k2", "reject_threshold": -1},
            },
            "config.reject_threshold",
        ),
        ("type", {"lp_pi": "nope", "lp_mu": lp_mu, "advantages": adv}, "lp_pi"),
        ("missing", {"lp_pi": lp_pi, "advantages": adv}, "lp_mu"),
    ]


@pytest.mark.parametrize(("case", "body", "field"), _bad_bodies(), ids=[c[0] for c in _bad_bodies()])
async def test_bad_input_is_a_4xx_naming_the_field(http, case, body, field):
    reply = await http.post("/v1/coefficient", json=body)
    assert reply.status_code == 422, reply.text
    error = reply.json()
    assert error["field"].startswith(field), error
    assert error["error"]


@pytest.mark.parametrize("name", list(CORRECTION_CASES))
async def test_every_correction_matches_core(http, name):
    lp_pi, lp_mu, adv = _ragged(seed=zlib.crc32(name.encode()), n=8)
    reply = await http.post("/v1/coefficient", json={"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv,
                                                     "config": CORRECTION_CASES[name]})  # fmt: skip
    assert reply.status_code == 200, reply.text
    got = reply.json()
    want = compute_coefficient(arrays_from_ragged(lp_pi, lp_mu, adv), CorrectionConfig(**CORRECTION_CASES[name]))
    for field in CORRECTION_STAT_FIELDS:
        assert got[field] == pytest.approx(getattr(want.corrections, field), rel=1e-12, abs=1e-300), field
    assert got["frac_masked"] == pytest.approx(want.frac_masked) and got["alpha_ais"] == pytest.approx(want.alpha_ais)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_config_values_are_rejected(http, literal):
    lp_pi, lp_mu, adv = _ragged(3)
    text = json.dumps({"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv, "config": {"mask_ratio_hi": 12345.5}})
    reply = await http.post("/v1/coefficient", content=text.replace("12345.5", literal),
                            headers={"content-type": "application/json"})  # fmt: skip
    assert reply.status_code == 422, reply.text
    assert reply.json()["field"] == "config.mask_ratio_hi"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_values_are_rejected(http, literal):
    lp_pi, lp_mu, adv = _ragged(3)
    text = json.dumps({"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv})
    text = text.replace(str(lp_pi[1][0]), literal, 1)
    reply = await http.post("/v1/coefficient", content=text, headers={"content-type": "application/json"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["field"].startswith("lp_pi")


async def test_malformed_json_is_a_4xx(http):
    reply = await http.post("/v1/coefficient", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 422
    assert reply.json()["error"]


async def _record(service, run_id: str, steps: range, config: CorrectionConfig | None = None) -> None:
    async with grpc.aio.insecure_channel(service.grpc_target) as channel:
        stub = diagnostics_pb2_grpc.DiagnosticsStub(channel)
        for step in steps:
            batch = batch_to_pb(synthetic_batch(mismatch=0.01 * (step + 1), seed=step), config or CorrectionConfig(),
                                run_id=run_id, step=step)  # fmt: skip
            await stub.ComputeCoefficient(batch, timeout=10)


async def test_runs_latest_pages_and_single_batches(service, http):
    await _record(service, "alpha-run", range(7))
    runs = (await http.get("/v1/runs")).json()
    assert [r["run_id"] for r in runs] == ["alpha-run"]
    assert runs[0]["n_batches"] == 7 and runs[0]["latest_step"] == 6
    latest = (await http.get("/v1/runs/alpha-run/coefficient")).json()
    assert latest["step"] == 6 and latest["config"]["mode"] == "ais"
    first = (await http.get("/v1/runs/alpha-run/batches", params={"limit": 3})).json()
    assert [b["step"] for b in first["batches"]] == [0, 1, 2] and first["next_since_step"] == 3
    rest = (await http.get("/v1/runs/alpha-run/batches", params={"since_step": 3, "limit": 10})).json()
    assert [b["step"] for b in rest["batches"]] == [3, 4, 5, 6] and rest["next_since_step"] is None
    one = (await http.get("/v1/runs/alpha-run/batches/4")).json()
    assert one["step"] == 4 and one["alpha"] == rest["batches"][1]["alpha"]


async def test_unknown_run_and_step_are_404(service, http):
    await _record(service, "known", range(1))
    for path in ("/v1/runs/ghost/coefficient", "/v1/runs/ghost/batches", "/v1/runs/ghost/batches/0",
                 "/v1/runs/ghost/dashboard", "/v1/runs/known/batches/99"):  # fmt: skip
        reply = await http.get(path)
        assert reply.status_code == 404, path
        assert reply.json()["error"]
    bad_limit = await http.get("/v1/runs/known/batches", params={"limit": 0})
    assert bad_limit.status_code == 422 and bad_limit.json()["field"] == "limit"


async def test_dashboard_is_html_with_charts(service, http):
    await _record(service, "dash", range(5))
    reply = await http.get("/v1/runs/dash/dashboard")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    page = reply.text
    assert page.count("<svg") == len(CHARTS) and "<polyline" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched from outside


def _polyline_ys(page: str, label: str) -> list[float]:
    """The y coordinates of the dashboard line titled `label`."""
    match = re.search(r'points="([^"]+)"><title>' + re.escape(label) + "</title>", page)
    assert match, f"no line labelled {label!r}"
    return [float(p.split(",")[1]) for p in match.group(1).split()]


async def test_none_run_dashboard_draws_the_shadow_alpha_over_time(service, http):
    """In a `none` run the applied alpha is a flat 0; the shadow alpha (what ais would use) is drawn beside it."""
    await _record(service, "plain", range(6), CorrectionConfig(mode="none", tau_kl=0.05))
    records = (await http.get("/v1/runs/plain/batches")).json()["batches"]
    assert all(r["alpha"] == 0.0 for r in records) and len({r["alpha_ais"] for r in records}) == 6
    page = (await http.get("/v1/runs/plain/dashboard")).text
    applied, shadow = _polyline_ys(page, "applied alpha"), _polyline_ys(page, "shadow alpha (ais)")
    assert len(applied) == len(shadow) == 6
    assert len(set(applied)) == 1 and len(set(shadow)) > 3  # flat applied alpha; the shadow alpha moves
    assert max(shadow) < applied[0]  # drawn above 0 (SVG y grows downwards)
    assert 'class="legend">shadow alpha (ais)</text>' in page and "<th>alpha_ais</th>" in page


async def test_health_readiness_metrics_and_openapi(service, http):
    await _record(service, "metered", range(2))
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = (await http.get("/readyz")).json()
    assert ready["status"] == "ready" and ready["grpc_port"] == service.grpc_port
    metrics = (await http.get("/metrics")).text
    assert 'aisrl_diag_alpha{run="metered"}' in metrics
    assert 'aisrl_diag_kl{run="metered"}' in metrics
    for name in ("alpha_ais", "frac_vetoed", *CORRECTION_STAT_FIELDS):
        assert f'aisrl_diag_{name}{{run="metered"}}' in metrics, name
    assert "aisrl_diag_compute_seconds_bucket" in metrics
    assert "aisrl_diag_requests_total" in metrics
    assert (await http.get("/docs")).status_code == 200
    paths = (await http.get("/openapi.json")).json()["paths"]
    assert {"/v1/coefficient", "/v1/runs", "/v1/runs/{run_id}/dashboard"} <= set(paths)


async def test_not_ready_when_redis_is_gone():
    redis_server = start_embedded_redis()
    running = await start_diagnostics(
        DiagnosticsSettings(http_port=0, grpc_port=0, redis_url=redis_server.url), redis_server.url
    )
    try:
        async with httpx.AsyncClient(base_url=running.http_url, timeout=10) as client:
            assert (await client.get("/readyz")).status_code == 200
            redis_server.stop()
            reply = await client.get("/readyz")
            assert reply.status_code == 503 and reply.json()["field"] == "redis"
            assert (await client.get("/healthz")).status_code == 200
    finally:
        await running.stop()
        redis_server.stop()


async def test_records_from_before_the_correction_fields_are_served_with_nulls(service, http, redis_url):
    """A history spanning an upgrade: a record without the correction fields is served (null), not a 500."""
    from aisrl.redis_conn import async_client
    from aisrl.services.diagnostics.history import History

    await _record(service, "old", range(1))
    record = (await http.get("/v1/runs/old/batches/0")).json()
    old = {k: v for k, v in record.items() if k not in CORRECTION_STAT_FIELDS} | {"step": 1}
    client = async_client(redis_url)
    try:
        await History(client).record("old", old)
    finally:
        await client.aclose()
    reply = await http.get("/v1/runs/old/batches/1")
    assert reply.status_code == 200, reply.text
    assert reply.json()["frac_kept"] is None and reply.json()["alpha_ais"] == record["alpha_ais"]
    assert (await http.get("/v1/runs/old/dashboard")).status_code == 200
