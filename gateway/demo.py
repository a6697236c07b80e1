"""`meterline demo`: the whole gateway offline with nothing configured, on an embedded PostgreSQL of its own and the
built-in simulated upstream (gateway.simulator), with a funded demo account whose key and ready calls it prints.

The demo keeps everything in `<data_dir>/demo`: its PostgreSQL, its admin token and `demo-account.json` (the demo
account's id and key, readable by the owner only). The API shows a key's secret once, so the demo keeps its own
copy there and prints it again on every start; a second start finds the account, the key and the one top-up it
already made (the top-up is posted under an idempotency key, so it is never made twice), and a key that was revoked
or lost is replaced. A configured `database_url` is not used: demo accounts never land in a real database.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from billing import accounts, db, keys, ledger, schema
from billing.catalog_config import ImageModelConfig, VideoModelConfig
from billing.errors import AccountNotFound
from billing.keys import KeyStore
from billing.money import format_usd
from gateway import admin_token, simulator
from gateway.settings import Settings, SettingsError

DEMO_DIR = "demo"
STATE_FILE = "demo-account.json"
ACCOUNT_NAME = "Demo"
STARTING_BALANCE_MICROS = 1_000_000  # $1.00: ample for chat, and a 12-second video ($1.20) is a 402
UPSTREAM = "simulator"
# The variable the simulator's upstream key is read from, as any upstream's is (set by the demo, for itself).
SIMULATOR_KEY_ENV = "METERLINE_SIMULATOR_API_KEY"
EXAMPLE_MESSAGE = "Say hello"

# The demo's media models, priced by the gateway as configured models are (the chat model's prices come from the
# simulator's `GET /models`, as a text upstream's catalog does).
DEMO_MODELS: dict[str, ImageModelConfig | VideoModelConfig] = {
    simulator.IMAGE_MODEL: ImageModelConfig(
        modality="image", upstream=UPSTREAM, display_name="Simulated image (Meterline simulator)",
        per_image_micros=40_000, sizes=["1024x1024", "1536x1024", "1024x1536"], prices={"1536x1024": 60_000,
                                                                                        "1024x1536": 60_000},
        default_size="1024x1024"),
    simulator.VIDEO_MODEL: VideoModelConfig(
        modality="video", upstream=UPSTREAM, display_name="Simulated video (Meterline simulator)",
        per_second_micros=100_000, sizes=["1280x720", "720x1280"], seconds=[4, 8, 12], default_size="1280x720",
        default_seconds=4),
}


def demo_dir(settings: Settings) -> Path:
    return settings.data_dir / DEMO_DIR


def demo_settings(settings: Settings, *, simulator_url: str) -> Settings:
    """`settings` made the demo's: its own data directory and embedded database, the simulator as the only upstream
    (text and media), the remote catalog read from it at no markup, and video jobs polled every second."""
    update: dict[str, Any] = {
        "data_dir": demo_dir(settings),
        "database_url": None,
        "upstreams": {UPSTREAM: {"base_url": simulator_url, "api_key_env": SIMULATOR_KEY_ENV,
                                 "connect_timeout_seconds": 5, "timeout_seconds": 60}},
        "text_upstream": UPSTREAM,
        "remote_catalog": True,
        "markup": 0,
        "models": {model_id: config.model_dump() for model_id, config in DEMO_MODELS.items()},
        "video_poll_seconds": 1,
    }
    try:
        return _Given(**{**settings.model_dump(), **update})
    except ValueError as exc:
        raise SettingsError(f"the demo cannot run with these settings: {exc}") from None


class _Given(Settings):
    """Settings validated from the values given alone. The environment and the settings file already spoke in the
    settings the demo starts from; read again, they would merge into the demo's own (an upstream's variables into
    its upstreams, say)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


@dataclass(frozen=True, slots=True)
class DemoAccount:
    account_id: str
    key_id: str
    key: str
    available_micros: int


def _read_state(path: Path) -> dict[str, str] | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    wanted = ("account_id", "key_id", "key")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), str) for k in wanted):
        return None
    return {k: state[k] for k in wanted}


