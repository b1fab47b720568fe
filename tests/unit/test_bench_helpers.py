"""The pure parts of the benchmarks: steady-state rate, the cluster config they run, rollout usage, discovery."""

from __future__ import annotations

import argparse
import math

import pytest

from bench.__main__ import available
from bench.__main__ import main as run_benchmarks
from bench.bench_cluster import cluster_config, rollout_usage, steady_rate


def test_every_benchmark_module_is_discovered():
    assert {"ais", "cluster", "diagnostics", "learner", "replicas", "rollout"} <= set(available())


def test_an_unknown_benchmark_is_refused_with_the_list(capsys):
    assert run_benchmarks(["nope"]) == 2
    assert "unknown benchmark(s) nope; available: ais, " in capsys.readouterr().err


def test_steady_rate_excludes_the_first_step():
    # step 1 ends at t=10 (start-up included), then 3 steps of 2 s with 100, 200, 300 tokens
    rate, per_step = steady_rate([10.0, 12.0, 14.0, 16.0], [999, 100, 200, 300])
    assert math.isclose(rate, 600 / 6) and math.isclose(per_step, 2.0)
    with pytest.raises(ValueError, match="at least 2 steps"):
        steady_rate([1.0], [5])


@pytest.mark.parametrize("in_process", [None, True, False])
def test_cluster_config_follows_the_demo_file_and_the_options(tmp_path, in_process):
    args = argparse.Namespace(batch=4, group=2, tokens=8, steps=3, replicas=1, threads=1, in_process=in_process)
    config = cluster_config(args, tmp_path / "model", tmp_path / "runs")
    learner, rollout = config["services"]["learner"], config["services"]["rollout"]
    assert (learner["batch_size"], learner["group_size"], learner["max_tokens"], learner["eval_every"]) == (4, 2, 8, 0)
    assert config["steps"] == 3 and config["replicas"] == 1 and config["baseline_eval"] is False
    assert config["model_dir"] == str(tmp_path / "model")
    assert rollout["in_process"] is (True if in_process is None else in_process)  # the file says true


def test_rollout_usage_counts_only_batches_between_the_first_and_last_step():
    cluster = {
        "steps": [{"ts": 10.0}, {"ts": 12.0, "stale": 1}, {"ts": 14.0, "stale": 0}],
        "rollout_batches": [
            {"ts": 9.0, "groups": 8, "seconds": 1.0},  # before the end of step 1: start-up, excluded
            {"ts": 11.0, "groups": 8, "seconds": 2.0},
            {"ts": 14.0, "groups": 8, "seconds": 2.0},
        ],
    }
    text = rollout_usage(cluster, replicas=1, batch=8)
    assert "wrote 16 groups" in text and "16 were trained" in text and "1 re-queued" in text and "busy" in text
    assert "100%" in text  # 4 s of sampling over 4 s with one replica
