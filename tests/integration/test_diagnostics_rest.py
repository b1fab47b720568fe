"""The diagnostics REST API over real HTTP (uvicorn on an ephemeral port) with a real Redis."""

from __future__ import annotations

import json
import re
import zlib
from itertools import pairwise

import grpc
import httpx
import numpy as np
import pytest

from aisrl.core.ais import arrays_from_ragged, compute_coefficient
from aisrl.core.synthetic import synthetic_batch
from aisrl.core.types import CORRECTION_STAT_FIELDS, CorrectionConfig, CorrectionMode, WeightLevel
from aisrl.redis_conn import async_client
from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.services.diagnostics.dashboard import CHARTS
from aisrl.services.diagnostics.history import History
from aisrl.services.diagnostics.main import start_diagnostics
from aisrl.v1 import diagnostics_pb2_grpc
from aisrl.wire.coefficient import LEARNER_SIGNALS, batch_to_pb
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


async def test_malformed_json_is_a_400_with_a_position_not_a_field(http):
    reply = await http.post("/v1/coefficient", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400
    error = reply.json()
    assert set(error) == {"error", "field", "detail"} and error["field"] is None
    assert error["error"].startswith("body is not valid JSON") and "line 1 column 2" in error["error"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/nowhere", 404), ("DELETE", "/v1/coefficient", 405), ("GET", "/v1/coefficient", 405),
     ("GET", "/static/secret.js", 404)],
)  # fmt: skip
async def test_routing_errors_use_the_envelope(http, method, path, status):
    reply = await http.request(method, path)
    assert reply.status_code == status
    error = reply.json()
    assert set(error) == {"error", "field", "detail"} and error["error"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_content_type_is_415(http, content_type):
    lp_pi, lp_mu, adv = _ragged(4)
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv}).encode()
    reply = await http.post("/v1/coefficient", content=body, headers=headers)
    assert reply.status_code == 415, reply.text
    assert reply.json()["field"] == "content-type" and "application/json" in reply.json()["error"]


@pytest.mark.parametrize(
    ("patch", "field"),
    [(("lp_pi", 0, 1, "-0.5"), "lp_pi[0][1]"), (("advantages", 2, True), "advantages[2]"),
     (("lp_mu", 1, 0, "nan"), "lp_mu[1][0]"), (("config", "cap", "2.0"), "config.cap"),
     (("config", "fixed_alpha", True), "config.fixed_alpha")],
)  # fmt: skip
async def test_types_are_strict_and_paths_use_one_notation(http, patch, field):
    """A number sent as a string, or a boolean where a number belongs, is refused (not converted); every
    path is written as lp_pi[0][1] / config.cap, in `field` and in each `detail` entry."""
    lp_pi, lp_mu, adv = _ragged(5)
    body = {"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": adv, "config": {}}
    *where, value = patch
    target = body
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    reply = await http.post("/v1/coefficient", json=body)
    assert reply.status_code == 422, reply.text
    error = reply.json()
    assert error["field"] == field
    assert all("[" not in (d["field"] or "") or "][" in d["field"] or d["field"].count("[") == 1
               for d in error["detail"])  # fmt: skip
    assert error["detail"][0]["field"] == field


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


async def test_dashboard_page_and_its_assets_are_served_locally(service, http):
    await _record(service, "dash", range(5))
    await _record(service, "other", range(3))
    reply = await http.get("/v1/runs/dash/dashboard", params={"compare": "other"})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    page = reply.text
    assert page.count('class="chart"') == len(CHARTS)
    scripts = re.findall(r'<script src="([^"]+)"', page)
    assert scripts == ["/static/plotly.min.js", "/static/dashboard.js"]
    assert "http://" not in page and "https://" not in page  # nothing fetched from outside
    for src in scripts:
        asset = await http.get(src)
        assert asset.status_code == 200 and len(asset.content) > 1000, src
    assert (await http.get("/v1/runs/dash/dashboard", params={"compare": "ghost"})).status_code == 404


async def test_none_run_series_carries_the_shadow_alpha_over_time(service, http):
    """In a `none` run the applied alpha is a flat 0; the shadow alpha (what ais would use) is charted beside it."""
    await _record(service, "plain", range(6), CorrectionConfig(mode="none", tau_kl=0.05))
    records = (await http.get("/v1/runs/plain/batches")).json()["batches"]
    assert all(r["alpha"] == 0.0 for r in records) and len({r["alpha_ais"] for r in records}) == 6
    series = (await http.get("/v1/runs/plain/series")).json()
    assert series["steps"] == list(range(6)) and series["stride"] == 1 and series["total"] == 6
    assert series["fields"]["alpha"] == [0.0] * 6
    assert series["fields"]["alpha_ais"] == [r["alpha_ais"] for r in records]
    assert series["latest"]["alpha_ais"] == records[-1]["alpha_ais"] and series["mode"] == "none"


