"""Pure parts of the learner: job ids, group decoding, per-token coefficients, checkpoints, weight store, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from aisrl.cli import app
from aisrl.core.ais import compute_coefficient
from aisrl.core.synthetic import synthetic_batch
from aisrl.core.types import CorrectionConfig, CorrectionMode, WeightLevel
from aisrl.services.learner import checkpoint as ckpt
from aisrl.services.learner.config import LearnerSettings
from aisrl.services.learner.feeder import JobSpec, job_id, make_job, parse_job_id
from aisrl.services.learner.groups import InvalidGroup, decode_group, parse_group
from aisrl.services.learner.trainer import token_coefficients
from aisrl.services.learner.weights_server import WeightStore, resume_version
from aisrl.settings import env_name
from aisrl.v1 import rollout_pb2
from aisrl.wire.arrays import float32_to_bytes, int32_to_bytes


def _sample(completion=(10, 11, 12), logprobs=(-1.0, -2.0, -0.5), reward=1.0, prompt=(1, 20, 21)):
    return rollout_pb2.Sample(
        prompt_ids=int32_to_bytes(np.array(prompt)),
        completion_ids=int32_to_bytes(np.array(completion)),
        logprobs=float32_to_bytes(np.array(logprobs, dtype=np.float64)),
        reward=reward,
    )


def _group(*samples, run_id="r"):
    return rollout_pb2.TrajectoryGroup(run_id=run_id, job_id="p3-a0", policy_version=2, samples=list(samples))


def test_job_ids_round_trip_and_foreign_ids_are_none():
    assert parse_job_id(job_id(12, 3)) == (12, 3)
    assert parse_job_id("somebody-else") is None
    spec = JobSpec("r", group_size=4, max_tokens=8, temperature=0.7, max_staleness=2, seed=1)
    job = make_job(spec, lambda i: ("toy", f'{{"i": {i}}}'), 5, 1, version=7, now=1.0)
    assert (job.job_id, job.issued_version, job.problem_json) == ("p5-a1", 7, '{"i": 5}')
    assert job.seed != make_job(spec, lambda i: ("toy", ""), 5, 2, 7, 1.0).seed  # attempts sample differently


@pytest.mark.parametrize(("version", "max_staleness"), [(0, 0), (0, 2), (1, 1), (7, 2), (40, 4)])
def test_jobs_require_the_version_current_at_admission(version, max_staleness):
    """Admitted at v, a group is trained by v + max_staleness at the latest: sampled at >= v it is never stale
    (v - max_staleness, the old value, let workers sample at versions the batcher then rejects)."""
    spec = JobSpec("r", group_size=4, max_tokens=8, temperature=1.0, max_staleness=max_staleness, seed=1)
    job = make_job(spec, lambda i: ("toy", "{}"), 3, 0, version=version, now=1.0)
    assert job.min_policy_version == job.issued_version == version


def test_group_decodes():
    group = decode_group("1-0", _group(_sample(), _sample(reward=0.0)))
    assert group.n_tokens == 6 and group.policy_version == 2 and list(group.rewards) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("sample", "kind"),
    [
        (_sample(logprobs=(-1.0, float("nan"), -1.0)), "logprobs"),
        (_sample(logprobs=(-1.0, 0.5, -1.0)), "logprobs"),
        (_sample(logprobs=(-1.0, -1.0)), "arrays"),
        (_sample(completion=(), logprobs=()), "arrays"),
        (_sample(reward=float("inf")), "reward"),
        (_sample(completion=(10, 11, 500)), "arrays"),
    ],
)
def test_bad_groups_are_rejected_with_a_reason(sample, kind):
    with pytest.raises(InvalidGroup) as info:
        decode_group("1-0", _group(sample), vocab_size=100)
    assert info.value.kind == kind


def test_too_long_and_foreign_groups_are_rejected():
    with pytest.raises(InvalidGroup, match="exceed"):
        decode_group("1-0", _group(_sample()), max_length=5)
    with pytest.raises(InvalidGroup, match="run_id"):
        parse_group(_group(_sample(), run_id="other").SerializeToString(), "r")
    with pytest.raises(InvalidGroup, match="protobuf"):
        parse_group(b"\xff\xff", "r")


def test_float32_rounding_above_zero_is_used_as_zero_and_counted():
    group = decode_group("1-0", _group(_sample(logprobs=(-1.0, 3e-5, -0.5))))
    assert group.rounded == 1 and group.samples[0].lp_mu[1] == 0.0


@pytest.mark.parametrize("mode", list(CorrectionMode))
@pytest.mark.parametrize("level", list(WeightLevel))
def test_token_coefficients_match_the_core_at_its_alpha(mode, level):
    """The learner re-applies the service's alpha to the local masks and weights: same c as the core."""
    arrays = synthetic_batch(n_sequences=12, mean_length=10, mismatch=0.2, seed=4)
    config = CorrectionConfig(mode=mode, level=level, cap=3.0, fixed_alpha=0.3, veto_threshold=0.2)
    result = compute_coefficient(arrays, config)
    got = token_coefficients(arrays, config, result.alpha, result.token_keep)
    np.testing.assert_allclose(got, result.token_coef, rtol=1e-12, atol=1e-15)


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    def make(step):
        return ckpt.Checkpoint(step, step, {"w": torch.ones(2) * step}, {}, {"numpy": {}}, ckpt.StreamState(["1-0"], 4))

    for step in (2, 4, 6):
        ckpt.save(tmp_path, make(step))
    (tmp_path / ".ckpt-00000008.pt.123.tmp").write_bytes(b"half a checkpoint")  # a crash mid-write
    latest = ckpt.latest(tmp_path)
    assert latest.step == 6 and latest.stream.used_unacked == ["1-0"] and float(latest.model["w"][0]) == 6
    ckpt.prune(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]
    assert not list(tmp_path.glob("*.tmp"))


def test_weight_store_keeps_the_newest_versions():
    store = WeightStore(keep=2)
    for v in (1, 2, 3):
        store.put(v, v, {"w": torch.full((2,), float(v), dtype=torch.bfloat16)})
    assert store.versions == [2, 3] and store.get(0).version == 3 and store.get(1) is None
    with pytest.raises(ValueError, match="newer"):
        store.put(3, 3, {})


def test_resume_version_never_reuses_an_announced_number():
    assert resume_version(10, 10) == 10  # the checkpoint's own version was announced: same weights
    assert resume_version(10, 7) == 10
    assert resume_version(10, 12) == 13  # 11 and 12 were lost with the crash


def test_settings_are_cli_options_with_bounds():
    result = CliRunner().invoke(app, ["learner", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    flat = "".join(ch for ch in result.output if ch.isalnum() or ch in "-_")
    for name, info in LearnerSettings.model_fields.items():
        assert info.description, name
        assert "--" + name.replace("_", "-") in flat and env_name(LearnerSettings, name) in flat
    bad = CliRunner().invoke(app, ["learner", "--max-staleness", "-1"])
    assert bad.exit_code == 2 and "--max-staleness" in bad.output
    with pytest.raises(ValueError, match="alpha_min"):
        LearnerSettings(ais_alpha_min=0.8, ais_alpha_max=0.2)
