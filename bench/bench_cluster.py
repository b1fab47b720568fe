"""Benchmark: trained tokens/s of the asynchronous service cluster against an in-process synchronous loop.

Cluster: `aisrl up` as a subprocess on the settings of deploy/cluster.yaml (Redis, diagnostics, the
learner and `--replicas` vLLM rollout workers at fp8), with the learner's batch, group size and
max_tokens set from the options, `--steps` steps, no baseline or periodic evaluation.

Synchronous loop, in this process, with no Redis and no services: the same vLLM engine (fp8, the
rollout settings of the same file) samples the step's prompt jobs (built by the feeder's
`make_job`) in engine calls of the rollout `batch_size` jobs, as a worker makes them; the rollout
worker's functions check and
score the completions with the task verifier and build the groups; the learner's `decode_group` and
`Trainer` (`prepare`, `update`) take one GRPO + AIS step with alpha from
`aisrl.core.ais.compute_coefficient`; the new BF16 weights are saved to a directory and reloaded
into the engine (`load_weights`, FP8 emulation included on the CPU); then the next batch. Same
model, task, seed, learner settings and threads per process (`--threads`: the cluster's learner and
rollout processes; here torch and the engine process).

Trained tokens/s over the steady state, the same definition on both sides: completion tokens
trained in steps 2..N divided by the time between the end of step 1 and the end of step N (the
learner's `step` log events on the cluster side), so engine start-up and the first batch are
excluded. The ratio is cluster / sync; also printed: the mean step time of each side, the median
phase breakdown of both (the learner's own step record: waiting for data, lp_pi recompute,
diagnostics round trip, optimizer step, weight publish, checkpoint), and the cluster's wall time
including start-up. Nothing is asserted; on a shared machine, compare the ratio, not absolutes.

vLLM spawns an engine process, hence the `__main__` guard (`python -m bench cluster` has one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.common import CLUSTER_YAML, add_model_options, resolve_model

CLUSTER_PHASES = (
    ("wait", "waiting for data"),
    ("prepare", "lp_pi recompute (+ advantages, packing)"),
    ("diagnostics", "diagnostics round trip (alpha)"),
    ("update", "optimizer step"),
    ("publish", "weight publish (serve + announce)"),
    ("checkpoint", "checkpoint (+ ack)"),
)
SYNC_PHASES = (
    ("sample", "vLLM sampling (fp8)"),
    ("score", "verify + build and decode groups"),
    ("prepare", "lp_pi recompute (+ advantages, packing)"),
    ("alpha", "alpha (local, aisrl.core.ais)"),
    ("update", "optimizer step"),
    ("reload", "weights: save + fp8 emulate + vLLM reload"),
)


def steady_rate(ends: list[float], tokens: list[int]) -> tuple[float, float]:
    """(tokens/s, s/step) over steps 2..N: their tokens over the time from the end of step 1 to the end of step N."""
    if len(ends) < 2:
        raise ValueError("the steady state needs at least 2 steps")
    span = ends[-1] - ends[0]
    return sum(tokens[1:]) / span, span / (len(ends) - 1)


def cluster_config(args: argparse.Namespace, model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """deploy/cluster.yaml with the benchmark's model, steps, replicas, batch and threads; no evaluation."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    learner = config["services"]["learner"]
    learner.update(batch_size=args.batch, group_size=args.group, max_tokens=args.tokens, eval_every=0)
    if args.in_process is not None:
        config["services"]["rollout"]["in_process"] = args.in_process
    config.update(
        steps=args.steps, replicas=args.replicas, model_dir=str(model_dir), out_dir=str(out_dir),
        baseline_eval=False, poll_s=1.0, threads={"learner": args.threads, "rollout": args.threads},
    )  # fmt: skip
    return config


# ----------------------------------------------------------------------------- the cluster


