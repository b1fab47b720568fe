"""Benchmark: the learner's step time, phase by phase, on a tiny model, plus a weight fetch over gRPC.

Runs the real learner (embedded Redis, the diagnostics service in this process over gRPC, the
Weights server) on hand-made trajectory groups of fixed-length random completions (the rollout side
is not measured here), and prints the median seconds of each phase over the timed steps, tokens
trained per second, and the publish + fetch time of one weight version as a fraction of the step
(docs/ais.md, "Weight sync is measured": weight sync must not eat the rollout gain). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _groups(run_id: str, n: int, group_size: int, tokens: int, version: int, seed: int):
    from aisrl.models.tokenizer import encode
    from aisrl.v1 import rollout_pb2
    from aisrl.wire.arrays import float32_to_bytes, int32_to_bytes

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = int32_to_bytes(np.asarray(encode(f"{i} + {2 * i + 1} ="), dtype=np.int32))
        samples = [
            rollout_pb2.Sample(
                prompt_ids=prompt,
                completion_ids=int32_to_bytes(rng.integers(5, 99, size=tokens, dtype=np.int32)),
                logprobs=float32_to_bytes(-rng.uniform(4.4, 4.8, size=tokens)),
                reward=float(rng.integers(0, 2)),
            )
            for _ in range(group_size)
        ]
        out.append(rollout_pb2.TrajectoryGroup(run_id=run_id, job_id=f"p{seed * n + i}-a0", policy_version=version,
                                               samples=samples))  # fmt: skip
    return out


async def _run(args, tmp: Path, redis_url: str) -> None:
    import grpc

    from aisrl import streams
    from aisrl.models.tiny import init_model_dir
    from aisrl.services.diagnostics.config import DiagnosticsSettings
    from aisrl.services.diagnostics.main import start_diagnostics
    from aisrl.services.learner.config import LearnerSettings
    from aisrl.services.learner.learner import Learner
    from aisrl.v1 import weights_pb2, weights_pb2_grpc
    from aisrl.wire.weights import WeightsAssembler

    model_dir = args.model_dir or init_model_dir(tmp / "tiny")
    diagnostics = await start_diagnostics(DiagnosticsSettings(http_port=0, grpc_port=0), redis_url)
    settings = LearnerSettings(
        redis_url=redis_url, run_id="bench", model_path=str(model_dir), work_dir=str(tmp / "learner"),
        batch_size=args.batch, group_size=args.group, max_tokens=args.tokens, checkpoint_every=args.checkpoint_every,
        diagnostics_target=diagnostics.grpc_target, grpc_port=0, http_port=0, compute_dtype=args.dtype,
        ppo_epochs=args.epochs, minibatches=args.minibatches, max_staleness=1000,
    )  # fmt: skip
    learner = Learner(settings, redis_url, task=object(), problem_source=lambda i: ("toy", "{}"))
    await learner.start()
    try:
        records = []
        for step in range(args.warmup + args.steps):
            groups = _groups("bench", args.batch, args.group, args.tokens, learner.version, step)
            for g in groups:
                await streams.append(learner.client, learner.streams.trajectories, g.SerializeToString())
            records.append(await learner.step_once())
        timed = records[args.warmup :]
        phases = ("prepare", "diagnostics", "update", "publish", "checkpoint", "busy")
        med = {p: statistics.median(r.seconds[p] for r in timed) for p in phases}
        # Checkpoints happen every k steps: report the time of one, not the median over steps.
        written = [r.seconds["checkpoint"] for r in timed if r.step % args.checkpoint_every == 0]
        per_checkpoint = statistics.median(written) if written else float("nan")
        tokens = timed[0].tokens
        notice = weights_pb2.WeightVersionNotice.FromString(
            streams.parse_entries(await learner.client.xrevrange(learner.streams.weights, count=1))[0].payload
        )
        fetches = []
        async with grpc.aio.insecure_channel(notice.endpoint) as channel:
            stub = weights_pb2_grpc.WeightsStub(channel)
            for _ in range(5):
                start = time.perf_counter()
                assembler = WeightsAssembler(notice.version, notice.sha256, notice.total_bytes, notice.num_tensors)
                async for chunk in stub.Fetch(weights_pb2.FetchWeightsRequest(run_id="bench", version=notice.version)):
                    assembler.add(chunk)
                assembler.finish()
                fetches.append(time.perf_counter() - start)
        fetch = statistics.median(fetches)
        params = sum(p.numel() for p in learner.trainer.model.parameters())
        print(f"[{args.batch} groups x G={args.group} x {args.tokens} tokens = {tokens} tokens/step, "
              f"{params / 1e6:.2f}M params, {args.dtype} compute, {args.epochs} epoch(s) x {args.minibatches} "
              f"minibatch(es), median of {args.steps} steps]")  # fmt: skip
        for p in phases:
            print(f"  {p:<12}: {med[p] * 1000:9.1f} ms  ({med[p] / med['busy']:5.1%} of the step)")
        print(f"  one checkpoint (every {args.checkpoint_every} steps, write + fsync + ack): "
              f"{per_checkpoint * 1000:.1f} ms")  # fmt: skip
        print(f"  trained     : {tokens / med['update']:9,.0f} tokens/s (update phase), "
              f"{tokens / med['busy']:,.0f} tokens/s (whole step)")  # fmt: skip
        sync = med["publish"] + fetch
        print(f"  weight fetch: {fetch * 1000:9.1f} ms for {notice.total_bytes / 2**20:.2f} MiB; publish + fetch = "
              f"{sync / med['busy']:.1%} of the step")  # fmt: skip
        if args.json:
            print(json.dumps({"median_s": med, "fetch_s": fetch, "tokens": tokens}))
    finally:
        await learner.close()
        await diagnostics.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="groups per step")
    parser.add_argument("--group", type=int, default=8, help="completions per group (G)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--model-dir", type=Path, default=None, help="an HF checkpoint (default: a random tiny model)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv or [])  # `python -m bench` calls main() with no arguments

    import logging

    from aisrl.redis_conn import start_embedded_redis

    logging.getLogger("aisrl").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="aisrl-bench-") as tmp, start_embedded_redis() as redis:
        asyncio.run(_run(args, Path(tmp), redis.url))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
