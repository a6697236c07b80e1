"""Settings: `config/meterline.toml` (or the file named by METERLINE_CONFIG), overridden by METERLINE_* variables.

Nested settings use `__` in variable names, e.g. METERLINE_UPSTREAMS__OPENROUTER__BASE_URL. A bad setting fails
at start with a message naming it (see `describe_errors`).
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import tomli
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from billing.catalog_config import ModelConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = Path("config") / "meterline.toml"


class UpstreamSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: str
    api_key_env: str = Field(description="Name of the environment variable holding the upstream's API key")
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    timeout_seconds: float = Field(default=600.0, gt=0, description="Whole-request limit")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None


class StripeSettings(BaseModel):
    """Stripe top-ups (issue 16). Stripe is off while the secret key's variable is unset: its routes answer 503."""

    model_config = ConfigDict(extra="forbid")

    api_base: str = "https://api.stripe.com"
    secret_key_env: str = Field(default="STRIPE_SECRET_KEY", min_length=1)
    webhook_secret_env: str = Field(default="STRIPE_WEBHOOK_SECRET", min_length=1)
    # Lumenfall's minimum: a card payment below it costs more in fees than it is worth.
    min_amount_usd: Decimal = Field(default=Decimal(10), gt=0, decimal_places=2)
    max_amount_usd: Decimal = Field(default=Decimal(10_000), gt=0, decimal_places=2)
    # How old a webhook's signed timestamp may be (Stripe's library default): older is a replay, refused.
    webhook_tolerance_seconds: int = Field(default=300, ge=1, le=86_400)
    # Where Checkout sends the customer back (unset: the gateway's base URL with ?checkout=success / cancel).
    success_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    cancel_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    # How often each process looks for auto top-up triggers to charge (issue 16).
    auto_topup_poll_seconds: float = Field(default=2.0, gt=0, le=3600)

    @field_validator("api_base")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _range(self) -> StripeSettings:
        if self.min_amount_usd > self.max_amount_usd:
            raise ValueError(f"min_amount_usd ({self.min_amount_usd}) exceeds max_amount_usd ({self.max_amount_usd})")
        return self

    def secret_key(self) -> str | None:
        return os.environ.get(self.secret_key_env) or None

    def webhook_secret(self) -> str | None:
        return os.environ.get(self.webhook_secret_env) or None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="METERLINE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    host: str = "127.0.0.1"
    # The URL clients reach this gateway at (what a webhook's video object links its content under); unset:
    # http://host:port.
    public_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    port: int = Field(default=8080, ge=0, le=65535)
    database_url: str | None = Field(default=None, description="None: use the embedded PostgreSQL")
    data_dir: Path = Path(".meterline")
    admin_token: SecretStr | None = None
    pool_min_size: int = Field(default=2, ge=1)
    pool_max_size: int = Field(default=20, ge=1)
    # A statement that runs longer counts as the database hanging (503, or a settlement retried); reports and
    # statements, which may read much more, get their own longer limit.
    database_timeout_seconds: float = Field(default=10.0, gt=0)
    # Holds and settlements of concurrent requests share one transaction, up to this many (1: one each).
    ledger_batch_max: int = Field(default=256, ge=1, le=10_000)
    # One access log line per request (gateway.access: method, route template, status, duration, model, cost). Off
    # by default: every billed call already has its request record and every request is counted in /metrics, and
    # formatting and writing a JSON line costs about 60 µs of CPU (bench/ measured aiohttp's old line at 90 µs, 13%
    # of a request).
    access_log: bool = False
    # A second listener serving only GET /metrics, without the admin token, for a scraper that reaches an address
    # clients do not (unset: none; /metrics on the API's port always asks for the admin token).
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Log lines as JSON (one object a line, with the request's ids) or text; auto: JSON unless on a terminal.
    log_format: Literal["auto", "json", "text"] = "auto"
    # `meterline serve` runs on uvloop's event loop: bench/ measured 8-10% less CPU per billed request than
    # asyncio's own (whose transports are Python), at concurrency 1 and 32. False: asyncio's loop.
    uvloop: bool = True
    key_cache_seconds: float = Field(default=1.0, ge=0, le=1.0)
    # How long a cached key lives while this process hears key-change notifications (revocations still land
    # within a second: a change evicts at once, and a lost listener falls back to key_cache_seconds).
    key_cache_notified_seconds: float = Field(default=300.0, ge=0)
    sweep_interval_seconds: float = Field(default=5.0, gt=0)
    hold_ttl_seconds: float = Field(default=900.0, gt=0)
    # Quota grants (billing.quotas; README, "Quota grants"): each process holds a quota on the accounts it serves and
    # admits chat calls of keys without a spend limit against it in memory. Off: every call takes a per-call hold.
    quotas: bool = True
    # A quota is at most this share (in millionths) of the account's available balance, and covers at least
    # quota_min_calls worst cases of the account's calls (an account with less takes per-call holds).
    quota_share_ppm: int = Field(default=250_000, ge=1, le=1_000_000)
    quota_min_calls: int = Field(default=8, ge=1)
    # How often a process writes its quotas' calls in flight (the intent record the reconciliation report names
    # lost calls from) and grows them; a kill can leave unnamed only the calls admitted within the last beat.
    quota_beat_seconds: float = Field(default=0.1, gt=0, le=5)
    # A quota is sized to this many seconds of the account's recent worst-case demand.
    quota_horizon_seconds: float = Field(default=2.0, gt=0)
    # A quota unused this long is given back.
    quota_idle_seconds: float = Field(default=10.0, gt=0)
    # How long past hold_ttl_seconds a beat extends a quota's life: a process cut off from the database admits
    # nothing under it this long after its last beat, and a dead process's quota expires hold_ttl_seconds later.
    quota_lease_seconds: float = Field(default=10.0, gt=0)
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict, description="Locally priced models")
    # Chat completions and the model catalog (issue 3).
    text_upstream: str = Field(default="openrouter", description="Upstream for chat and its GET /models")
    catalog_refresh_seconds: float = Field(default=300.0, gt=0)
    remote_catalog: bool = Field(default=True, description="Load the text upstream's GET /models")
    markup: Decimal = Field(default=Decimal(0), ge=0, description="Added to remote prices: 0.05 = +5%")
    prompt_safety_factor: Decimal = Field(default=Decimal("1.25"), ge=1, le=10)
    # Tokens a hold adds for the chat templates providers wrap a prompt in (README, "The hold").
    prompt_overhead_per_message: int = Field(default=4, ge=0)
    prompt_overhead_per_request: int = Field(default=32, ge=0)
    prompt_overhead_with_tools: int = Field(default=400, ge=0)
    # The most choices (`n`) one chat call may ask for; the hold covers every one.
    max_choices: int = Field(default=16, ge=1, le=128)
    prompt_bound_above_chars: int = Field(
        default=256, ge=0, description="Longer prompts are held on a byte bound first, counted only if it is short")
    min_output_tokens: int = Field(default=16, ge=1)
    # The output a call may produce (and is held and capped at) on a model that publishes no output limit.
    default_max_output_tokens: int = Field(default=4096, ge=1)
    drain_seconds: float = Field(default=30.0, ge=0)
    # A provider of a model with several (issue 15) is skipped after this many failures in a row, for this long,
    # then tried once again (gateway.breaker).
    provider_failure_threshold: int = Field(default=5, ge=1, le=1000)
    provider_cooldown_seconds: float = Field(default=30.0, gt=0)
    # A stream's usage chunk and [DONE] are sent once its charge has committed; while the database is down, the
    # stream waits at most this long for that commit, then finishes while the settlement keeps retrying.
    stream_settle_wait_seconds: float = Field(default=10.0, ge=0)
    # At shutdown (SIGTERM, SIGINT), after in-flight requests end, how long the process waits for settlements
    # still in flight (streams being read for their usage, settlements retrying through an outage) to commit.
    shutdown_grace_seconds: float = Field(default=45.0, gt=0)
    # Stored conversations and memory, for keys with detailed_logging on (issue 11; README, "Conversations").
    # Conversations idle for longer than the retention are deleted, turns and memories with them (0: kept until
    # deleted); every process purges every `conversation_purge_seconds`.
    conversation_retention_days: int = Field(default=90, ge=0, le=36_500)
    conversation_purge_seconds: float = Field(default=3600.0, gt=0)
    # Recall: PostgreSQL's text search configuration (stemming and stop words), the most tokens of recalled memory
    # one call may receive, and the most memories.
    memory_language: str = Field(default="english", min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_.]+$")
    memory_budget_tokens: int = Field(default=1000, ge=0, le=100_000)
    memory_max_items: int = Field(default=8, ge=1, le=100)
    # The web console (issue 12): how long a sign-in lasts, and how many sign-in attempts a client may make in a
    # window before it must wait for the next one (a success clears its count).
    console_session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    console_signin_limit: int = Field(default=10, ge=1, le=1000)
    console_signin_window_seconds: int = Field(default=900, ge=10, le=86_400)
    # Webhooks (issue 13): the retry schedule (seconds after each failed attempt; Standard Webhooks' by default),
    # the time an attempt may take, how long an endpoint may fail without a success before it is disabled, how
    # long a rotated secret keeps signing, how often each process looks for due deliveries and how many it takes
    # (under a lease of `webhook_lease_seconds`), and whether plain http and private addresses may be called
    # (local development and tests only: it opens the gateway to SSRF).
    webhook_retry_schedule_seconds: list[float] = Field(
        default_factory=lambda: [0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0], min_length=1,
        max_length=50)
    webhook_timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    webhook_disable_after_seconds: float = Field(default=5 * 86_400, gt=0)
    webhook_secret_grace_seconds: float = Field(default=86_400, ge=0)
    webhook_poll_seconds: float = Field(default=1.0, gt=0)
    webhook_batch: int = Field(default=32, ge=1, le=1000)
    webhook_lease_seconds: float = Field(default=120.0, gt=0)
    webhook_allow_private_targets: bool = False
    # Images and videos (issue 4).
    max_upload_bytes: int = Field(default=25 * 1024 * 1024, gt=0, description="Largest images/edits body")
    # An upload's parts (files and fields) and the size of each text field: more is a 400 naming the limit.
    max_upload_parts: int = Field(default=64, ge=1, le=10_000)
    max_form_field_bytes: int = Field(default=128 * 1024, ge=1)
    video_max_job_seconds: float = Field(default=3600.0, gt=0, description="A job running longer is voided")
    video_poll_seconds: float = Field(default=5.0, gt=0, description="How often unfinished jobs are polled")
    stripe: StripeSettings = Field(default_factory=StripeSettings)

    @model_validator(mode="after")
    def _holds_outlast_calls(self) -> Settings:
        # A hold that expired while its call was still running would let the balance be spent twice (and an
        # image Idempotency-Key claim is taken over once older than a hold's lifetime). Every upstream counts.
        timeouts = {name: up.timeout_seconds for name, up in self.upstreams.items()}
        slowest = max(timeouts, key=timeouts.__getitem__, default=None)
        longest = (timeouts[slowest] if slowest else 0) + self.drain_seconds
        if self.hold_ttl_seconds <= longest:
            raise ValueError(f"hold_ttl_seconds ({self.hold_ttl_seconds:g}) must exceed the slowest upstream's "
                             f"timeout_seconds ({slowest}) plus drain_seconds ({longest:g})")
        # A model with providers may try each in turn under its one hold.
        for model_id, config in self.models.items():
            routed = sum(timeouts.get(provider.upstream, 0) for provider in config.providers or ())
            if routed and self.hold_ttl_seconds <= routed + self.drain_seconds:
                raise ValueError(f"hold_ttl_seconds ({self.hold_ttl_seconds:g}) must exceed the timeout_seconds of "
                                 f"every provider of model {model_id!r} together plus drain_seconds "
                                 f"({routed + self.drain_seconds:g}): a call may try each in turn")
        return self

    @model_validator(mode="after")
    def _leases_outlast_attempts(self) -> Settings:
        # A lease that ran out while its attempt was still running would let a second process send it too.
        if self.webhook_lease_seconds <= self.webhook_timeout_seconds:
            raise ValueError(f"webhook_lease_seconds ({self.webhook_lease_seconds:g}) must exceed "
                             f"webhook_timeout_seconds ({self.webhook_timeout_seconds:g})")
        if any(delay < 0 for delay in self.webhook_retry_schedule_seconds):
            raise ValueError("webhook_retry_schedule_seconds must not hold a negative delay")
        return self

    @model_validator(mode="after")
    def _grace_outlasts_drains(self) -> Settings:
        if self.shutdown_grace_seconds <= self.drain_seconds:
            raise ValueError(f"shutdown_grace_seconds ({self.shutdown_grace_seconds:g}) must exceed drain_seconds "
                             f"({self.drain_seconds:g}): a stream read for its usage must be able to settle")
        return self

    @model_validator(mode="after")
    def _metrics_port_is_its_own(self) -> Settings:
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError(f"metrics_port ({self.metrics_port}) must differ from port: it serves /metrics without "
                             "the admin token")
        return self

    def base_url(self) -> str:
        """Where clients reach this gateway: `public_url`, else http://host:port."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value or None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _Toml11Source(settings_cls))


class _Toml11Source(TomlConfigSettingsSource):
    """The settings file read as TOML 1.1 (tomli 2.4+), whose inline tables may span lines and end with a comma:
    a model's `providers` list reads as one table per provider, over several lines, as its docs write it. Python's
    own tomllib reads only TOML 1.0. Every TOML 1.0 file is TOML 1.1."""

    def _read_file(self, file_path: Path) -> dict[str, Any]:
        with file_path.open(mode="rb") as toml_file:
            return tomli.load(toml_file)


class SettingsError(Exception):
    """A setting is missing or invalid; the message names it."""


def config_path() -> Path | None:
    """The TOML file to read: METERLINE_CONFIG if set (it must exist), else config/meterline.toml."""
    named = os.environ.get("METERLINE_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            raise SettingsError(f"METERLINE_CONFIG names {named!r}, which is not a file")
        return path
    for candidate in (Path.cwd() / DEFAULT_CONFIG, PROJECT_ROOT / DEFAULT_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def describe_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        name = ".".join(str(part) for part in err["loc"]) or "(settings)"
        lines.append(f"invalid setting {name}: {err['msg']}")
    return "\n".join(lines)


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Read settings from the TOML file and the environment; `overrides` win over both."""
    path = config if config is not None else config_path()

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        return _FromFile(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from None
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML
        raise SettingsError(f"cannot read settings file {path}: {exc}") from None
