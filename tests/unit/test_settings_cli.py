"""CLI options are derived from the settings classes; environment and flags feed the same fields."""

from __future__ import annotations

from typer.testing import CliRunner

from aisrl.cli import app
from aisrl.core.types import CorrectionConfig
from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.services.learner.config import CORRECTION_SETTINGS, LearnerSettings
from aisrl.settings import env_name, load_settings


def test_every_setting_is_a_documented_cli_option():
    result = CliRunner().invoke(app, ["diagnostics", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    flat = "".join(ch for ch in result.output if ch.isalnum() or ch in "-_")  # help text wraps and boxes lines
    for name, info in DiagnosticsSettings.model_fields.items():
        assert info.description, f"{name} has no description"
        assert "--" + name.replace("_", "-") in flat
        assert env_name(DiagnosticsSettings, name) in flat


def test_env_prefix_and_shared_redis_url(monkeypatch):
    monkeypatch.setenv("AISRL_DIAG_HTTP_PORT", "9999")
    monkeypatch.setenv("AISRL_REDIS_URL", "redis://example:1/0")
    settings = load_settings(DiagnosticsSettings)
    assert settings.http_port == 9999 and settings.redis_url == "redis://example:1/0"
    assert load_settings(DiagnosticsSettings, {"http_port": 7000}).http_port == 7000


def test_invalid_option_is_a_usage_error_naming_it():
    result = CliRunner().invoke(app, ["diagnostics", "--http-port", "70000"])
    assert result.exit_code == 2
    assert "--http-port" in result.output


def test_top_level_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "diagnostics" in result.output and "demo" in result.output


def test_every_correction_field_is_a_learner_option_and_reaches_the_config(monkeypatch):
    """CORRECTION_SETTINGS maps every CorrectionConfig field to a learner setting with its CLI option and
    environment variable; values set there arrive in the config the core and the service see."""
    assert set(CORRECTION_SETTINGS) == set(CorrectionConfig.model_fields)
    result = CliRunner().invoke(app, ["learner", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    flat = "".join(ch for ch in result.output if ch.isalnum() or ch in "-_")
    for setting in CORRECTION_SETTINGS.values():
        assert "--" + setting.replace("_", "-") in flat and env_name(LearnerSettings, setting) in flat, setting
    monkeypatch.setenv("AISRL_LEARNER_CORRECTION_REJECT_RULE", "seq_max_k2")
    monkeypatch.setenv("AISRL_LEARNER_CORRECTION_REJECT_THRESHOLD", "2.5")
    monkeypatch.setenv("AISRL_LEARNER_CORRECTION_SELF_NORMALIZE", "true")
    config = load_settings(LearnerSettings, {"correction_mask_ratio_lo": 0.5, "correction_mask_ratio_hi": 5.0,
                                             "correction_m2po_threshold": 0.04}).correction_config()  # fmt: skip
    assert config == CorrectionConfig(reject_rule="seq_max_k2", reject_threshold=2.5, self_normalize=True,
                                      mask_ratio_lo=0.5, mask_ratio_hi=5.0, m2po_threshold=0.04)  # fmt: skip


def test_bad_correction_option_names_the_learner_setting():
    result = CliRunner().invoke(app, ["learner", "--correction-mask-ratio-lo", "2", "--correction-mask-ratio-hi", "1"],
                                env={"COLUMNS": "400"})  # fmt: skip
    assert result.exit_code == 2 and "correction_mask_ratio_hi: must be above mask_ratio_lo" in result.output
    result = CliRunner().invoke(app, ["learner", "--correction-reject-rule", "token_k3"], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "correction_reject_threshold: required when reject_rule is set" in result.output
