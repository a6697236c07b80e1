"""Settings come from TOML, environment variables override them, and a bad one fails naming itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_file_declares_both_upstreams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERLINE_CONFIG", raising=False)
    monkeypatch.delenv("METERLINE_DATABASE_URL", raising=False)
    settings = load_settings(config=ROOT / "config" / "meterline.toml")
    assert settings.upstreams["openrouter"].api_key_env == "OPENROUTER_API_KEY"
    assert settings.upstreams["media"].api_key_env == "MEDIA_API_KEY"
    assert settings.database_url is None


def test_nested_environment_variables_override_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_UPSTREAMS__OPENROUTER__BASE_URL", "http://127.0.0.1:9/api/v1/")
    monkeypatch.setenv("METERLINE_PORT", "9999")
    settings = load_settings(config=ROOT / "config" / "meterline.toml")
    assert settings.upstreams["openrouter"].base_url == "http://127.0.0.1:9/api/v1"
    assert settings.upstreams["openrouter"].api_key_env == "OPENROUTER_API_KEY"  # the rest of the table stays
    assert settings.port == 9999


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("METERLINE_PORT", "eighty", "port"),
        ("METERLINE_DATABASE_URL", "mysql://x", "database_url"),
        ("METERLINE_UPSTREAMS__OPENROUTER__BASE_URL", "ftp://x", "upstreams.openrouter.base_url"),
        ("METERLINE_HOLD_TTL_SECONDS", "-1", "hold_ttl_seconds"),
        ("METERLINE_NO_SUCH_SETTING", "1", None),
    ],
)
def test_a_bad_setting_fails_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str | None
) -> None:
    monkeypatch.setenv(variable, value)
    if named is None:  # unknown METERLINE_* variables are ignored by the environment source, like any other
        load_settings(config=ROOT / "config" / "meterline.toml")
        return
    with pytest.raises(SettingsError, match=f"invalid setting {named}:"):
        load_settings(config=ROOT / "config" / "meterline.toml")


@pytest.mark.parametrize("upstream", ["OPENROUTER", "MEDIA"])
def test_holds_must_outlast_every_upstreams_timeout(monkeypatch: pytest.MonkeyPatch, upstream: str) -> None:
    monkeypatch.setenv(f"METERLINE_UPSTREAMS__{upstream}__TIMEOUT_SECONDS", "2000")
    with pytest.raises(SettingsError, match=rf"hold_ttl_seconds \(900\) must exceed the slowest upstream's "
                                            rf"timeout_seconds \({upstream.lower()}\) plus drain_seconds \(2030\)"):
        load_settings(config=ROOT / "config" / "meterline.toml")
    monkeypatch.setenv("METERLINE_HOLD_TTL_SECONDS", "2100")
    assert load_settings(config=ROOT / "config" / "meterline.toml").hold_ttl_seconds == 2100


def test_unknown_keys_in_the_file_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    config.write_text('port = 8080\nsweep_intervall_seconds = 3\n')
    with pytest.raises(SettingsError, match="invalid setting sweep_intervall_seconds"):
        load_settings(config=config)


def test_meterline_config_must_name_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("METERLINE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(SettingsError, match="METERLINE_CONFIG"):
        load_settings()


def test_malformed_toml_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    config.write_text("port = = 1\n")
    with pytest.raises(SettingsError, match="cannot read settings file"):
        load_settings(config=config)