def run_cluster(config: dict[str, Any], tmp: Path, timeout_s: float) -> dict[str, Any]:
    """Runs `aisrl up` to its last step; returns the learner's step events and the wall time."""
    from aisrl.cluster.report import learner_events

    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    run_id = "bench-cluster"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AISRL_")}
    aisrl = str(Path(sys.executable).parent / "aisrl")
    log_file = tmp / "aisrl-up.out"
    start = time.perf_counter()
    with log_file.open("wb") as out:
        up = subprocess.Popen([aisrl, "up", "--config", str(path), "--run-id", run_id], env=env, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            rc = up.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C does: the supervisor stops its children
            try:
                up.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()
            rc = None
    wall = time.perf_counter() - start
    logs = Path(config["out_dir"]) / run_id / "logs"
    steps = learner_events((logs / "learner.log").read_text().splitlines())[0] if logs.is_dir() else []
    if rc != 0 or len(steps) < config["steps"]:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"aisrl up ended with {rc} after {len(steps)} step(s):\n{tail}")
    by_replica = [[e for e in _json_lines(f) if e.get("msg") == "batch written"]
                  for f in sorted(logs.glob("rollout-*.log"))]  # fmt: skip
    return {"steps": steps, "wall_s": wall, "rollout_batches": [b for r in by_replica for b in r],
            "rollout_batches_by_replica": by_replica}  # fmt: skip


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def rollout_usage(cluster: dict[str, Any], replicas: int, batch: int) -> str:
    """What the rollouts did between the end of step 1 and the end of step N, from their `batch written` events."""
    steps = cluster["steps"]
    t0, t1 = steps[0]["ts"], steps[-1]["ts"]
    inside = [b for b in cluster["rollout_batches"] if t0 < b["ts"] <= t1]
    written = sum(int(b["groups"]) for b in inside)
    busy = sum(float(b["seconds"]) for b in inside) / ((t1 - t0) * replicas)
    stale = sum(int(s.get("stale") or 0) for s in steps[1:])
    return (f"rollouts wrote {written} groups during steps 2..N, {batch * (len(steps) - 1)} were trained, {stale} "
            f"re-queued as stale; each replica was busy sampling {busy:.0%} of that time")  # fmt: skip