async def test_series_downsampling_says_so_and_keeps_the_latest(service, http):
    await _record(service, "long", range(23))
    series = (await http.get("/v1/runs/long/series", params={"max_points": 5})).json()
    assert series["total"] == 23 and series["stride"] == 5 and series["shown"] == len(series["steps"]) <= 5
    assert series["steps"][-1] == 22 and all(b - a == 5 for a, b in pairwise(series["steps"]))
    assert (await http.get("/v1/runs/ghost/series")).status_code == 404


async def test_index_lists_runs_with_links_to_their_dashboards(service, http):
    empty = await http.get("/")
    assert empty.status_code == 200 and "No runs recorded yet" in empty.text
    await _record(service, "first-run", range(2))
    await _record(service, "second<run>", range(1))
    page = (await http.get("/")).text
    assert 'href="/v1/runs/first-run/dashboard"' in page
    assert 'href="/v1/runs/second%3Crun%3E/dashboard"' in page and "second&lt;run&gt;" in page
    assert "<script src=" not in page and "https://" not in page


async def test_api_docs_work_offline(http):
    page = (await http.get("/docs")).text
    assert "cdn" not in page.lower()
    for src in re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', page) or ["missing"]:
        assert src.startswith("/"), src
        assert (await http.get(src)).status_code == 200, src


async def test_grpc_reflection_lists_the_services(service):
    """What `grpcurl <target> list` asks: the server reflection service answers with every service."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(service.grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        replies = [reply async for reply in call]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"aisrl.v1.Diagnostics", "grpc.health.v1.Health"} <= names


async def test_grpc_reflection_can_be_turned_off(redis_url):
    settings = DiagnosticsSettings(http_port=0, grpc_port=0, redis_url=redis_url, grpc_reflection=False)
    running = await start_diagnostics(settings, redis_url)
    try:
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        async with grpc.aio.insecure_channel(running.grpc_target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                _ = [reply async for reply in stub.ServerReflectionInfo(iter([request]), timeout=10)]
        assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await running.stop()


async def test_learner_signals_are_recorded_and_served_with_nulls_where_absent(service, http, redis_url):
    """A batch with the learner's reward and an evaluation, one with only a reward, one without any, and a record
    written before the fields existed: REST serves each, absent values as null (never 0)."""
    signals = {
        1: {"reward_mean": 0.0},  # a zero reward is a value, not an absence
        2: {"reward_mean": 0.625, "eval_step": 1, "accuracy_greedy": 0.5, "accuracy_sampled": 0.375},
        3: None,
    }
    async with grpc.aio.insecure_channel(service.grpc_target) as channel:
        stub = diagnostics_pb2_grpc.DiagnosticsStub(channel)
        for step, sent in signals.items():
            batch = batch_to_pb(synthetic_batch(seed=step), CorrectionConfig(), run_id="sig", step=step, signals=sent)
            await stub.ComputeCoefficient(batch, timeout=10)
        bad = batch_to_pb(synthetic_batch(seed=9), CorrectionConfig(), run_id="sig", step=9,
                          signals={"eval_step": 8, "accuracy_greedy": 2.0})  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ComputeCoefficient(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "accuracy_greedy" in err.value.details()
    # A record as an older service wrote it (no signal keys at all) sits in the same history.
    old = (await http.get("/v1/runs/sig/batches/3")).json()
    old = {k: v for k, v in old.items() if k not in LEARNER_SIGNALS} | {"step": 0}
    client = async_client(redis_url)
    try:
        await History(client, prefix=DiagnosticsSettings().key_prefix).record("sig", old)
    finally:
        await client.aclose()

    batches = {b["step"]: b for b in (await http.get("/v1/runs/sig/batches")).json()["batches"]}
    assert sorted(batches) == [0, 1, 2, 3] and 9 not in batches  # the invalid batch was not recorded
    for step in (0, 3):
        assert all(batches[step][name] is None for name in LEARNER_SIGNALS), batches[step]
    assert batches[1]["reward_mean"] == 0.0 and batches[1]["eval_step"] is None
    assert {name: batches[2][name] for name in LEARNER_SIGNALS} == signals[2]
    assert (await http.get("/v1/runs/sig/coefficient")).json()["accuracy_sampled"] is None  # step 3: none sent

    series = (await http.get("/v1/runs/sig/series")).json()
    assert series["steps"] == [0, 1, 2, 3] and series["fields"]["reward_mean"] == [None, 0.0, 0.625, None]
    assert series["eval_steps"] == [1]
    assert series["evaluations"] == {"accuracy_greedy": [0.5], "accuracy_sampled": [0.375]}
