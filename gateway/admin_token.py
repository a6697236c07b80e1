"""The admin token a fresh installation makes for itself (README, "First steps").

A configured `admin_token` always wins. Without one, `meterline serve` uses the token stored in the data directory,
making it on first start: 256 random bits in `<data_dir>/admin-token`, created readable and writable by its owner
only (0600, with O_EXCL so two starts cannot both make one). Only the start that made it prints it, once;
`meterline admin-token` shows it again.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import SecretStr

from gateway.settings import Settings

FILE_NAME = "admin-token"


def token_path(settings: Settings) -> Path:
    return settings.data_dir / FILE_NAME


def stored(settings: Settings) -> str | None:
    path = token_path(settings)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return token or None


def ensure(settings: Settings) -> tuple[Settings, str | None]:
    """`settings` with the admin token in force, and the token if this call made it (to print once)."""
    configured = settings.admin_token
    if configured is not None and configured.get_secret_value():
        return settings, None
    token = stored(settings)
    made = None
    if token is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        made = secrets.token_urlsafe(32)
        try:
            fd = os.open(token_path(settings), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another start made it first: use that one
            made = None
            token = stored(settings)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(made + "\n")
            token = made
    if token is None:
        return settings, None
    return settings.model_copy(update={"admin_token": SecretStr(token)}), made


def announcement(token: str, settings: Settings, *, host: str, port: int) -> str:
    return (f"Admin token (made for this data directory, stored in {token_path(settings)}, readable by you only; "
            f"shown only now, `meterline admin-token` shows it again):\n\n    {token}\n\n"
            f"Use it as a bearer token on /admin and to sign in at http://{host}:{port}/console, e.g.\n"
            f"    curl -H 'Authorization: Bearer {token}' http://{host}:{port}/admin/accounts\n")
