"""The learner's Weights server over real gRPC, verified by aisrl.wire.weights' assembler against the notice."""

from __future__ import annotations

import grpc
import pytest
import torch
from learner_support import learner_settings, make_group, put_groups, tiny_model, toy_source

from aisrl import streams
from aisrl.redis_conn import async_client
from aisrl.services.learner.learner import Learner
from aisrl.services.learner.weights_server import WeightStore, announce, make_notice, start_weights_server
from aisrl.v1 import weights_pb2, weights_pb2_grpc
from aisrl.wire.weights import WeightsAssembler

pytestmark = pytest.mark.timeout(240)


async def _fetch(target: str, notice: weights_pb2.WeightVersionNotice, run_id="t", chunk=0):
    assembler = WeightsAssembler(notice.version, notice.sha256, notice.total_bytes, notice.num_tensors)
    request = weights_pb2.FetchWeightsRequest(run_id=run_id, version=notice.version, max_chunk_bytes=chunk)
    chunks = 0
    async with grpc.aio.insecure_channel(target) as channel:
        async for piece in weights_pb2_grpc.WeightsStub(channel).Fetch(request, timeout=10):
            assembler.add(piece)
            chunks += 1
    return assembler.finish(), chunks


async def _latest_notice(client, run_streams) -> weights_pb2.WeightVersionNotice:
    [entry] = streams.parse_entries(await client.xrevrange(run_streams.weights, count=1))
    return weights_pb2.WeightVersionNotice.FromString(entry.payload)


async def test_round_trip_in_chunks_with_the_announced_checksum(redis_url):
    store = WeightStore(keep=2)
    server, port = await start_weights_server(store, "t", "127.0.0.1", 0, max_message_mb=16)
    client = async_client(redis_url)
    run = streams.RunStreams("t")
    try:
        gen = torch.Generator().manual_seed(0)
        for version in (1, 2, 3):
            state = {"a.weight": torch.randn(64, 48, generator=gen).bfloat16(), "b.bias": torch.randn(7) * version}
            stored = store.put(version, version, state)
            await announce(client, run, make_notice("t", stored, f"127.0.0.1:{port}", 0.0), maxlen=100)
        notice = await _latest_notice(client, run)
        got, chunks = await _fetch(f"127.0.0.1:{port}", notice, chunk=1024)
        assert notice.version == 3 and chunks > 5  # the 6 KiB tensor spans several 1 KiB chunks
        assert set(got) == {"a.weight", "b.bias"} and torch.equal(got["a.weight"], state["a.weight"])
        with pytest.raises(grpc.aio.AioRpcError) as info:  # version 1 fell out of the keep window
            await _fetch(f"127.0.0.1:{port}", weights_pb2.WeightVersionNotice(version=1))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _fetch(f"127.0.0.1:{port}", notice, run_id="another-run")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        tampered = weights_pb2.WeightVersionNotice()
        tampered.CopyFrom(notice)
        tampered.sha256 = "0" * 64
        with pytest.raises(ValueError, match="sha256"):
            await _fetch(f"127.0.0.1:{port}", tampered)
    finally:
        await server.stop(grace=None)
        await client.aclose()


async def test_each_step_serves_and_announces_the_new_weights(tmp_path, redis_url):
    model = tiny_model(tmp_path / "model")
    learner = Learner(learner_settings(tmp_path, redis_url, model), redis_url, task=object(), problem_source=toy_source)
    await learner.start()
    try:
        assert await learner.client.xlen(learner.streams.weights) == 0  # version 0 is the initial checkpoint
        await put_groups(learner.client, learner.streams, [make_group("t", f"p{i}-a0", 0, i) for i in range(2)])
        await learner.step_once()
        notice = await _latest_notice(learner.client, learner.streams)
        assert (notice.version, notice.step, notice.endpoint) == (1, 1, learner.endpoint)
        got, _ = await _fetch(notice.endpoint, notice)
        want = learner.trainer.weights_state()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        assert got["lm_head.weight"].dtype == torch.bfloat16
    finally:
        await learner.close()
