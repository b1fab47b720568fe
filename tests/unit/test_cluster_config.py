"""Cluster settings: YAML + environment + overrides, and the checks on every service section."""

from __future__ import annotations

from pathlib import Path

import pytest

from aisrl.cluster.cli import DEFAULT_CONFIG
from aisrl.cluster.config import SERVICE_SETTINGS, ClusterSettings, SettingsError, load_cluster_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


def test_shipped_default_config_loads_and_is_valid():
    settings = load_cluster_settings(DEFAULT_CONFIG)
    assert settings.replicas == 2 and settings.task == "countdown"
    assert settings.services.rollout["engine"] == "vllm" and settings.services.rollout["precision"] == "fp8"
    assert settings.services.learner["correction_mode"] == "ais"
    assert settings.resolved_model_dir == Path("runs/models/countdown-tiny")


def test_yaml_then_environment_then_overrides(tmp_path, monkeypatch):
    path = write(tmp_path, "steps: 5\nreplicas: 3\nservices:\n  learner:\n    lr: 0.001\n    eval_every: 2\n")
    assert load_cluster_settings(path).steps == 5
    monkeypatch.setenv("AISRL_UP_STEPS", "7")
    monkeypatch.setenv("AISRL_UP_SERVICES__LEARNER__LR", "0.002")
    settings = load_cluster_settings(path, {"replicas": 1, "run_id": None})
    assert settings.steps == 7  # environment beats the file
    assert settings.replicas == 1  # the command line beats both
    assert settings.services.learner == {"lr": "0.002", "eval_every": 2}  # sections merge key by key
    assert settings.run_id.startswith("run-")  # None on the command line: not given


def test_bad_service_key_names_it_and_suggests(tmp_path):
    path = write(tmp_path, "services:\n  learner:\n    lrr: 0.1\n")
    with pytest.raises(
        SettingsError, match=r"services\.learner\.lrr: not a setting of LearnerSettings; did you mean lr\?"
    ):
        load_cluster_settings(path)


def test_bad_service_value_names_the_key(tmp_path):
    path = write(tmp_path, "services:\n  rollout:\n    batch_size: 0\n")
    with pytest.raises(SettingsError, match=r"services\.rollout\.batch_size"):
        load_cluster_settings(path)
    with pytest.raises(SettingsError, match=r"services\.rollout\.precision"):
        load_cluster_settings(write(tmp_path, "services:\n  rollout:\n    precision: fp4\n"))


def test_managed_keys_are_refused_with_a_pointer(tmp_path):
    path = write(tmp_path, "services:\n  learner:\n    http_port: 9000\n")
    with pytest.raises(
        SettingsError, match=r"services\.learner\.http_port: set by the cluster \(use ports\.learner_http"
    ):
        load_cluster_settings(path)
    with pytest.raises(SettingsError, match=r"model_init\.out: set by the cluster"):
        load_cluster_settings(write(tmp_path, "model_init:\n  out: x\n"))


def test_unknown_service_and_unknown_top_level_key(tmp_path):
    with pytest.raises(SettingsError, match=r"services\.learnr"):
        load_cluster_settings(write(tmp_path, "services:\n  learnr: {}\n"))
    with pytest.raises(SettingsError, match=r"stepz: not a cluster setting; did you mean steps\?"):
        load_cluster_settings(write(tmp_path, "stepz: 3\n"))
    with pytest.raises(SettingsError, match=r"threads\.learnr: not a service"):
        load_cluster_settings(write(tmp_path, "threads: {learnr: 1}\n"))


def test_null_reaches_the_service_and_bad_files(tmp_path):
    """`correction_cap: null` (no cap) is passed to the learner as AISRL_LEARNER_CORRECTION_CAP=null, which the
    learner reads back as None."""
    from aisrl.cluster.topology import settings_env
    from aisrl.services.learner.config import LearnerSettings
    from aisrl.settings import load_settings

    settings = load_cluster_settings(write(tmp_path, "services:\n  learner:\n    correction_cap: null\n"))
    assert settings.services.learner == {"correction_cap": None}
    env = settings_env(LearnerSettings, settings.services.learner)
    assert env == {"AISRL_LEARNER_CORRECTION_CAP": "null"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AISRL_LEARNER_CORRECTION_CAP", env["AISRL_LEARNER_CORRECTION_CAP"])
        assert load_settings(LearnerSettings).correction_cap is None
    with pytest.raises(SettingsError, match="no such file"):
        load_cluster_settings(tmp_path / "missing.yaml")
    with pytest.raises(SettingsError, match="expected a mapping"):
        load_cluster_settings(write(tmp_path, "- 1\n- 2\n"))


def test_every_managed_field_is_a_real_field():
    from aisrl.cluster.config import MANAGED_FIELDS

    for service, managed in MANAGED_FIELDS.items():
        assert set(managed) <= set(SERVICE_SETTINGS[service].model_fields), service


def test_defaults_without_a_file():
    settings = ClusterSettings()
    assert settings.run_dir == Path("runs") / settings.run_id
    assert settings.resolved_redis_dir == settings.run_dir / "redis"


def test_up_options_are_derived_and_a_bad_config_is_a_usage_error(tmp_path):
    from typer.testing import CliRunner

    from aisrl.cli import app

    wide = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}
    result = CliRunner().invoke(app, ["up", "--help"], env=wide)
    assert result.exit_code == 0, result.output
    flat = "".join(ch for ch in result.output if ch.isalnum() or ch in "-_")
    for option in ("--config", "--steps", "--replicas", "--run-id", "--model-dir", "AISRL_UP_STEPS"):
        assert option in flat
    assert "--services" not in flat  # sections come from the file or AISRL_UP_SECTION__KEY
    bad = write(tmp_path, "services:\n  rollout:\n    engin: vllm\n")
    result = CliRunner().invoke(app, ["up", "--config", str(bad)], env=wide)
    assert result.exit_code == 2 and "services.rollout.engin" in result.output
    result = CliRunner().invoke(app, ["demo", "--help"], env=wide)
    assert result.exit_code == 0 and "--diagnostics-only" in result.output


def test_learner_section_takes_every_correction_option(tmp_path):
    """The commented correction options of the shipped cluster.yaml are real settings with valid values."""
    shipped = DEFAULT_CONFIG.read_text()
    options = [line.strip().lstrip("# ").split("#")[0].strip() for line in shipped.splitlines()
               if line.strip().startswith("# correction_")]  # fmt: skip
    assert len(options) == 6, options
    path = write(tmp_path, "services:\n  learner:\n" + "".join(f"    {o}\n" for o in options))
    learner = load_cluster_settings(path).services.learner
    config = SERVICE_SETTINGS["learner"](**learner).correction_config()
    assert config.mask_ratio_lo == 0.5 and config.reject_rule == "seq_mean_k3" and config.self_normalize
    bad = write(tmp_path, "services:\n  learner:\n    correction_reject_threshold: -1\n")
    with pytest.raises(SettingsError, match=r"services\.learner\.correction_reject_threshold"):
        load_cluster_settings(bad)
