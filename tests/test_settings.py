"""Settings come from TOML, environment variables override them, and a bad one fails naming itself."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_file_declares_openrouter_and_leaves_media_to_the_operator(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERLINE_CONFIG", raising=False)
    monkeypatch.delenv("METERLINE_DATABASE_URL", raising=False)
    settings = load_settings(config=ROOT / "config" / "meterline.toml")
    assert settings.upstreams["openrouter"].api_key_env == "OPENROUTER_API_KEY"
    assert "media" not in settings.upstreams  # no unusable default address
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
    monkeypatch.setenv(f"METERLINE_UPSTREAMS__{upstream}__BASE_URL", "https://upstream.example/v1")
    monkeypatch.setenv(f"METERLINE_UPSTREAMS__{upstream}__API_KEY_ENV", f"{upstream}_API_KEY")
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


async def test_start_names_each_upstream_without_a_key_and_an_unconfigured_media_upstream_is_a_clear_503(
        aiohttp_client: Any, settings: Settings, pool: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.app import create_app
    from tests.factories import make_customer

    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    caplog.set_level(logging.WARNING)
    assert "media" not in settings.upstreams  # no unusable default address
    client = await aiohttp_client(create_app(settings))
    assert "upstream 'openrouter' has no API key: set the environment variable OPENROUTER_API_KEY" in caplog.text
    assert "upstream 'media' is not configured" in caplog.text
    _, secret = await make_customer(pool, balance_micros=1_000_000)
    resp = await client.post("/v1/images/generations", headers={"Authorization": f"Bearer {secret}"},
                             json={"model": "gemini-3-pro-image", "prompt": "a lighthouse"})
    body = await resp.json()
    assert (resp.status, body["error"]["code"]) == (503, "UPSTREAM_NOT_CONFIGURED")
    assert "[upstreams.media] base_url" in body["error"]["message"]
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0