# ----------------------------------------------------------------------------- the synchronous loop


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Laps:
    """`lap(name)` records the seconds since the previous lap (or creation) under name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._mark
        self._mark = now


def run_sync(config: dict[str, Any], model_dir: Path, tmp: Path, threads: int) -> dict[str, Any]:
    """N synchronous steps: sample -> score -> prepare -> alpha -> update -> save + reload (module docstring)."""
    import numpy as np
    import torch

    from aisrl import streams
    from aisrl.cluster.topology import thread_env
    from aisrl.core.ais import compute_coefficient
    from aisrl.services.learner.config import LearnerSettings
    from aisrl.services.learner.feeder import JobSpec, make_job
    from aisrl.services.learner.groups import decode_group
    from aisrl.services.learner.learner import default_task, load_trainer
    from aisrl.services.rollout.config import RolloutSettings
    from aisrl.services.rollout.engine import create_engine
    from aisrl.services.rollout.weights_client import save_checkpoint
    from aisrl.services.rollout.worker import (
        GroupMeta,
        JobLimits,
        build_group,
        check_group,
        decode_job,
        sampling_batches,
        score,
    )
    from aisrl.tasks import get_task, problem_from_json

    run_id = "bench-sync"
    overrides = config["services"]
    ls = LearnerSettings(**overrides["learner"], run_id=run_id, model_path=str(model_dir), task=config["task"],
                         task_options=config["task_options"], work_dir=str(tmp / "sync-learner"))  # fmt: skip
    rs = RolloutSettings(**overrides["rollout"], run_id=run_id, model_path=str(model_dir))
    torch.set_num_threads(threads)
    trainer, _ = load_trainer(model_dir, ls)
    correction = ls.correction_config()
    _, source = default_task(ls)
    spec = JobSpec(run_id, ls.group_size, ls.max_tokens, ls.temperature, ls.max_staleness, ls.seed)
    limits = JobLimits(run_id, rs.max_group_size, rs.max_tokens_limit, rs.max_deliveries)
    model_config = trainer.model.config
    vocab, max_len = getattr(model_config, "vocab_size", None), getattr(model_config, "max_position_embeddings", None)
    # What aisrl/cluster/topology.py gives each rollout process; the spawned engine process inherits it.
    engine_env = thread_env("rollout", threads)
    engine_env["VLLM_LOGGING_LEVEL"] = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
    with _environ(engine_env):
        engine = create_engine(rs.engine, model_dir, rs.engine_config())
    ends, tokens, phases, rewards, alphas = [], [], [], [], []
    version, prev_ema, loaded = 0, None, None
    try:
        for step in range(config["steps"]):
            lap = _Laps()
            now = time.time()
            jobs = [make_job(spec, source, step * ls.batch_size + i, 0, version, now) for i in range(ls.batch_size)]
            entries = [streams.StreamEntry(f"{step}-{i}", job.SerializeToString()) for i, job in enumerate(jobs)]
            decoded = [decode_job(e, limits, get_task, problem_from_json, now) for e in entries]
            sampled = []
            for first in range(0, len(decoded), rs.batch_size):  # engine calls of the rollout worker's batch size
                for sampling, batch in sampling_batches(decoded[first : first + rs.batch_size]):
                    sampled += zip(batch, engine.generate([j.problem.prompt for j in batch], sampling), strict=True)
            lap("sample")
            meta = GroupMeta(version, engine.precision_label, "sync", model_dir.name, lap.seconds["sample"])
            groups = []
            for job, completions in sampled:
                check_group(job, completions)
                pb = build_group(job, completions, score(job, completions), meta, 0.0, time.time())
                groups.append(decode_group(job.entry_id, pb, vocab, max_len))
            lap("score")
            prepared = trainer.prepare(groups)
            lap("prepare")
            result = compute_coefficient(prepared.arrays, correction, prev_ema)
            lap("alpha")
            if np.count_nonzero(result.token_keep):
                trainer.update(prepared, np.asarray(result.token_coef))
            prev_ema = result.alpha_ema
            lap("update")
            version += 1
            new_dir = save_checkpoint(trainer.weights_state(), model_dir, tmp / "sync-weights" / f"v{version}")
            engine.load_weights(new_dir)
            if loaded is not None:
                shutil.rmtree(loaded, ignore_errors=True)
            loaded = new_dir
            lap("reload")
            ends.append(time.time())
            tokens.append(prepared.n_tokens)
            phases.append(lap.seconds)
            rewards.append(float(np.mean(prepared.rewards)))
            alphas.append(result.alpha)
    finally:
        engine.close()
    return {"ends": ends, "tokens": tokens, "phases": phases, "rewards": rewards, "alphas": alphas}


# ----------------------------------------------------------------------------- report


def _breakdown(title: str, rows: list[dict[str, float]], labels: tuple[tuple[str, str], ...]) -> None:
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k, _ in labels}
    total = sum(med.values())
    print(f"  {title} (median s over steps 2..N; sum {total:.2f} s):")
    for key, label in labels:
        print(f"    {key:<12}{med[key]:8.3f} s  {med[key] / total:6.1%}  {label}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="learner steps on each side (>= 2)")
    parser.add_argument("--replicas", type=int, default=2, help="rollout replicas of the cluster")
    parser.add_argument("--batch", type=int, default=32, help="prompts (groups) per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--tokens", type=int, default=24, help="max tokens per completion")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (torch / OpenMP)")
    add_model_options(parser)
    parser.add_argument("--only", choices=("both", "cluster", "sync"), default="both")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed for `aisrl up`")
    args = parser.parse_args(argv or [])  # `python -m bench` calls main() with no arguments
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the steady state starts at the end of step 1)")

    import logging

    logging.getLogger("aisrl").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="aisrl-bench-") as name:
        tmp = Path(name)
        model_dir, model_label = resolve_model(args.model, tmp)
        config = cluster_config(args, model_dir, tmp / "runs")
        learner, rollout = config["services"]["learner"], config["services"]["rollout"]
        print(f"[{config['task']}, {args.batch} prompts x G={args.group} x <= {args.tokens} tokens per step, "
              f"{args.steps} steps, model {model_label}; learner {learner.get('compute_dtype', 'bfloat16')} "
              f"{learner['correction_mode']}, max_staleness {learner['max_staleness']}; rollout "
              f"{rollout['engine']} {rollout['precision']}, "
              f"{'in process' if rollout.get('in_process') else 'engine process'}, "
              f"{rollout['batch_size']} jobs per engine call; "
              f"{args.threads} thread(s) per process, {os.cpu_count()} CPUs]",
              flush=True)  # fmt: skip

        cluster = sync = None
        if args.only in ("both", "cluster"):
            cluster = run_cluster(config, tmp, args.timeout)
            steps = cluster["steps"]
            rate, per_step = steady_rate([s["ts"] for s in steps], [int(s["tokens"]) for s in steps])
            cluster |= {"rate": rate, "per_step": per_step}
            print(f"  cluster ({args.replicas} rollout replicas): {rate:8,.0f} trained tokens/s, "
                  f"{per_step:.2f} s/step (wall {cluster['wall_s']:.0f} s with start-up, report and stop; "
                  f"reward {steps[0]['reward']:.3f} -> {steps[-1]['reward']:.3f})", flush=True)  # fmt: skip
        if args.only in ("both", "sync"):
            sync = run_sync(config, model_dir, tmp, args.threads)
            rate, per_step = steady_rate(sync["ends"], sync["tokens"])
            sync |= {"rate": rate, "per_step": per_step}
            print(f"  synchronous loop (in process)  : {rate:8,.0f} trained tokens/s, {per_step:.2f} s/step "
                  f"(reward {sync['rewards'][0]:.3f} -> {sync['rewards'][-1]:.3f})", flush=True)  # fmt: skip
        if cluster and sync:
            print(f"  cluster / sync                 : {cluster['rate'] / sync['rate']:8.2f}x trained tokens/s "
                  f"(step time {cluster['per_step']:.2f} s vs {sync['per_step']:.2f} s)")  # fmt: skip
        if cluster:
            _breakdown("cluster learner step", [s["seconds"] for s in cluster["steps"][1:]], CLUSTER_PHASES)
            print(f"    ({rollout_usage(cluster, args.replicas, args.batch)})")
        if sync:
            _breakdown("synchronous step", sync["phases"][1:], SYNC_PHASES)


if __name__ == "__main__":
    main(sys.argv[1:])
