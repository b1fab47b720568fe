"""CLI options are derived from the settings classes; environment and flags feed the same fields."""

from __future__ import annotations

from typer.testing import CliRunner

from aisrl.cli import app
from aisrl.services.diagnostics.config import DiagnosticsSettings
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
