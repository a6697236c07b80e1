"""The `meterline` command: serve, migrate, verify, admin mirrors (accounts, keys, topup, grants, payments,
auto-topup), export, statement."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

import asyncpg

from billing import accounts, auto_topup, db, exports, grants, keys, ledger, payments, schema, statements
from billing.errors import BillingError
from billing.money import usd_to_micros
from billing.verify import verify
from gateway import admin_token, logs
from gateway.render import dumps
from gateway.settings import Settings, SettingsError, load_settings


def _database_url(settings: Settings) -> str:
    return settings.database_url or db.embedded_database_url(settings.data_dir)


async def _with_db(settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    conn = await db.connect(_database_url(settings))
    try:
        await schema.migrate(conn)
        return await work(conn)
    finally:
        await conn.close()


def _print(data: Any) -> None:
    print(json.dumps(json.loads(dumps(data)), indent=2))


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.app import serve

    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    settings, made = admin_token.ensure(settings)
    if made is not None:
        print(admin_token.announcement(made, settings, host=host, port=port), flush=True)
    if settings.database_url is None:
        settings = settings.model_copy(update={"database_url": _database_url(settings)})
    if args.workers == 1 and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from gateway import metrics

        metrics.fresh_directory()  # one process in multiprocess mode all the same: no earlier run's counts
    if args.workers > 1:
        from gateway import workers

        return workers.serve(settings.database_url, host=host, port=port, workers=args.workers)
    with address_in_use(host, port):
        serve(settings, host=host, port=port, print=lambda msg: print(msg, flush=True))
    return 0


class AddressInUse(Exception):
    """The port to listen on is taken; the message names it and what to do."""


@contextlib.contextmanager
def address_in_use(host: str, port: int) -> Iterator[None]:
    """Turn the bind failure of a taken port (another `meterline serve` or `demo`, say) into one plain line."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise AddressInUse(f"cannot listen on {host}:{port}: the address is already in use (another meterline "
                           "serve or demo?); choose another port with --port or METERLINE_PORT") from None


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from gateway import demo

    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    with address_in_use(host, port):
        return demo.run(settings, host=host, port=port)


def cmd_admin_token(settings: Settings, args: argparse.Namespace) -> int:
    """Print the admin token in force: the configured one, else the one stored in the data directory."""
    if settings.admin_token is not None and settings.admin_token.get_secret_value():
        print(settings.admin_token.get_secret_value())
        return 0
    token = admin_token.stored(settings)
    if token is None:
        print(f"meterline: no admin token is configured and none is stored in {admin_token.token_path(settings)}"
              " yet: `meterline serve` makes one on its first start", file=sys.stderr)
        return 1
    print(token)
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> tuple[list[int], list[int]]:
        conn = await db.connect(_database_url(settings))
        try:
            return await schema.migrate(conn), await schema.applied(conn)
        finally:
            await conn.close()

    now, recorded = asyncio.run(run())
    _print({"object": "migrations", "applied_now": now, "schema_version": max(recorded, default=0)})
    return 0


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    problems: list[str] = asyncio.run(
        _with_db(settings, lambda conn: verify(conn, stale_after_seconds=settings.sweep_interval_seconds * 3))
    )
    for problem in problems:
        print(f"VIOLATION {problem}", file=sys.stderr)
    if problems:
        return 1
    print("ledger verified: zero-sum, cached balances and holds match, no stale holds")
    return 0


def cmd_accounts_create(settings: Settings, args: argparse.Namespace) -> int:
    _print(asyncio.run(_with_db(settings, lambda conn: accounts.create_account(conn, name=args.name))))
    return 0


def cmd_keys_create(settings: Settings, args: argparse.Namespace) -> int:
    row, secret = asyncio.run(
        _with_db(settings, lambda conn: keys.create_key(conn, account_id=args.account, name=args.name,
                                                        detailed_logging=args.detailed_logging))
    )
    _print({**row, "key": secret})
    return 0


def cmd_keys_update(settings: Settings, args: argparse.Namespace) -> int:
    row = asyncio.run(_with_db(settings, lambda conn: keys.set_detailed_logging(
        conn, args.key, args.detailed_logging == "on")))
    _print(row)
    return 0


def cmd_topup(settings: Settings, args: argparse.Namespace) -> int:
    amount = usd_to_micros(args.amount_usd)
    if amount <= 0:
        raise BillingError("a top-up must be a positive amount")

    async def work(conn: asyncpg.Connection) -> Any:
        pool = await db.create_pool(_database_url(settings), min_size=1, max_size=1)
        try:
            return await ledger.post_once(
                pool,
                idempotency_key=args.idempotency_key,
                fingerprint=ledger.request_fingerprint("topup", args.account, amount, args.description),
                account_id=args.account,
                kind="topup",
                amount_micros=amount,
                description=args.description,
            )
        finally:
            await pool.close()

    result, replayed = asyncio.run(_with_db(settings, work))
    _print({"object": "topup", **result, "replayed": replayed})
    return 0


