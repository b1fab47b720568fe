"""The diagnostics service under a large REST request: the learner's gRPC calls still answer in time.

Real servers (uvicorn and grpc.aio in one process, as deployed), a real Redis, a real worker process.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import httpx
import numpy as np
import pytest

from aisrl.core.ais import arrays_from_ragged, compute_coefficient
from aisrl.core.synthetic import synthetic_batch
from aisrl.core.types import CorrectionConfig
from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.services.diagnostics.main import start_diagnostics
from aisrl.v1 import diagnostics_pb2_grpc
from aisrl.wire.coefficient import batch_to_pb

pytestmark = pytest.mark.timeout(120)


async def _service(redis_url, **settings):
    values = dict(http_port=0, grpc_port=0, redis_url=redis_url) | settings
    return await start_diagnostics(DiagnosticsSettings(**values), redis_url)


def _ragged_body(n_sequences: int, length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lp_pi = -rng.gamma(0.6, 1.0, size=(n_sequences, length))
    lp_mu = np.minimum(lp_pi + rng.normal(0, 0.05, size=lp_pi.shape), 0)
    return {"lp_pi": lp_pi.tolist(), "lp_mu": lp_mu.tolist(), "advantages": rng.normal(size=n_sequences).tolist()}


def _grpc_caller(target: str, stop: threading.Event, calls: list[tuple[float, float, str]]) -> None:
    """The learner's side, in its own thread and channel: ComputeCoefficient calls with a short deadline, in a row."""
    with grpc.insecure_channel(target) as channel:
        stub = diagnostics_pb2_grpc.DiagnosticsStub(channel)
        step = 0
        while not stop.is_set():
            step += 1
            batch = batch_to_pb(synthetic_batch(n_sequences=64, mean_length=20, seed=step), CorrectionConfig(),
                                run_id="r", step=step)  # fmt: skip
            t0 = time.perf_counter()
            try:
                stub.ComputeCoefficient(batch, timeout=GRPC_DEADLINE_S)
                outcome = "ok"
            except grpc.RpcError as exc:
                outcome = exc.code().name
            calls.append((t0, time.perf_counter(), outcome))
            time.sleep(0.02)


GRPC_DEADLINE_S = 1.0  # half the learner's default 2 s: the service must answer well within it


async def test_a_large_rest_body_does_not_hold_up_a_concurrent_grpc_call(redis_url):
    # About 16 MB of JSON: parsed on the event loop, it froze the loop (and every gRPC call) for over a second here.
    raw = json.dumps(_ragged_body(2000, 200)).encode()
    running = await _service(redis_url, max_request_mb=64)
    stop, calls = threading.Event(), []
    caller = threading.Thread(target=_grpc_caller, args=(running.grpc_target, stop, calls))
    try:
        caller.start()
        while not calls:  # the channel is up
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=running.http_url, timeout=60) as http:
            began = time.perf_counter()
            reply = await http.post("/v1/coefficient", content=raw, headers={"content-type": "application/json"})
            ended = time.perf_counter()
    finally:
        stop.set()
        await asyncio.to_thread(caller.join, 30)
        await running.stop()
    assert reply.status_code == 200, reply.text
    assert reply.json()["n_tokens"] == 2000 * 200
    failed = [c for c in calls if c[2] != "ok"]
    assert not failed, f"{len(failed)} of {len(calls)} gRPC calls failed: {failed[:3]}"
    during = [c for c in calls if c[0] >= began and c[1] <= ended]
    assert len(during) >= 3, f"only {len(during)} gRPC calls ran while the REST request was in flight"
    slowest = max(b - a for a, b, _ in during)
    print(f"{len(during)} gRPC calls during the {ended - began:.2f} s REST request, slowest {slowest * 1e3:.0f} ms")


async def test_a_body_over_the_limit_is_refused_with_413_naming_the_limit(redis_url):
    running = await _service(redis_url, max_request_mb=0.01)  # 10 KiB
    body = json.dumps(_ragged_body(40, 40)).encode()
    assert len(body) > 0.01 * 2**20

    async def chunks():  # no Content-Length: the limit is enforced while reading (here by the last chunk, so
        # that the client has sent everything when the answer comes and reads it rather than a reset connection)
        over = body[: int(0.01 * 2**20) + 100]
        for i in range(0, len(over), 4096):
            yield over[i : i + 4096]

    try:
        async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as http:
            declared = await http.post("/v1/coefficient", content=body, headers={"content-type": "application/json"})
            streamed = await http.post(
                "/v1/coefficient", content=chunks(), headers={"content-type": "application/json"}
            )
            small = await http.post("/v1/coefficient", json=_ragged_body(2, 3))
            health = await http.get("/healthz")
    finally:
        await running.stop()
    for reply in (declared, streamed):
        assert reply.status_code == 413, reply.text
        assert reply.json()["field"] == "body" and "10,485 bytes" in reply.json()["error"]
        assert "max_request_mb" in reply.json()["error"]
    assert f"{len(body):,} bytes" in declared.json()["error"]
    assert small.status_code == 200 and health.status_code == 200


async def test_the_worker_process_answers_as_the_event_loop_does(redis_url):
    running = await _service(redis_url, rest_inline_kb=0)  # every body goes to the worker process
    body = _ragged_body(5, 7, seed=3)
    try:
        async with httpx.AsyncClient(base_url=running.http_url, timeout=60) as http:
            good = await http.post("/v1/coefficient", json=body)
            bad_value = await http.post("/v1/coefficient", json=body | {"advantages": [1.0, "x", 0, 0, 0]})
            bad_shape = await http.post("/v1/coefficient", json=body | {"lp_mu": body["lp_mu"][:4]})
            bad_config = await http.post("/v1/coefficient", json=body | {"config": {"cap": -1}})
    finally:
        await running.stop()
    assert good.status_code == 200, good.text
    want = compute_coefficient(arrays_from_ragged(body["lp_pi"], body["lp_mu"], body["advantages"]), CorrectionConfig())
    assert good.json()["alpha"] == pytest.approx(want.alpha, rel=1e-12, abs=1e-300)
    assert (bad_value.status_code, bad_value.json()["field"]) == (422, "advantages[1]")
    assert (bad_shape.status_code, bad_shape.json()["field"]) == (422, "lp_mu")
    assert (bad_config.status_code, bad_config.json()["field"]) == (422, "config.cap")
