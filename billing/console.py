"""The web console's sessions: opened by signing in with the admin token or an API key, held by the browser as a
random token in a cookie (only its SHA-256 digest is stored), ended by signing out, by expiring, by the admin
token changing (an admin session) or by its key being revoked (a customer session).

Sign-in attempts are limited per client in PostgreSQL (`meterline_signin_attempt`): an attempt is counted before
it is checked, only while the client is under the limit, and a successful sign-in clears the count.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from billing.db import Executor


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True, slots=True)
class Session:
    kind: str  # admin | customer
    csrf: str
    key_id: str | None = None  # a customer session's key
    account_id: str | None = None  # and its account

    @property
    def admin(self) -> bool:
        return self.kind == "admin"


async def signin_allowed(conn: Executor, client: str, *, limit: int, window_seconds: int) -> bool:
    """Count one sign-in attempt of `client`; False (and not counted) once it has `limit` in this window."""
    return bool(await conn.fetchval("SELECT meterline_signin_attempt($1, $2, $3)", client, limit, window_seconds))


async def signed_in(conn: Executor, client: str) -> None:
    """A sign-in succeeded: the client's failures are forgotten."""
    await conn.execute("DELETE FROM console_signin_attempts WHERE client = $1", client)


async def open_session(conn: Executor, *, kind: str, lifetime_seconds: float, admin_token: str | None = None,
                       key_id: str | None = None, account_id: str | None = None) -> tuple[str, Session]:
    """Open a session; returns the cookie's token (never stored) and the session."""
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO console_sessions (digest, kind, token_digest, key_id, account_id, csrf, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, now() + $7 * interval '1 second')",
        digest(token), kind, digest(admin_token) if admin_token is not None else None, key_id, account_id, csrf,
        lifetime_seconds)
    return token, Session(kind, csrf, key_id, account_id)


async def find_session(conn: Executor, token: str, *, admin_token: str | None) -> Session | None:
    """The live session this cookie token opened, or None: unknown, expired, opened with another admin token than
    the one configured now, or of a revoked key."""
    row = await conn.fetchrow(
        """SELECT s.kind, s.csrf, s.key_id, s.account_id, s.token_digest
             FROM console_sessions s LEFT JOIN api_keys k ON k.id = s.key_id
            WHERE s.digest = $1 AND s.expires_at > now() AND (s.kind = 'admin' OR k.revoked_at IS NULL)""",
        digest(token))
    if row is None:
        return None
    if row["kind"] == "admin" and (admin_token is None or bytes(row["token_digest"]) != digest(admin_token)):
        return None
    return Session(row["kind"], row["csrf"], row["key_id"], row["account_id"])


async def close_session(conn: Executor, token: str) -> None:
    await conn.execute("DELETE FROM console_sessions WHERE digest = $1", digest(token))


async def purge_sessions(conn: Executor) -> int:
    """Delete expired sessions; returns how many."""
    return int(await conn.fetchval(
        "WITH gone AS (DELETE FROM console_sessions WHERE expires_at <= now() RETURNING 1) SELECT count(*) FROM gone"))
