"""The pure parts of the TRL peer benchmark (TRL itself is not needed: it is a benchmark-only extra)."""

from __future__ import annotations

import argparse
import math

import pytest

from bench import bench_peer
from bench.bench_peer import cluster_learner_seconds, sampling_rate, target_lines, trl_config_kwargs, trl_missing


def test_trl_config_is_the_clusters_work_in_one_update_per_generated_batch(tmp_path):
    args = argparse.Namespace(batch=32, group=8, tokens=24, steps=12, trl_gradient_checkpointing=False)
    kw = trl_config_kwargs(args, {"lr": 1e-4, "temperature": 1.0}, tmp_path)
    assert kw["per_device_train_batch_size"] == 256 and kw["num_generations"] == 8
    assert kw["gradient_accumulation_steps"] == 1 and kw["max_completion_length"] == 24
    assert (kw["learning_rate"], kw["temperature"], kw["beta"], kw["max_steps"]) == (1e-4, 1.0, 0.0, 12)
    assert kw["use_cpu"] and not kw["bf16"] and not kw["gradient_checkpointing"]


def test_a_missing_trl_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(bench_peer.importlib.util, "find_spec", lambda name: None)
    assert "pip install -e '.[bench]'" in trl_missing()
    bench_peer.main(["--steps", "2"])  # returns without starting anything
    assert "needs TRL" in capsys.readouterr().err


def test_sampling_rate_adds_each_replicas_rate_inside_the_window():
    r0 = [{"ts": 1.0, "tokens": 999, "sample_s": 1.0},  # before the window: left out
          {"ts": 2.0, "tokens": 100, "sample_s": 0.5}, {"ts": 3.0, "tokens": 300, "sample_s": 1.5}]  # fmt: skip
    r1 = [{"ts": 2.5, "tokens": 50, "sample_s": 0.25}, {"ts": 9.0, "tokens": 1, "sample_s": 1.0}]  # after: left out
    assert math.isclose(sampling_rate([r0, r1], 1.0, 3.0), 400 / 2.0 + 50 / 0.25)
    assert sampling_rate([[{"ts": 2.0, "tokens": 5, "seconds": 1.0}]], 1.0, 3.0) == 0.0  # no sample_s: not counted


def test_learner_seconds_are_lp_pi_alpha_and_update():
    step = {"seconds": {"wait": 5.0, "prepare": 1.0, "diagnostics": 0.25, "update": 2.0, "publish": 9.0}}
    assert cluster_learner_seconds(step) == 3.25


def test_target_lines_are_ratios_of_the_arms_that_ran():
    trl = {"rate": 1000.0, "sample_rate": 4000.0, "train_rate": 2000.0}
    cluster = {"rate": 1500.0, "sample_rate": 6000.0, "learner_rate": 1000.0}
    lines = target_lines(trl, cluster, {"rate": 500.0})
    text = "\n".join(lines)
    assert "cluster / TRL" in text and "1.50x" in text and "0.50x" in text and "3.00x" in text
    assert target_lines(trl, None, None) == []
    with pytest.raises(KeyError):
        target_lines(trl, {"rate": 1.0}, None)  # a cluster arm without its rates is a bug, not a blank line


def test_trainer_bench_batches_are_countdown_shaped_groups():
    from aisrl.models.tokenizer import encode
    from bench.bench_trainer import countdown_groups

    newline = encode("\n")[-1]

    groups = countdown_groups(step=1, batch=2, group=3)
    assert len(groups) == 2 and all(len(g.samples) == 3 for g in groups)
    for g in groups:
        assert len({s.prompt_ids.tobytes() for s in g.samples}) == 1  # G samples of one prompt
        assert all(s.completion_ids[-1] == newline and len(s.lp_mu) == len(s.completion_ids) for s in g.samples)
