"""End to end: `aisrl up` trains a few steps with real services, then the same run id resumes from its checkpoint.

Everything here is real and nothing is mocked or stubbed: the `aisrl up` command in a subprocess, its
child processes (the diagnostics service, the learner, two rollout workers running the vLLM engine on
the CPU with FP8-emulated weights), the gRPC weight streaming and coefficient calls, and a Redis server
(the session's embedded one, passed as `redis_url`, so the run's streams and the diagnostics history
outlive the cluster and are read back here). The model is a random tiny Llama (no warm start): its
rewards are all 0, which does not matter to what is checked.

What is checked, from what the services themselves stored (Redis streams, the diagnostics history,
learner checkpoints, logs) rather than from the launcher's report alone:
- the learner announces versions 1..N, one per step; a resume re-announces the restored version with
  the same weights digest, then continues N+1, N+2, ...;
- every trajectory group on the stream carries one policy version, one that was announced (or the
  initial 0), per worker never going back; groups are FP8-emulated and well formed;
- the groups the learner trained on at step k (the ids its checkpoint of step k lists) were sampled at a
  version in [k - 1 - max_staleness, k - 1], and no group was trained on twice;
- the diagnostics service recorded exactly one batch per step, matching the learner's step events;
- the second `aisrl up` resumed: step N+1 follows N, optimizer state and counters continue, the
  records of steps 1..N were not redone, rollouts rejoined the same consumer group and sampled at the
  restored version or newer, and the report covers every step and says where the run resumed;
- no process started by `aisrl up` (vLLM engine cores included) is left after either run.

It takes about 100 to 150 s on 2 CPU cores, mostly the two start-ups of two vLLM engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from cluster_support import TreeWatcher, log_tails, start_up, wait_up, write_yaml  # tests/integration on sys.path

from aisrl.redis_conn import async_client, sync_client
from aisrl.services.diagnostics.history import History
from aisrl.services.learner import checkpoint as ckpt
from aisrl.streams import PAYLOAD_FIELD, RunStreams
from aisrl.v1 import common_pb2, rollout_pb2, weights_pb2

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(600)]

RUN = "e2e"
# Steps of the first `aisrl up`, then the target of the resumed one. The first run leaves up to two steps' worth of
# sampled groups on the stream (the admission gate's slack), so the resumed run goes 3 steps further: its last step
# needs groups that its own rollouts sample.
FIRST, SECOND = 3, 6
BATCH, GROUP, MAX_TOKENS, MAX_STALENESS = 4, 2, 8, 1
UP_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from aisrl.models.tiny import init_model_dir

    return init_model_dir(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def config(tmp_path: Path, model: Path, redis_url: str, steps: int) -> Path:
    return write_yaml(tmp_path / f"cluster-{steps}.yaml", {
        "steps": steps, "replicas": 2, "model_dir": str(model), "out_dir": str(tmp_path / "runs"),
        "redis_url": redis_url, "baseline_eval": False, "health_timeout_s": 200, "stop_grace_s": 30, "poll_s": 0.5,
        "threads": {"learner": 1, "rollout": 1},
        "services": {
            "learner": {"batch_size": BATCH, "group_size": GROUP, "max_tokens": MAX_TOKENS, "eval_every": 0,
                        "max_staleness": MAX_STALENESS, "checkpoint_every": 1, "checkpoint_keep": 100,
                        "compute_dtype": "float32"},
            "rollout": {"engine": "vllm", "precision": "fp8", "batch_size": BATCH, "kv_cache_gb": 0.25,
                        "max_model_len": 128},
        },
    })  # fmt: skip


# ----------------------------------------------------------------------------- what the services stored


def notices(redis_url: str) -> list[weights_pb2.WeightVersionNotice]:
    """The weights stream, oldest first."""
    with sync_client(redis_url) as client:
        raw = client.xrange(RunStreams(RUN).weights)
    return [weights_pb2.WeightVersionNotice.FromString(fields[PAYLOAD_FIELD]) for _, fields in raw]


def trajectory_groups(redis_url: str) -> dict[str, rollout_pb2.TrajectoryGroup]:
    """Every group on the trajectories stream by entry id, in stream order (acked entries stay on the stream)."""
    with sync_client(redis_url) as client:
        raw = client.xrange(RunStreams(RUN).trajectories)
    return {eid.decode(): rollout_pb2.TrajectoryGroup.FromString(fields[PAYLOAD_FIELD]) for eid, fields in raw}


def diagnostics_history(redis_url: str) -> list[dict[str, Any]]:
    """What the diagnostics service recorded for the run, read through its own History class."""

    async def read() -> list[dict[str, Any]]:
        client = async_client(redis_url)
        try:
            return await History(client).page(RUN, since_step=0, limit=1000)
        finally:
            await client.aclose()

    return asyncio.run(read())


def learner_log_events(run_dir: Path, offset: int = 0) -> list[dict[str, Any]]:
    """The learner's JSON log events from byte `offset` on (the log is appended to across runs)."""
    with open(run_dir / "logs" / "learner.log", "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    events = []
    for line in lines:
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return [e for e in events if str(e.get("logger", "")).startswith("aisrl.learner")]


def trained_per_step(run_dir: Path) -> dict[int, ckpt.Checkpoint]:
    """Checkpoint of each step: with checkpoint_every 1 its `used_unacked` lists exactly that step's groups."""
    return {step: ckpt.Checkpoint.from_dict(torch.load(path, weights_only=False))
            for step, path in ckpt.list_checkpoints(run_dir / "learner" / "checkpoints")}  # fmt: skip


def rollout_batches(run_dir: Path) -> dict[str, list[int]]:
    """Per worker, the policy version of every group its log says it wrote (one event per batch)."""
    out: dict[str, list[int]] = defaultdict(list)
    for log in sorted((run_dir / "logs").glob("rollout-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"batch written"' in line:
                event = json.loads(line)
                out[event["worker"]] += [int(event["version"])] * int(event["groups"])
    return out


def opt_steps(checkpoint: ckpt.Checkpoint) -> set[int]:
    return {int(state["step"]) for state in checkpoint.optimizer["state"].values()}


# ----------------------------------------------------------------------------- checks


def check_groups(groups: dict[str, rollout_pb2.TrajectoryGroup], announced: set[int], why: str) -> None:
    assert groups, f"no trajectory group on the stream\n{why}"
    per_worker: dict[str, list[int]] = defaultdict(list)
    for eid, g in groups.items():
        where = f"group {eid} (job {g.job_id}, worker {g.worker_id}, version {g.policy_version})"
        assert g.run_id == RUN, f"{where}: run_id {g.run_id!r}\n{why}"
        assert g.policy_version in announced | {0}, f"{where}: version never announced {sorted(announced)}\n{why}"
        assert g.precision == common_pb2.PRECISION_FP8_EMULATED, (
            f"{where}: precision {common_pb2.Precision.Name(g.precision)}, expected FP8_EMULATED\n{why}"
        )
        assert len(g.samples) == GROUP, f"{where}: {len(g.samples)} samples, expected {GROUP}\n{why}"
        for s in g.samples:
            n = len(s.completion_ids) // 4
            assert 1 <= n <= MAX_TOKENS and len(s.logprobs) == 4 * n, f"{where}: {n} tokens, {len(s.logprobs)} B\n{why}"
        per_worker[g.worker_id].append(g.policy_version)
    assert set(per_worker) == {"rollout-0", "rollout-1"}, f"groups came from {sorted(per_worker)}\n{why}"
    for worker, versions in per_worker.items():
        assert versions == sorted(versions), f"{worker} wrote versions out of order: {versions}\n{why}"


def check_trained(groups: dict[str, rollout_pb2.TrajectoryGroup], per_step: dict[int, ckpt.Checkpoint],
                  steps: range, why: str) -> None:  # fmt: skip
    seen: dict[str, int] = {}
    for k in steps:
        assert k in per_step, f"no checkpoint of step {k}: {sorted(per_step)}\n{why}"
        ids = per_step[k].stream.used_unacked
        assert len(ids) == BATCH, f"step {k} trained on {len(ids)} groups, expected {BATCH}\n{why}"
        for eid in ids:
            assert eid not in seen, f"group {eid} trained at steps {seen[eid]} and {k}\n{why}"
            seen[eid] = k
            assert eid in groups, f"step {k} trained on {eid}, not on the trajectories stream\n{why}"
            v = groups[eid].policy_version
            assert k - 1 - MAX_STALENESS <= v <= k - 1, (
                f"step {k} (trained at version {k - 1}) used group {eid} of version {v}; "
                f"max_staleness {MAX_STALENESS}\n{why}"
            )


def check_diagnostics(history: list[dict[str, Any]], step_events: list[dict[str, Any]], n: int, why: str) -> None:
    assert [r["step"] for r in history] == list(range(1, n + 1)), (
        f"diagnostics recorded steps {[r['step'] for r in history]}, expected 1..{n}\n{why}"
    )
    by_step = {e["step"]: e for e in step_events}
    for r in history:
        k, event = r["step"], by_step.get(r["step"])
        assert event is not None, f"diagnostics recorded step {k}; the learner logged no such step\n{why}"
        assert r["run_id"] == RUN and r["policy_version"] == k - 1, f"record of step {k}: {r}\n{why}"
        assert not r["computed_locally"] and not event["local"], f"step {k}: alpha computed locally\n{why}"
        assert r["n_tokens"] == event["tokens"], f"step {k}: {r['n_tokens']} tokens recorded, {event}\n{why}"
        assert abs(r["alpha"] - event["alpha"]) <= 6e-5, f"step {k}: alpha {r['alpha']} recorded, {event}\n{why}"
        assert 0 < r["reliability"] <= 1 and r["kl"] >= 0, f"step {k}: {r}\n{why}"


def test_up_trains_with_vllm_fp8_rollouts_then_resumes_the_run(tmp_path, tiny_model, redis_url):
    run_dir = tmp_path / "runs" / RUN

    # ---- first run: steps 1..FIRST
    up = start_up(config(tmp_path, tiny_model, redis_url, FIRST), RUN)
    watcher = TreeWatcher(up.pid)
    rc, text = wait_up(up, UP_TIMEOUT_S)
    why = f"--- aisrl up output ---\n{text}\n{log_tails(run_dir)}"
    assert rc == 0, f"first aisrl up exited with {rc} (None: still running after {UP_TIMEOUT_S} s)\n{why}"
    assert watcher.survivors() == [], why
    assert len(watcher.seen) >= 4, f"diagnostics, learner and 2 rollouts ran as descendants\n{why}"

    events = learner_log_events(run_dir)
    steps1 = [e for e in events if e["msg"] == "step"]
    assert [e["step"] for e in steps1] == list(range(1, FIRST + 1)), why
    assert [e["version"] for e in steps1] == list(range(1, FIRST + 1)), why
    first_notices = notices(redis_url)
    assert [(n.version, n.step) for n in first_notices] == [(k, k) for k in range(1, FIRST + 1)], (
        f"weights notices (version, step): {[(n.version, n.step) for n in first_notices]}\n{why}"
    )
    assert all(n.run_id == RUN and n.sha256 and n.total_bytes > 0 for n in first_notices), why
    announced = {n.version for n in first_notices}
    groups = trajectory_groups(redis_url)
    check_groups(groups, announced, why)
    versions = [g.policy_version for g in groups.values()]
    assert min(versions) == 0 and max(versions) >= FIRST - 1, f"versions over the run: {versions}\n{why}"
    assert rollout_batches(run_dir) == {
        w: [g.policy_version for g in groups.values() if g.worker_id == w] for w in ("rollout-0", "rollout-1")
    }, f"rollout logs disagree with the stream\n{why}"
    per_step = trained_per_step(run_dir)
    check_trained(groups, per_step, range(1, FIRST + 1), why)
    assert per_step[FIRST].trainer_updates == FIRST and opt_steps(per_step[FIRST]) == {FIRST}, why
    history1 = diagnostics_history(redis_url)
    check_diagnostics(history1, steps1, FIRST, why)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "finished" and report["steps"]["reached"] == FIRST, why
    assert report["diagnostics_records"] == FIRST and report["resumed_from"] is None, why

    # ---- second run, same run id: resumes at FIRST + 1 and continues to SECOND
    log_offset = (run_dir / "logs" / "learner.log").stat().st_size
    up = start_up(config(tmp_path, tiny_model, redis_url, SECOND), RUN)
    watcher = TreeWatcher(up.pid)
    rc, text = wait_up(up, UP_TIMEOUT_S)
    why = f"--- aisrl up output (resumed run) ---\n{text}\n{log_tails(run_dir)}"
    assert rc == 0, f"resumed aisrl up exited with {rc} (None: still running after {UP_TIMEOUT_S} s)\n{why}"
    assert watcher.survivors() == [], why

    events = learner_log_events(run_dir, log_offset)
    resumed = [e for e in events if e["msg"] == "resumed from checkpoint"]
    assert [(e["step"], e["version"]) for e in resumed] == [(FIRST, FIRST)], f"no resume logged\n{why}"
    started = [e for e in events if e["msg"] == "learner started"]
    assert [e["resumed_from"] for e in started] == [FIRST], why
    steps2 = [e for e in events if e["msg"] == "step"]
    assert [e["step"] for e in steps2] == list(range(FIRST + 1, SECOND + 1)), f"resumed run's steps\n{why}"
    assert [e["version"] for e in steps2] == list(range(FIRST + 1, SECOND + 1)), why

    all_notices = notices(redis_url)
    new = all_notices[len(first_notices) :]
    assert all_notices[: len(first_notices)] == first_notices, why
    assert [(n.version, n.step) for n in new] == [(k, k) for k in range(FIRST, SECOND + 1)], (
        f"resumed run's notices (version, step): {[(n.version, n.step) for n in new]}\n{why}"
    )
    assert new[0].sha256 == first_notices[-1].sha256, f"restored weights differ from version {FIRST}'s\n{why}"

    first_ids = set(groups)
    groups = trajectory_groups(redis_url)
    check_groups(groups, {n.version for n in all_notices}, why)
    fresh = {eid: g.policy_version for eid, g in groups.items() if eid not in first_ids}
    assert fresh and min(fresh.values()) >= FIRST, f"groups sampled by the resumed run's rollouts: {fresh}\n{why}"
    per_step = trained_per_step(run_dir)
    check_trained(groups, per_step, range(1, SECOND + 1), why)
    assert set(per_step[SECOND].stream.used_unacked) <= set(fresh), f"step {SECOND} trained on old groups\n{why}"
    last = per_step[SECOND]
    assert (last.step, last.version, last.trainer_updates) == (SECOND, SECOND, SECOND), why
    assert opt_steps(last) == {SECOND}, f"AdamW step counts {opt_steps(last)}: optimizer state not restored\n{why}"
    assert last.stream.consumed_groups == SECOND * BATCH, why

    history2 = diagnostics_history(redis_url)
    check_diagnostics(history2, steps1 + steps2, SECOND, why)
    assert history2[:FIRST] == history1, f"records of steps 1..{FIRST} were recomputed by the resumed run\n{why}"

    with sync_client(redis_url) as client:
        prompt_groups = client.xinfo_groups(RunStreams(RUN).prompts)
        consumers = client.xinfo_consumers(RunStreams(RUN).prompts, "rollout")
        trajectory_groups_ = client.xinfo_groups(RunStreams(RUN).trajectories)
    assert [g["name"] for g in prompt_groups] == [b"rollout"], f"prompt consumer groups {prompt_groups}\n{why}"
    assert sorted(c["name"] for c in consumers) == [b"rollout-0", b"rollout-1"], f"consumers {consumers}\n{why}"
    assert [g["name"] for g in trajectory_groups_] == [b"learner"], why

    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "finished" and report["steps"]["reached"] == SECOND, why
    assert [r["step"] for r in report["per_step"]] == list(range(1, SECOND + 1)), why
    assert report["diagnostics_records"] == SECOND, why
    assert report["resumed_from"] == FIRST, f"report: resumed_from {report['resumed_from']}\n{why}"
    assert report["starts"] == [{"step": 0, "resumed_from": None}, {"step": FIRST, "resumed_from": FIRST}], why
    assert f"resumed from the checkpoint of step {FIRST}" in text, why
