"""Benchmark: the diagnostics service's gRPC round trip and REST call, against the pure computation.

Prints medians and p90s, and ratios to the pure `compute_coefficient` on the same batch measured in
the same run. Real servers on ephemeral ports and an embedded Redis; nothing is asserted.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import grpc
import httpx
import numpy as np

from aisrl.core.ais import compute_coefficient
from aisrl.core.synthetic import synthetic_batch
from aisrl.core.types import CorrectionConfig
from aisrl.redis_conn import start_embedded_redis
from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.services.diagnostics.main import start_diagnostics
from aisrl.v1 import diagnostics_pb2, diagnostics_pb2_grpc
from aisrl.wire.coefficient import batch_to_pb, encode_batch

SERVICE = diagnostics_pb2.DESCRIPTOR.services_by_name["Diagnostics"].full_name


def _stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]


def _time_pure(arrays, config, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compute_coefficient(arrays, config)
        times.append(time.perf_counter() - start)
    return times


async def _bench(repeats: int) -> None:
    config = CorrectionConfig()
    big = synthetic_batch(n_sequences=4000, mean_length=250, mismatch=0.05, seed=0)
    small = synthetic_batch(n_sequences=100, mean_length=100, mismatch=0.05, seed=1)
    with start_embedded_redis() as redis_server:
        settings = DiagnosticsSettings(http_port=0, grpc_port=0, redis_url=redis_server.url)
        running = await start_diagnostics(settings, redis_server.url)
        try:
            limit = 64 * 1024 * 1024
            options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
            async with grpc.aio.insecure_channel(running.grpc_target, options=options) as channel:
                stub = diagnostics_pb2_grpc.DiagnosticsStub(channel)
                # What the learner calls (services/learner/diag_client.py): the request serialized by encode_batch.
                answer = diagnostics_pb2.CoefficientResult.FromString
                raw = channel.unary_unary(f"/{SERVICE}/ComputeCoefficient", response_deserializer=answer)
                pure = _time_pure(big, config, repeats)
                encode, round_trip, pb_round_trip = [], [], []
                for i in range(repeats + 2):
                    start = time.perf_counter()
                    request = encode_batch(big, config, run_id="bench", step=2 * i)
                    encoded = time.perf_counter()
                    await raw(request, timeout=30)
                    done = time.perf_counter()
                    await stub.ComputeCoefficient(batch_to_pb(big, config, run_id="bench", step=2 * i + 1), timeout=30)
                    if i >= 2:  # the first calls warm the channel up
                        encode.append(encoded - start)
                        round_trip.append(done - start)
                        pb_round_trip.append(time.perf_counter() - done)
            lp_pi = [small.lp_pi[a:b].tolist() for a, b in _bounds(small.lengths)]
            lp_mu = [small.lp_mu[a:b].tolist() for a, b in _bounds(small.lengths)]
            body = {"lp_pi": lp_pi, "lp_mu": lp_mu, "advantages": small.advantages.tolist()}
            pure_small = _time_pure(small, config, repeats)
            rest = []
            async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as http:
                for i in range(repeats + 2):
                    start = time.perf_counter()
                    reply = await http.post("/v1/coefficient", json=body)
                    reply.raise_for_status()
                    if i >= 2:
                        rest.append(time.perf_counter() - start)
        finally:
            await running.stop()

    n_big = big.lp_pi.size
    p_med, p_90 = _stats(pure)
    e_med, _ = _stats(encode)
    r_med, r_90 = _stats(round_trip)
    b_med, b_90 = _stats(pb_round_trip)
    s_med, _ = _stats(pure_small)
    h_med, h_90 = _stats(rest)
    print(f"diagnostics service, {repeats} repeats (medians; p90 in brackets)")
    print(f"  pure compute_coefficient, {n_big:,} tokens: {p_med * 1e3:8.2f} ms [{p_90 * 1e3:.2f}]")
    print(f"  gRPC round trip incl. encoding, {n_big:,} tokens: {r_med * 1e3:8.2f} ms [{r_90 * 1e3:.2f}]"
          f"  (encode_batch {e_med * 1e3:.2f} ms; {r_med / p_med:.1f}x the pure computation)")  # fmt: skip
    print(f"  the same with protobuf's serialization (batch_to_pb): {b_med * 1e3:8.2f} ms [{b_90 * 1e3:.2f}]"
          f"  (encode_batch round trip / this: {r_med / b_med:.2f}x)")  # fmt: skip
    print(f"  POST /v1/coefficient, {small.lp_pi.size:,} tokens: {h_med * 1e3:8.2f} ms [{h_90 * 1e3:.2f}]"
          f"  ({h_med / s_med:.0f}x the pure computation of {s_med * 1e3:.3f} ms)")  # fmt: skip


def _bounds(lengths: np.ndarray):
    ends = np.cumsum(lengths)
    return zip(ends - lengths, ends, strict=True)


def main(repeats: int = 20) -> None:
    asyncio.run(_bench(repeats))


if __name__ == "__main__":
    main()
