"""The diagnostics gRPC API against a real server on an ephemeral port and a real Redis."""

from __future__ import annotations

import math

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aisrl.core.ais import compute_coefficient
from aisrl.core.synthetic import synthetic_batch
from aisrl.core.types import CORRECTION_STAT_FIELDS, CorrectionConfig, CorrectionMode, MismatchArrays, WeightLevel
from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.services.diagnostics.main import start_diagnostics
from aisrl.v1 import diagnostics_pb2, diagnostics_pb2_grpc
from aisrl.wire.coefficient import batch_to_pb
from tests.correction_cases import CORRECTION_CASES


@pytest.fixture
async def diagnostics(redis_url):
    settings = DiagnosticsSettings(http_port=0, grpc_port=0, redis_url=redis_url, history_limit=5)
    running = await start_diagnostics(settings, redis_url)
    yield running
    await running.stop()


@pytest.fixture
async def stub(diagnostics):
    limit = 64 * 1024 * 1024
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    async with grpc.aio.insecure_channel(diagnostics.grpc_target, options=options) as channel:
        yield diagnostics_pb2_grpc.DiagnosticsStub(channel)


def _f32(arrays: MismatchArrays) -> MismatchArrays:
    """The batch as the service sees it after the float32 wire encoding."""
    return MismatchArrays(
        lp_pi=arrays.lp_pi.astype(np.float32).astype(np.float64),
        lp_mu=arrays.lp_mu.astype(np.float32).astype(np.float64),
        lengths=arrays.lengths,
        advantages=arrays.advantages,
    )


@pytest.mark.parametrize("mode", list(CorrectionMode))
@pytest.mark.parametrize("level", list(WeightLevel))
async def test_compute_matches_core_for_every_mode_and_level(stub, mode, level):
    arrays = synthetic_batch(n_sequences=16, mean_length=20, mismatch=0.1, seed=3)
    config = CorrectionConfig(mode=mode, level=level, cap=3.0, fixed_alpha=0.25)
    got = await stub.ComputeCoefficient(batch_to_pb(arrays, config, run_id="r", step=1), timeout=10)
    want = compute_coefficient(_f32(arrays), config)
    assert got.alpha == pytest.approx(want.alpha, rel=1e-12, abs=1e-15)
    assert got.alpha_raw == pytest.approx(want.alpha_raw, rel=1e-12, abs=1e-15)
    assert got.applied.reliability == pytest.approx(want.reliability, rel=1e-12)
    assert got.raw.reliability == pytest.approx(want.raw.reliability, rel=1e-12)
    assert got.kl == pytest.approx(want.kl, rel=1e-12)
    assert got.frac_masked == pytest.approx(want.frac_masked)
    assert got.n_tokens == want.n_tokens and got.run_id == "r" and got.step == 1


@pytest.mark.parametrize("name", list(CORRECTION_CASES))
async def test_every_correction_matches_core_and_is_recorded(stub, name):
    arrays = synthetic_batch(n_sequences=16, mean_length=20, mismatch=0.3, seed=5)
    config = CorrectionConfig(**CORRECTION_CASES[name])
    got = await stub.ComputeCoefficient(batch_to_pb(arrays, config, run_id="c", step=1), timeout=10)
    want = compute_coefficient(_f32(arrays), config)
    for field in CORRECTION_STAT_FIELDS:
        assert getattr(got, field) == pytest.approx(getattr(want.corrections, field), rel=1e-12, abs=1e-300), field
    assert got.frac_masked == pytest.approx(want.frac_masked) and got.alpha_ais == pytest.approx(want.alpha_ais)
    latest = await stub.GetLatest(diagnostics_pb2.GetLatestRequest(run_id="c"), timeout=10)
    assert latest.frac_kept == got.frac_kept and latest.weight_std == got.weight_std


