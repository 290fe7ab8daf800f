"""Configuration layering: defaults < YAML file < MESHGUARD_* environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from webhook import config


def test_defaults() -> None:
    s = config.load()
    assert (s.server.port, s.server.health_port, s.server.max_body_bytes) == (8443, 8080, 7 * 1024 * 1024)
    assert s.tls.min_version == "1.2" and s.failure.mutate == "deny" and s.failure.validate_ == "allow"


def test_precedence_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("server: {port: 9000, health_port: 9001, host: 10.0.0.1}\nfailure: {validate: deny}\n")
    monkeypatch.setenv("MESHGUARD_SERVER__PORT", "9100")
    monkeypatch.setenv("MESHGUARD_LOG_LEVEL", "debug")
    s = config.load(file, {"server": {"host": "127.0.0.1", "port": None}})
    assert s.server.port == 9100          # env beats file
    assert s.server.health_port == 9001   # file beats default
    assert s.server.host == "127.0.0.1"   # flag beats file
    assert s.failure.validate_ == "deny" and s.log_level == "debug"
    assert config.load(file, {"server": {"port": 9200}}).server.port == 9200  # flag beats env


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("server: {bogus: 1}", "server.bogus: Extra inputs are not permitted"),
        ("server: {port: 70000}", "server.port"),
        ("tls: {min_version: '1.1'}", "tls.min_version"),
        ("- a list", "must hold a mapping"),
        ("server: [unclosed", "not valid YAML"),
    ],
)
def test_invalid_file_is_a_clear_error(tmp_path: Path, text: str, fragment: str) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load(file)
    assert fragment in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.load(tmp_path / "nope.yaml")


def test_cli_reports_config_errors_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from webhook.cli import main

    file = tmp_path / "c.yaml"
    file.write_text("server: {port: nope}")
    assert main(["serve", "--config", str(file)]) == 2
    assert "server.port" in capsys.readouterr().err
