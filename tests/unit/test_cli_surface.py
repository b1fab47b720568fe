"""The command line as a user meets it: flag pairs, null for optional settings from every source, a config
file, stable help, -h/--version, and one-line errors with their fix for the common failures."""

from __future__ import annotations

import socket

import pytest
import typer
from typer.testing import CliRunner

from aisrl.cli import app
from aisrl.services.learner.config import LearnerSettings
from aisrl.services.rollout.config import RolloutSettings
from aisrl.settings import TYPER_STYLE, load_settings, settings_command

WIDE = {"COLUMNS": "200"}


def _capturing_app(settings_cls):
    """An app whose one command records the settings it would run with (the real option generation)."""
    seen = []
    probe = typer.Typer(**TYPER_STYLE)
    settings_command("run", settings_cls, seen.append).register(probe)

    @probe.callback()
    def _group() -> None:
        """Group, so that `run` is a sub-command as in `aisrl`."""

    return probe, seen


def test_boolean_settings_are_flag_pairs():
    probe, seen = _capturing_app(LearnerSettings)
    runner = CliRunner()
    assert runner.invoke(probe, ["run", "--no-resume", "--no-advantage-std-normalize"]).exit_code == 0
    assert runner.invoke(probe, ["run", "--resume", "--correction-self-normalize"]).exit_code == 0
    assert runner.invoke(probe, ["run"]).exit_code == 0
    assert (seen[0].resume, seen[0].advantage_std_normalize) == (False, False)
    assert (seen[1].resume, seen[1].correction_self_normalize) == (True, True)
    assert seen[2].resume is True  # a flag not given leaves the default alone
    up_help = runner.invoke(app, ["up", "--help"], env=WIDE).output
    assert "--baseline-eval / --no-baseline-eval" in up_help


@pytest.mark.parametrize("word", ["null", "none", "None", "NULL", ""])
def test_null_unsets_an_optional_setting_from_the_command_line_env_and_file(word, monkeypatch, tmp_path):
    probe, seen = _capturing_app(LearnerSettings)
    result = CliRunner().invoke(probe, ["run", "--correction-cap", word])
    assert result.exit_code == 0, result.output
    assert seen[-1].correction_cap is None
    monkeypatch.setenv("AISRL_LEARNER_CORRECTION_CAP", word)
    assert load_settings(LearnerSettings).correction_cap is None
    monkeypatch.delenv("AISRL_LEARNER_CORRECTION_CAP")
    config = tmp_path / "learner.yaml"
    config.write_text(f"correction_cap: {word or 'null'}\nlr: 3.0e-4\n")
    from_file = load_settings(LearnerSettings, config=config)
    assert from_file.correction_cap is None and from_file.lr == 3e-4


def test_null_is_refused_where_a_setting_is_not_optional():
    probe, _ = _capturing_app(LearnerSettings)
    result = CliRunner().invoke(probe, ["run", "--lr", "null"], env=WIDE)
    assert result.exit_code == 2 and "--lr" in result.output


def test_config_file_is_overridden_by_env_then_options(monkeypatch, tmp_path):
    config = tmp_path / "learner.yaml"
    config.write_text("lr: 1.0e-3\nbatch_size: 4\nresume: false\n")
    probe, seen = _capturing_app(LearnerSettings)
    monkeypatch.setenv("AISRL_LEARNER_BATCH_SIZE", "6")
    result = CliRunner().invoke(probe, ["run", "--config", str(config), "--lr", "2e-3"])
    assert result.exit_code == 0, result.output
    assert (seen[0].lr, seen[0].batch_size, seen[0].resume) == (2e-3, 6, False)
    config.write_text("lrr: 1.0e-3\n")
    result = CliRunner().invoke(probe, ["run", "--config", str(config)], env=WIDE)
    assert result.exit_code == 2 and "lrr" in result.output and str(config) in result.output
    missing = CliRunner().invoke(probe, ["run", "--config", str(tmp_path / "nope.yaml")], env=WIDE)
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_model_init_reads_its_config_file(tmp_path):
    from aisrl.models.config import WarmStartSettings

    config = tmp_path / "model.yaml"
    config.write_text("steps: 3\ntask: sudoku\n")
    probe, seen = _capturing_app(WarmStartSettings)
    result = CliRunner().invoke(probe, ["run", "--config", str(config), "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert (seen[0].steps, seen[0].task) == (5, "sudoku")


@pytest.mark.parametrize("command", ["diagnostics", "learner", "rollout", "up", "model init"])
def test_every_service_takes_a_config_file(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"], env=WIDE)
    assert result.exit_code == 0 and "--config FILE" in result.output


def test_bad_environment_variable_is_reported_under_its_own_name(monkeypatch):
    monkeypatch.setenv("AISRL_LEARNER_LR", "fast")
    probe, _ = _capturing_app(LearnerSettings)
    result = CliRunner().invoke(probe, ["run"], env=WIDE)
    assert result.exit_code == 2
    assert "environment variable AISRL_LEARNER_LR" in result.output and "--lr" not in result.output


def test_help_is_stable_and_plain():
    """No time- or host-based default (worker id, run id), no `<bool>` placeholder, the kv-cache default right."""
    runner = CliRunner()
    first = runner.invoke(app, ["rollout", "--help"], env=WIDE).output
    assert first == runner.invoke(app, ["rollout", "--help"], env=WIDE).output
    assert socket.gethostname() not in first and "<bool>" not in first
    assert "hostname-pid-random" in first
    flat = " ".join(first.split())
    assert "(null: vLLM's default share of device memory)" in flat and "AISRL_ROLLOUT_KV_CACHE_GB; default: 1.0" in flat
    up = runner.invoke(app, ["up", "--help"], env=WIDE).output
    assert up == runner.invoke(app, ["up", "--help"], env=WIDE).output and "<bool>" not in up
    assert RolloutSettings.model_fields["kv_cache_gb"].default == 1.0


def test_short_help_and_version():
    runner = CliRunner()
    assert runner.invoke(app, ["-h"]).exit_code == 0
    short = runner.invoke(app, ["learner", "-h"], env=WIDE)
    assert short.exit_code == 0 and "--correction-cap" in short.output
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("aisrl ")


def test_port_in_use_is_one_line_with_the_fix(redis_url):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for option in ("--http-port", "--grpc-port"):
            other = "--grpc-port" if option == "--http-port" else "--http-port"
            result = CliRunner().invoke(
                app, ["diagnostics", "--redis-url", redis_url, option, str(port), other, "0"], env=WIDE
            )
            assert result.exit_code == 1, result.output
            line = result.output.strip().splitlines()[-1]
            assert line.startswith("error: port already in use") and f"{option} {port}" in line, line
            assert "Traceback" not in result.output


def test_missing_model_and_unreachable_redis_are_one_line(tmp_path):
    missing = tmp_path / "no-model"
    result = CliRunner().invoke(app, ["rollout", "--model-path", str(missing)], env=WIDE)
    assert result.exit_code == 1 and "aisrl model init --out" in result.output, result.output
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]  # bound, never listening: connections are refused
        result = CliRunner().invoke(
            app,
            ["learner", "--redis-url", f"redis://127.0.0.1:{dead}/0", "--work-dir", str(tmp_path / "learner"),
             "--http-port", "0", "--grpc-port", "0", "--max-steps", "1"],
        )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "cannot reach Redis" in result.output and "--redis-url" in result.output