async def test_records_history_and_serves_latest(stub):
    config = CorrectionConfig()
    for step in (1, 2, 3):
        batch = synthetic_batch(mismatch=0.02 * step, seed=step)
        await stub.ComputeCoefficient(batch_to_pb(batch, config, run_id="hist", step=step), timeout=10)
    latest = await stub.GetLatest(diagnostics_pb2.GetLatestRequest(run_id="hist"), timeout=5)
    assert latest.step == 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetLatest(diagnostics_pb2.GetLatestRequest(run_id="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_local_record_fills_its_step_and_never_replaces_the_services_own(stub, diagnostics):
    from aisrl.core.ais import compute_coefficient as compute
    from aisrl.wire.coefficient import config_to_pb, record_to_pb, result_fields

    config = CorrectionConfig()
    served = await stub.ComputeCoefficient(batch_to_pb(synthetic_batch(seed=1), config, run_id="gap", step=1))
    local = compute(_f32(synthetic_batch(seed=2)), config)
    record = {
        "run_id": "gap",
        "step": 2,
        "policy_version": 1,
        **result_fields(local),
        "computed_unix": 1.0,
        "compute_ms": 0.5,
        "computed_locally": False,
    }  # fmt: skip  (stored as local whatever it says)
    kept = await stub.RecordLocal(diagnostics_pb2.LocalRecord(result=record_to_pb(record), config=config_to_pb(config)))
    assert kept.step == 2 and kept.computed_locally and kept.alpha == local.alpha
    again = await stub.RecordLocal(
        diagnostics_pb2.LocalRecord(result=record_to_pb({**record, "step": 1}), config=config_to_pb(config))
    )
    assert not again.computed_locally and again.alpha == served.alpha  # step 1 keeps the service's record
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{diagnostics.http_port}") as http:
        page = (await http.get("/v1/runs/gap/batches")).json()
    assert [(b["step"], b["computed_locally"]) for b in page["batches"]] == [(1, False), (2, True)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RecordLocal(diagnostics_pb2.LocalRecord(result=diagnostics_pb2.CoefficientResult(step=3)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "run_id" in err.value.details()


async def test_dry_run_is_not_recorded(stub):
    batch = batch_to_pb(synthetic_batch(), CorrectionConfig(), run_id="dry", step=1, dry_run=True)
    result = await stub.ComputeCoefficient(batch, timeout=10)
    assert result.n_tokens > 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetLatest(diagnostics_pb2.GetLatestRequest(run_id="dry"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_ema_smooths_across_steps_and_retries_are_idempotent(stub):
    config = CorrectionConfig(beta=0.5)
    results = []
    for step, noise in ((1, 0.01), (2, 0.3), (3, 0.3)):
        batch = batch_to_pb(synthetic_batch(mismatch=noise, seed=step), config, run_id="ema", step=step)
        results.append(await stub.ComputeCoefficient(batch, timeout=10))
    assert results[0].alpha_ema == pytest.approx(results[0].alpha_raw)
    assert results[1].alpha_ema == pytest.approx(0.5 * results[0].alpha_ema + 0.5 * results[1].alpha_raw)
    assert results[2].alpha_ema == pytest.approx(0.5 * results[1].alpha_ema + 0.5 * results[2].alpha_raw)
    # Re-sending step 2 (a learner retrying after a restart) smooths against step 1 again.
    again = await stub.ComputeCoefficient(
        batch_to_pb(synthetic_batch(mismatch=0.3, seed=2), config, run_id="ema", step=2), timeout=10
    )
    assert again.alpha_ema == pytest.approx(results[1].alpha_ema)


def _bad_batches():
    good = batch_to_pb(synthetic_batch(n_sequences=4, mean_length=8), CorrectionConfig(), run_id="bad", step=1)

    def variant(**changes):
        pb = diagnostics_pb2.MismatchBatch()
        pb.CopyFrom(good)
        for key, value in changes.items():
            if key == "lengths":
                del pb.lengths[:]
                pb.lengths.extend(value)
            elif key == "advantages":
                del pb.advantages[:]
                pb.advantages.extend(value)
            elif key.startswith("config_"):
                setattr(pb.config, key.removeprefix("config_"), value)
            else:
                setattr(pb, key, value)
        return pb

    n = len(good.lp_pi) // 4
    nan_pi = np.frombuffer(good.lp_pi, "<f4").copy()
    nan_pi[2] = np.nan
    positive_mu = np.frombuffer(good.lp_mu, "<f4").copy()
    positive_mu[0] = 0.5
    return [
        ("run_id", variant(run_id="")),
        ("lp_pi", variant(lp_pi=good.lp_pi[:-1])),
        ("lp_mu", variant(lp_mu=good.lp_mu[:-4])),
        ("lengths", variant(lengths=[1, 1, 1, n])),
        ("advantages", variant(advantages=[0.0])),
        ("lp_pi", variant(lp_pi=nan_pi.tobytes())),
        ("lp_mu", variant(lp_mu=positive_mu.tobytes())),
        ("advantages", variant(advantages=[math.inf, 0, 0, 0])),
        ("alpha_min", variant(config_alpha_min=0.9, config_alpha_max=0.1)),
        ("config.tau_kl", variant(config_tau_kl=-1.0)),
        ("config.mode", variant(config_mode=42)),
        ("config.mask_ratio_hi", variant(config_mask_ratio_lo=3.0, config_mask_ratio_hi=2.0)),
        ("config.reject_rule", variant(config_reject_rule="token_k4", config_reject_threshold=1.0)),
        ("config.reject_threshold", variant(config_reject_rule="token_k1")),
        ("config.reject_threshold", variant(config_reject_rule="token_k1", config_reject_threshold=-2.0)),
        ("config.m2po_threshold", variant(config_m2po_threshold=math.nan)),
    ]


@pytest.mark.parametrize(("field", "batch"), _bad_batches())
async def test_invalid_input_is_invalid_argument_naming_the_field(stub, field, batch):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ComputeCoefficient(batch, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


async def test_empty_batch_is_rejected(stub):
    pb = diagnostics_pb2.MismatchBatch(run_id="empty", step=1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ComputeCoefficient(pb, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_million_token_batch(stub):
    arrays = synthetic_batch(n_sequences=4000, mean_length=250, mismatch=0.05, seed=1)
    assert arrays.lp_pi.size > 900_000
    pb = batch_to_pb(arrays, CorrectionConfig(), run_id="big", step=1)
    assert pb.ByteSize() < 16 * 1024 * 1024
    result = await stub.ComputeCoefficient(pb, timeout=30)
    assert result.n_tokens == arrays.lp_pi.size


async def test_expired_deadline_is_not_recorded(stub):
    arrays = synthetic_batch(n_sequences=4000, mean_length=250, seed=2)
    pb = batch_to_pb(arrays, CorrectionConfig(), run_id="late", step=1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ComputeCoefficient(pb, timeout=0.001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetLatest(diagnostics_pb2.GetLatestRequest(run_id="late"), timeout=5)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_history_is_bounded_and_trimming_is_counted(stub, diagnostics):
    for step in range(8):
        batch = batch_to_pb(synthetic_batch(seed=step), CorrectionConfig(), run_id="bounded", step=step)
        await stub.ComputeCoefficient(batch, timeout=10)
    runs = {r.run_id: r for r in await diagnostics.server.config.app.state.service.history.runs()}
    assert runs["bounded"].n_batches == 5
    assert runs["bounded"].trimmed == 3
    assert runs["bounded"].first_step == 3


async def test_health_service_reports_serving(diagnostics):
    async with grpc.aio.insecure_channel(diagnostics.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "aisrl.v1.Diagnostics"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