def cmd_payments(settings: Settings, args: argparse.Namespace) -> int:
    rows = asyncio.run(_with_db(settings, lambda conn: payments.list_payments(conn, args.account, limit=args.limit)))
    _print({"object": "list", "data": [{"object": "payment", **row} for row in rows]})
    return 0


def cmd_auto_topup(settings: Settings, args: argparse.Namespace) -> int:
    """Show an account's auto top-up rule, or write it (with --enabled, the amounts and optionally the card)."""
    if args.enabled is not None:
        if args.threshold_micros is None or args.amount_micros is None:
            raise BillingError("--enabled needs --threshold-micros and --amount-micros")
        auto_topup.check_rule(threshold_micros=args.threshold_micros, amount_micros=args.amount_micros,
                              min_usd=settings.stripe.min_amount_usd, max_usd=settings.stripe.max_amount_usd)

    async def work(conn: asyncpg.Connection) -> Any:
        if args.enabled is None:
            return await auto_topup.get_rule(conn, args.account)
        pool = await db.create_pool(_database_url(settings), min_size=1, max_size=1)
        try:
            return await auto_topup.set_rule(pool, args.account, enabled=args.enabled == "on",
                                             threshold_micros=args.threshold_micros,
                                             amount_micros=args.amount_micros, payment_method=args.payment_method)
        finally:
            await pool.close()

    row = asyncio.run(_with_db(settings, work))
    _print({"object": "auto_topup", "account_id": args.account, **(row or {"enabled": False})})
    return 0


def cmd_grants_create(settings: Settings, args: argparse.Namespace) -> int:
    """Grant credit under an idempotency key (the same checks and key space as the admin API)."""

    async def work(conn: asyncpg.Connection) -> Any:
        pool = await db.create_pool(_database_url(settings), min_size=1, max_size=1)
        try:
            return await grants.grant_once(
                pool, idempotency_key=args.idempotency_key, account_id=args.account, category=args.category,
                amount_micros=usd_to_micros(args.amount_usd), priority=args.priority,
                effective_at=args.effective_at, expires_at=args.expires_at, description=args.description)
        finally:
            await pool.close()

    result, replayed = asyncio.run(_with_db(settings, work))
    _print({**result, "replayed": replayed})
    return 0


def cmd_grants_list(settings: Settings, args: argparse.Namespace) -> int:
    rows = asyncio.run(_with_db(settings, lambda conn: grants.list_grants(conn, args.account, limit=args.limit)))
    _print({"object": "list", "data": rows})
    return 0


def _utc(text: str) -> datetime:
    """An ISO-8601 timestamp argument; one without a zone is UTC."""
    try:
        value = datetime.fromisoformat(text)
        return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not an ISO-8601 timestamp: {text!r}") from None


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    """Stream an export to a file batch by batch; a row counter on stderr only when stderr is a terminal."""
    exports.check(args.kind, args.format, args.start, args.end)
    progress = sys.stderr.isatty()

    async def work(conn: asyncpg.Connection, out: TextIO) -> int:
        rows = 0
        async for text, count in exports.export_chunks(
            conn, args.kind, fmt=args.format, start=args.start, end=args.end, account_id=args.account
        ):
            out.write(text)
            rows += count
            if progress:
                print(f"\r{args.kind}: {rows:,} rows", end="", file=sys.stderr, flush=True)
        return rows

    with open(args.output, "w", encoding="utf-8", newline="") as out:
        rows = asyncio.run(_with_db(settings, lambda conn: work(conn, out)))
    if progress:
        print(file=sys.stderr)
    _print({"object": "export", "kind": args.kind, "format": args.format, "rows": rows, "file": args.output})
    return 0


