"""Benchmark: rollout throughput (groups/s, tokens/s) of 1 and of 2 `aisrl rollout` replicas on this machine.

For each replica count, on an embedded Redis and a fresh run: starts that many real `aisrl rollout`
processes (vLLM engine at fp8 with the rollout settings of deploy/cluster.yaml, one consumer group,
OpenMP threads per process as the demo's `threads` sets them: OMP_NUM_THREADS, MKL_NUM_THREADS,
VLLM_CPU_OMP_THREADS_BIND=nobind) and waits for every worker's /readyz (engine loaded), so start-up
is excluded. Then a warm-up round (one engine batch of jobs per replica, not timed), then `--rounds`
rounds: `--jobs` prompt jobs built by the learner feeder's `make_job` are written in one transaction
and the clock runs from that write until the trajectories stream holds a group for every job
(polled every 20 ms); the round with the median tokens/s is shown.
Tokens are the completion tokens of those groups (completions stop at a newline, as in training).
Prints groups/s and tokens/s per replica count, how the groups were split between replicas, and the
2/1 ratio. Workers are stopped with SIGTERM and waited for; the benchmark checks that none of their
processes (vLLM engine processes included) is left. Nothing is asserted; on a shared machine,
compare the ratio, not absolutes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from bench.common import CLUSTER_YAML, add_model_options, resolve_model


def _start_worker(index: int, run_id: str, redis_url: str, model_dir: Path, tmp: Path, args: argparse.Namespace,
                  rollout: dict[str, Any]) -> tuple[subprocess.Popen, str, Path]:  # fmt: skip
    from aisrl.cluster.topology import settings_env, thread_env
    from aisrl.redis_conn import free_port
    from aisrl.services.rollout.config import RolloutSettings

    port = free_port()
    values = {
        **rollout, "redis_url": redis_url, "run_id": run_id, "model_path": str(model_dir),
        "worker_id": f"{run_id}-{index}", "work_dir": str(tmp / f"{run_id}-{index}"), "http_host": "127.0.0.1",
        "http_port": port, "catch_up_timeout_s": 0, "log_json": True,
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AISRL_")}
    env |= settings_env(RolloutSettings, values)
    env |= thread_env("rollout", args.threads)  # what `threads: {rollout: N}` gives a rollout process
    log = tmp / f"{run_id}-{index}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "aisrl"), "rollout"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return proc, f"http://127.0.0.1:{port}/readyz", log


def _wait_ready(workers: list[tuple[subprocess.Popen, str, Path]], timeout_s: float) -> float:
    import httpx

    start = time.perf_counter()
    pending = list(workers)
    while pending:
        proc, url, log = pending[0]
        if proc.poll() is not None:
            raise RuntimeError(f"rollout worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"rollout worker not ready after {timeout_s:.0f} s ({url})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return time.perf_counter() - start


def _stop(workers: list[tuple[subprocess.Popen, str, Path]]) -> list[str]:
    """SIGTERM every worker, wait for it; returns the processes of theirs still alive afterwards (should be none)."""
    import psutil

    tree = []
    for proc, _, _ in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for proc, _, _ in workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc, _, _ in workers:
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the worker and its engine processes only
            proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=10)
    return [f"{p.pid} {p.name()}" for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def _enqueue(client, run_streams, spec, source, first: int, count: int) -> float:
    """Writes jobs first..first+count-1 in one transaction; returns the time.perf_counter() right after."""
    from aisrl import streams
    from aisrl.services.learner.feeder import make_job

    now = time.time()
    pipe = client.pipeline(transaction=True)
    for i in range(first, first + count):
        job = make_job(spec, source, i, 0, 0, now)
        pipe.xadd(run_streams.prompts, {streams.PAYLOAD_FIELD: job.SerializeToString()})
    start = time.perf_counter()
    pipe.execute()
    return start


def _wait_groups(client, run_streams, total: int, timeout_s: float) -> float:
    while True:
        if client.xlen(run_streams.trajectories) >= total:
            return time.perf_counter()
        if client.xlen(run_streams.deadletter):
            raise RuntimeError("a job was dead-lettered; see the worker logs")
        if timeout_s <= 0:
            raise TimeoutError(f"the trajectories stream did not reach {total} groups")
        time.sleep(0.02)
        timeout_s -= 0.02


def measure(replicas: int, redis_url: str, model_dir: Path, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from aisrl import streams
    from aisrl.redis_conn import sync_client
    from aisrl.services.learner.config import LearnerSettings
    from aisrl.services.learner.feeder import JobSpec
    from aisrl.services.learner.learner import default_task
    from aisrl.v1 import rollout_pb2

    rollout = yaml.safe_load(CLUSTER_YAML.read_text())["services"]["rollout"] | {"engine": "vllm", "precision": "fp8"}
    if args.in_process is not None:
        rollout["in_process"] = args.in_process
    run_id = f"replicas-{replicas}"
    run_streams = streams.RunStreams(run_id)
    _, source = default_task(LearnerSettings(run_id=run_id, task=args.task))
    spec = JobSpec(run_id, args.group, args.tokens, 1.0, max_staleness=1, seed=0)
    workers = [_start_worker(i, run_id, redis_url, model_dir, tmp, args, rollout) for i in range(replicas)]
    client = sync_client(redis_url)
    try:
        ready_s = _wait_ready(workers, args.ready_timeout)
        written = replicas * rollout["batch_size"]
        _enqueue(client, run_streams, spec, source, 0, written)
        _wait_groups(client, run_streams, written, args.timeout)
        rounds = []
        for _ in range(args.rounds):
            last = client.xrevrange(run_streams.trajectories, count=1)[0][0].decode()
            start = _enqueue(client, run_streams, spec, source, written, args.jobs)
            written += args.jobs
            end = _wait_groups(client, run_streams, written, args.timeout)
            entries = streams.parse_entries(client.xrange(run_streams.trajectories, min=f"({last}"))
            groups = [rollout_pb2.TrajectoryGroup.FromString(e.payload) for e in entries]
            rounds.append({
                "groups": len(groups), "tokens": sum(len(s.completion_ids) // 4 for g in groups for s in g.samples),
                "seconds": end - start, "split": sorted(Counter(g.worker_id for g in groups).values(), reverse=True),
            })  # fmt: skip
    finally:
        left = _stop(workers)
        client.close()
    median = sorted(rounds, key=lambda r: r["tokens"] / r["seconds"])[len(rounds) // 2]
    return median | {"replicas": replicas, "ready_s": ready_s, "left": left, "engine_batch": rollout["batch_size"],
                     "in_process": bool(rollout.get("in_process")),
                     "rates": [r["tokens"] / r["seconds"] for r in rounds]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=256, help="prompt jobs (groups) per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per replica count (the median is shown)")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--tokens", type=int, default=24, help="max tokens per completion")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per rollout process")
    parser.add_argument("--replicas", default="1,2", help="replica counts to measure, in order")
    parser.add_argument("--task", default="countdown")
    add_model_options(parser)
    parser.add_argument("--ready-timeout", type=float, default=300, help="seconds allowed for workers to be ready")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed for one round of jobs")
    args = parser.parse_args(argv or [])  # `python -m bench` calls main() with no arguments
    counts = [int(c) for c in args.replicas.split(",")]

    from aisrl.redis_conn import start_embedded_redis

    with tempfile.TemporaryDirectory(prefix="aisrl-bench-") as name, start_embedded_redis() as redis:
        tmp = Path(name)
        model_dir, label = resolve_model(args.model, tmp)
        results = []
        for replicas in counts:
            r = measure(replicas, redis.url, model_dir, tmp, args)
            if not results:
                print(f"[{args.task}, {args.jobs} jobs x G={args.group} x <= {args.tokens} tokens, model {label}; "
                      f"vllm fp8, {'in process' if r['in_process'] else 'engine process'}, "
                      f"engine batch {r['engine_batch']} jobs, "
                      f"{args.threads} OpenMP thread(s) per replica, {os.cpu_count()} CPUs; median of "
                      f"{args.rounds} rounds]")  # fmt: skip
            results.append(r)
            print(f"  {replicas} replica(s): {r['groups'] / r['seconds']:7.2f} groups/s, "
                  f"{r['tokens'] / r['seconds']:8,.0f} tokens/s ({r['groups']} groups, {r['tokens']:,} tokens in "
                  f"{r['seconds']:.1f} s; groups per replica {r['split']}; rounds "
                  f"{', '.join(f'{x:,.0f}' for x in r['rates'])} tokens/s; ready after {r['ready_s']:.0f} s; "
                  f"processes left after SIGTERM: {len(r['left'])})", flush=True)  # fmt: skip
            for line in r["left"]:
                print(f"    left running: {line}")
        if len(results) >= 2:
            first, last = results[0], results[-1]
            ratio = (last["tokens"] / last["seconds"]) / (first["tokens"] / first["seconds"])
            group_ratio = (last["groups"] / last["seconds"]) / (first["groups"] / first["seconds"])
            print(f"  {last['replicas']} / {first['replicas']} replicas: {ratio:.2f}x tokens/s, "
                  f"{group_ratio:.2f}x groups/s")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