def _write_state(path: Path, state: dict[str, str]) -> None:
    """Write the state readable by its owner only (it holds a key's secret), replacing any earlier file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(state, out)
    partial.replace(path)


async def ensure_account(pool: asyncpg.Pool, state_path: Path) -> DemoAccount:
    """The demo account and its key, made on the first start and found again on every later one; funded once."""
    state = _read_state(state_path)
    account_id = state["account_id"] if state else None
    if account_id is not None:
        try:
            await accounts.get_account(pool, account_id)
        except AccountNotFound:  # the database was made afresh: the file speaks of an account it never had
            account_id, state = None, None
    if account_id is None:
        named = [a for a in await accounts.search_accounts(pool, ACCOUNT_NAME, limit=100)
                 if a["name"] == ACCOUNT_NAME]
        account_id = str(named[0]["id"] if named else (await accounts.create_account(pool, name=ACCOUNT_NAME))["id"])
    live = None
    if state is not None:
        live = await KeyStore(pool, ttl_seconds=0).authenticate(state["key"])
    if live is None or live.account_id != account_id or state is None:
        row, secret = await keys.create_key(pool, account_id=account_id, name="demo")
        state = {"account_id": account_id, "key_id": str(row["id"]), "key": secret}
        _write_state(state_path, state)
    await ledger.post_once(
        pool, idempotency_key=f"demo-starting-balance-{account_id}",
        fingerprint=ledger.request_fingerprint("demo topup", account_id, STARTING_BALANCE_MICROS),
        account_id=account_id, kind="topup", amount_micros=STARTING_BALANCE_MICROS,
        description="the demo's starting balance")
    return DemoAccount(account_id, state["key_id"], state["key"], await ledger.available_micros(pool, account_id))


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data)


def _curl(url: str, key: str, body: dict[str, Any] | None = None) -> str:
    """A curl command line, wrapped with backslashes, that a shell runs as it is printed."""
    line = f"curl -sS -w '\\n' {shlex.quote(url)} -H {shlex.quote('Authorization: Bearer ' + key)}"
    if body is None:
        return line
    return f"{line} \\\n     -H 'Content-Type: application/json' -d {shlex.quote(_json(body))}"


def instructions(account: DemoAccount, *, base_url: str, data_dir: Path, token: str | None,
                 database_configured: bool) -> str:
    """What the demo prints once it is serving: where things are, and the calls to try, ready to paste."""
    v1 = f"{base_url}/v1"
    chat = {"model": simulator.CHAT_MODEL, "messages": [{"role": "user", "content": EXAMPLE_MESSAGE}]}
    video = {"model": simulator.VIDEO_MODEL, "prompt": "a lighthouse at dusk", "seconds": "12"}
    # The CLI reaches the demo's database through its data directory (a configured database_url would win).
    on_demo = ("METERLINE_DATABASE_URL= " if database_configured else "") + \
        f"METERLINE_DATA_DIR={shlex.quote(str(data_dir))}"
    sdk = "\n".join([
        "python - <<'EOF'",
        "from openai import OpenAI",
        f"client = OpenAI(base_url={v1!r}, api_key={account.key!r})",
        f"answer = client.chat.completions.create(model={simulator.CHAT_MODEL!r},",
        f"                                        messages=[{{'role': 'user', 'content': {EXAMPLE_MESSAGE!r}}}])",
        "print(answer.choices[0].message.content)",
        "print(answer.usage)",
        "EOF",
    ])
    lines = [
        "",
        "Meterline demo: every answer comes from the built-in SIMULATED upstream (no model is called, nothing",
        "leaves this machine); the accounts, holds, charges and ledger are Meterline's own, in PostgreSQL.",
        "",
        f"  gateway   {base_url}   (console: {base_url}/console"
        + (f", admin token {token})" if token else ", with the configured admin token)"),
        f"  data      {data_dir}   (its own embedded PostgreSQL, apart from any other data directory)",
        f"  account   {account.account_id}   available {format_usd(account.available_micros)} USD"
        f" ({account.available_micros} micros)",
        f"  API key   {account.key}",
        "",
        "A billed chat call (its usage carries cost_micros, the exact charge; X-Cost-Micros says it too):",
        "",
        _curl(f"{v1}/chat/completions", account.key, chat),
        "",
        "The same with the OpenAI SDK (pip install openai):",
        "",
        sdk,
        "",
        "What that call holds before it runs, itemised, without making it (dryRun):",
        "",
        _curl(f"{v1}/chat/completions?dryRun=true", account.key, chat),
        "",
        "A 402: a 12-second video costs $1.20, more than the demo's starting balance of $1.00, so nothing is held",
        "and nothing reaches the upstream:",
        "",
        _curl(f"{v1}/videos", account.key, video),
        "",
        "The balance, the request log, and the ledger checked (every invariant, exit status 0 when it holds):",
        "",
        _curl(f"{v1}/balance", account.key),
        _curl(f"{v1}/requests", account.key),
        f"{on_demo} meterline verify",
        "",
        "More balance, when it runs out (the demo funds its account once, on its first start):",
        "",
        f"{on_demo} meterline topup --account {account.account_id} --amount-usd 1 "
        "--idempotency-key demo-topup-$(date +%s)",
        "",
        f"Models: {simulator.CHAT_MODEL} ($3 / $15 per million tokens in / out), {simulator.IMAGE_MODEL} ($0.04 an "
        f"image), {simulator.VIDEO_MODEL} ($0.10 a second). Stop the demo with Ctrl+C.",
    ]
    return "\n".join(lines)


def run(settings: Settings, *, host: str, port: int) -> int:
    """Serve the demo until SIGINT or SIGTERM (the simulator stops after the gateway has drained)."""
    from gateway.app import serve

    database_configured = settings.database_url is not None
    os.environ[SIMULATOR_KEY_ENV] = secrets.token_urlsafe(32)  # for this process only: the simulator's own key
    sim = simulator.SimulatorServer(os.environ[SIMULATOR_KEY_ENV])
    settings = demo_settings(settings, simulator_url=sim.base_url)
    settings, _ = admin_token.ensure(settings)
    stored = admin_token.stored(settings)
    token = stored if settings.admin_token is not None and settings.admin_token.get_secret_value() == stored else None
    url = db.embedded_database_url(settings.data_dir)
    settings = settings.model_copy(update={"database_url": url})

    async def prepare() -> DemoAccount:
        pool = await db.create_pool(url, min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await schema.migrate(conn)
            return await ensure_account(pool, settings.data_dir / STATE_FILE)
        finally:
            await pool.close()

    try:
        account = asyncio.run(prepare())
    except BaseException:
        sim.stop()
        raise
    text = instructions(account, base_url=f"http://{host}:{port}", data_dir=settings.data_dir, token=token,
                        database_configured=database_configured)

    def announce(message: str) -> None:
        print(message, flush=True)
        print(text, flush=True)  # once the gateway listens, so every line works when it appears

    sim.start()
    try:
        serve(settings, host=host, port=port, print=announce)
    finally:
        sim.stop()
    return 0