def cmd_statement(settings: Settings, args: argparse.Namespace) -> int:
    stmt = asyncio.run(_with_db(settings, lambda conn: statements.statement(
        conn, account_id=args.account, start=args.start, end=args.end)))
    if args.format == "csv":
        sys.stdout.write(statements.statement_csv(stmt))
    else:
        _print(statements.render_usd(stmt))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--workers", type=int, default=1,
                       help="processes sharing the port (SO_REUSEPORT); default 1")
    serve.set_defaults(func=cmd_serve)
    demo = sub.add_parser("demo", help="run the gateway offline on a simulated upstream, with a funded demo account")
    demo.add_argument("--host", default=None)
    demo.add_argument("--port", type=int, default=None)
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("admin-token", help="print the admin token (configured, or made by the first serve)"
                   ).set_defaults(func=cmd_admin_token)

    sub.add_parser("migrate", help="apply the pending numbered migrations (harmless to repeat)"
                   ).set_defaults(func=cmd_migrate)
    sub.add_parser("verify", help="check every ledger invariant").set_defaults(func=cmd_verify)

    acc = sub.add_parser("accounts", help="manage accounts").add_subparsers(dest="action", required=True)
    create = acc.add_parser("create", help="create a customer account")
    create.add_argument("--name", required=True)
    create.set_defaults(func=cmd_accounts_create)

    key = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    kc = key.add_parser("create", help="mint an API key (the secret is printed once)")
    kc.add_argument("--account", required=True)
    kc.add_argument("--name", default=None)
    kc.add_argument("--detailed-logging", action="store_true",
                    help="store the key's chats as conversations (conversation_id, memory)")
    kc.set_defaults(func=cmd_keys_create)
    ku = key.add_parser("update", help="change a key's settings")
    ku.add_argument("key", help="the key's id (key_...)")
    ku.add_argument("--detailed-logging", choices=("on", "off"), required=True,
                    help="store the key's chats as conversations (conversation_id, memory), or stop storing them")
    ku.set_defaults(func=cmd_keys_update)

    top = sub.add_parser("topup", help="credit an account")
    top.add_argument("--account", required=True)
    top.add_argument("--amount-usd", required=True)
    top.add_argument("--idempotency-key", required=True)
    top.add_argument("--description", default=None)
    top.set_defaults(func=cmd_topup)
    pay = sub.add_parser("payments", help="an account's Stripe payments, newest first")
    pay.add_argument("--account", required=True)
    pay.add_argument("--limit", type=int, default=20)
    pay.set_defaults(func=cmd_payments)
    auto = sub.add_parser("auto-topup", help="show an account's auto top-up rule, or set it with --enabled")
    auto.add_argument("--account", required=True)
    auto.add_argument("--enabled", choices=("on", "off"), default=None)
    auto.add_argument("--threshold-micros", type=int, default=None)
    auto.add_argument("--amount-micros", type=int, default=None)
    auto.add_argument("--payment-method", default=None, help="a Stripe PaymentMethod id (pm_...); omitted: kept")
    auto.set_defaults(func=cmd_auto_topup)

    grant = sub.add_parser("grants", help="an account's credit grants").add_subparsers(dest="action", required=True)
    gc = grant.add_parser("create", help="grant paid or promotional credit")
    gc.add_argument("--account", required=True)
    gc.add_argument("--amount-usd", required=True)
    gc.add_argument("--category", choices=grants.CATEGORIES, required=True)
    gc.add_argument("--priority", type=int, default=grants.DEFAULT_PRIORITY, help="0-100, lower spent first")
    gc.add_argument("--effective-at", type=_utc, default=None, help="ISO-8601 (default: now)")
    gc.add_argument("--expires-at", type=_utc, default=None, help="ISO-8601 (default: never)")
    gc.add_argument("--description", default=None)
    gc.add_argument("--idempotency-key", required=True)
    gc.set_defaults(func=cmd_grants_create)
    gl = grant.add_parser("list", help="an account's grants, newest first")
    gl.add_argument("--account", required=True)
    gl.add_argument("--limit", type=int, default=20)
    gl.set_defaults(func=cmd_grants_list)

    exp = sub.add_parser("export", help="export the ledger or request records (streamed, constant memory)")
    exp.add_argument("kind", choices=exports.KINDS)
    exp.add_argument("--from", dest="start", type=_utc, required=True, help="ISO-8601, inclusive")
    exp.add_argument("--to", dest="end", type=_utc, required=True, help="ISO-8601, exclusive")
    exp.add_argument("--format", choices=exports.FORMATS, default="csv")
    exp.add_argument("--account", default=None)
    exp.add_argument("-o", "--output", required=True, help="file to write")
    exp.set_defaults(func=cmd_export)

    st = sub.add_parser("statement", help="an account statement for [from, to)")
    st.add_argument("--account", required=True)
    st.add_argument("--from", dest="start", type=_utc, required=True)
    st.add_argument("--to", dest="end", type=_utc, required=True)
    st.add_argument("--format", choices=("json", "csv"), default="json")
    st.set_defaults(func=cmd_statement)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        logs.configure(settings.log_format)
        status: int = args.func(settings, args)
    except SettingsError as exc:
        print(f"meterline: {exc}", file=sys.stderr)
        return 2
    except (BillingError, AddressInUse) as exc:
        print(f"meterline: {exc}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
