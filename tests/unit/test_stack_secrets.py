"""Secrets stay out of ``stack.json``: a database password and the Prefect credential live in
``<home>/secrets`` (mode 600), and every command still reaches the stack with them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fabloop.infra import prefect_auth
from fabloop.infra.settings import StackEndpoints, StackSettings, prefect_env


def _endpoints(home: Path, database_url: str, auth: bool = False) -> StackEndpoints:
    return StackSettings(home=home, database_url=database_url, prefect_auth=auth).resolve()


def test_a_database_password_is_kept_in_secrets_and_read_back(tmp_path: Path) -> None:
    url = "postgresql+asyncpg://fab:s3cret-pw@db.example:5432/fabloop"
    _endpoints(tmp_path, url).save()
    assert "s3cret-pw" not in (tmp_path / "stack.json").read_text()
    kept = tmp_path / "secrets" / "database-url"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert StackEndpoints.load(tmp_path).database_url == url


def test_a_url_without_password_needs_no_secret_file(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fabloop.db'}"
    _endpoints(tmp_path, url).save()
    assert not (tmp_path / "secrets").exists()
    assert StackEndpoints.load(tmp_path).database_url == url


def test_a_missing_password_file_is_named(tmp_path: Path) -> None:
    _endpoints(tmp_path, "postgresql+asyncpg://fab:pw@db.example/fabloop").save()
    (tmp_path / "secrets" / "database-url").unlink()
    with pytest.raises(FileNotFoundError, match="secrets/database-url"):
        StackEndpoints.load(tmp_path)


def test_the_prefect_credential_is_generated_once_owner_only_and_given_to_clients(tmp_path: Path) -> None:
    ep = _endpoints(tmp_path, "sqlite+aiosqlite:///x.db", auth=True)
    first = prefect_auth.ensure_auth_string(tmp_path)
    assert prefect_auth.ensure_auth_string(tmp_path) == first
    assert first.startswith(f"{prefect_auth.USERNAME}:") and len(first) > 40
    assert stat.S_IMODE(prefect_auth.auth_file(tmp_path).stat().st_mode) == 0o600
    ep.save()
    assert first not in (tmp_path / "stack.json").read_text()
    assert prefect_env(StackEndpoints.load(tmp_path))[prefect_auth.CLIENT_VAR] == first


def test_without_auth_only_the_operators_own_credential_is_passed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ep = _endpoints(tmp_path, "sqlite+aiosqlite:///x.db")
    monkeypatch.delenv(prefect_auth.CLIENT_VAR, raising=False)
    assert prefect_auth.CLIENT_VAR not in prefect_env(ep)
    monkeypatch.setenv(prefect_auth.CLIENT_VAR, "ops:external")
    assert prefect_env(ep)[prefect_auth.CLIENT_VAR] == "ops:external"
