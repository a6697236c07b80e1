"""The model catalog: every model Meterline will bill for, with its prices and limits.

Entries come from two places. Locally configured models (`settings.models`, any modality) always win. The
text upstream's own catalog (OpenRouter's `GET /models`: USD-per-token decimal strings) prices every other
text model at the upstream's price times (1 + markup), converted exactly. A model without a usable price is
not in the catalog, so it is never forwarded. If a refresh fails, the last good remote catalog keeps serving
and `status()` says so.

The `openrouter/` prefix is optional: `openrouter/x` resolves to `x` at the same price. A local entry may be an
alias (`upstream_model`): it keeps its own id and prices, whatever the remote catalog says of the upstream's id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

from billing.catalog_config import ModelConfig, TextModelConfig
from billing.pricing import TokenPrices, usd_per_token_to_per_mtok, whole_micros

OPTIONAL_PREFIX = "openrouter/"
DEFAULT_MEDIA_UPSTREAM = "media"


class CatalogError(Exception):
    """The upstream's catalog could not be read (malformed payload); the previous catalog stays."""


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    id: str
    modality: str  # text | image | video
    upstream: str
    source: str  # local | remote
    owned_by: str
    prices: TokenPrices | None = None  # text models only
    context_length: int | None = None
    max_output_tokens: int | None = None
    output_limit_field: str | None = None  # text models: see TextModelConfig.output_limit_field
    config: ModelConfig | None = None  # local entries
    display_name: str | None = None
    created: int = 0
    upstream_model: str | None = None  # an alias's upstream id (see ModelConfig.upstream_model)

    @property
    def forwarded_id(self) -> str:
        """The model id the upstream is sent: the upstream's own for an alias, else this entry's."""
        return self.upstream_model or self.id

    def pricing(self) -> dict[str, Any]:
        """Integer micros for display; a remote price that is not a whole micro per mtok is shown rounded
        half-up while billing uses its exact value."""
        if self.prices is not None:
            return {
                "input_per_mtok_micros": whole_micros(self.prices.input),
                "output_per_mtok_micros": whole_micros(self.prices.output),
                "cached_input_per_mtok_micros": (
                    None if self.prices.cached_input is None else whole_micros(self.prices.cached_input)
                ),
            }
        assert self.config is not None
        return self.config.pricing()

    def as_model(self) -> dict[str, Any]:
        """OpenAI's model object, plus Meterline's prices and limits (and, for an alias, the upstream's id: it is
        the model the answers come from, which is no secret)."""
        model: dict[str, Any] = {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
            "name": self.display_name or self.id,
            "modality": self.modality,
            "pricing": self.pricing(),
            "context_length": self.context_length,
            "max_output_tokens": self.max_output_tokens,
        }
        if self.upstream_model is not None:
            model["upstream_model"] = self.upstream_model
        return model


def _owner(model_id: str) -> str:
    return model_id.split("/", 1)[0] if "/" in model_id else "meterline"


def local_entry(model_id: str, config: ModelConfig, *, text_upstream: str) -> CatalogEntry:
    if isinstance(config, TextModelConfig):
        cached = config.cached_input_per_mtok_micros
        return CatalogEntry(
            id=model_id, modality="text", upstream=config.upstream or text_upstream, source="local",
            owned_by=_owner(model_id),
            prices=TokenPrices(Fraction(config.input_per_mtok_micros),
                               Fraction(config.output_per_mtok_micros),
                               None if cached is None else Fraction(cached)),
            context_length=config.context_length, max_output_tokens=config.max_output_tokens,
            output_limit_field=config.output_limit_field,
            config=config, display_name=config.display_name, upstream_model=config.upstream_model,
        )
    return CatalogEntry(
        id=model_id, modality=config.modality, upstream=config.upstream or DEFAULT_MEDIA_UPSTREAM,
        source="local", owned_by=_owner(model_id), config=config, display_name=config.display_name,
        upstream_model=config.upstream_model,
    )


def _positive_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def remote_entry(item: object, *, upstream: str, markup: Decimal) -> CatalogEntry | None:
    """One model of OpenRouter's `GET /models`, priced; None if it lacks an id or a usable price."""
    if not isinstance(item, dict):
        return None
    model_id = item.get("id")
    pricing = item.get("pricing")
    if not isinstance(model_id, str) or not model_id or not isinstance(pricing, dict):
        return None
    prompt = usd_per_token_to_per_mtok(pricing.get("prompt"), markup)
    completion = usd_per_token_to_per_mtok(pricing.get("completion"), markup)
    if prompt is None or completion is None:
        return None
    cached = usd_per_token_to_per_mtok(pricing.get("input_cache_read"), markup)
    context = _positive_int(item.get("context_length"))
    top = item.get("top_provider")
    max_output = _positive_int(top.get("max_completion_tokens")) if isinstance(top, dict) else None
    created = item.get("created")
    return CatalogEntry(
        id=model_id.removeprefix(OPTIONAL_PREFIX) if model_id != OPTIONAL_PREFIX else model_id,
        modality="text", upstream=upstream, source="remote", owned_by=_owner(model_id),
        prices=TokenPrices(prompt, completion, cached),
        context_length=context,
        # Without a published output limit, the context window is the most a call can produce.
        max_output_tokens=max_output or context,
        display_name=item.get("name") if isinstance(item.get("name"), str) else None,
        created=created if isinstance(created, int) and not isinstance(created, bool) else 0,
    )


@dataclass(slots=True)
class _RemoteState:
    entries: dict[str, CatalogEntry] = field(default_factory=dict)
    loaded_at: datetime | None = None  # when the last good load finished
    last_error: str | None = None
    attempts: int = 0


class Catalog:
    """Local entries plus the last good remote catalog. Reads are plain dict lookups (no I/O)."""

    def __init__(self, local: Mapping[str, ModelConfig], *, text_upstream: str, markup: Decimal) -> None:
        self.text_upstream = text_upstream
        self.markup = markup
        self._local = {
            model_id.removeprefix(OPTIONAL_PREFIX): local_entry(
                model_id.removeprefix(OPTIONAL_PREFIX), config, text_upstream=text_upstream)
            for model_id, config in local.items()
        }
        self._remote = _RemoteState()
        self.remote_enabled = True
        self._merged: dict[str, CatalogEntry] = dict(self._local)

    def get(self, model_id: str) -> CatalogEntry | None:
        """The entry for `model_id` (with or without the `openrouter/` prefix), or None if unknown."""
        entry = self._merged.get(model_id)
        if entry is None and model_id.startswith(OPTIONAL_PREFIX):
            entry = self._merged.get(model_id[len(OPTIONAL_PREFIX):])
        return entry

    def entries(self) -> list[CatalogEntry]:
        return sorted(self._merged.values(), key=lambda e: e.id)

    @property
    def loaded(self) -> bool:
        return self._remote.loaded_at is not None

    def load_remote(self, payload: object) -> int:
        """Replace the remote entries from an upstream `GET /models` body; returns how many were priced.

        Raises CatalogError (and keeps the previous entries) if the payload is not a model list."""
        self._remote.attempts += 1
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise self.failed("the upstream's model list is malformed (no `data` array)")
        remote: dict[str, CatalogEntry] = {}
        for item in data:
            entry = remote_entry(item, upstream=self.text_upstream, markup=self.markup)
            if entry is not None:
                remote[entry.id] = entry
        if data and not remote:
            raise self.failed("the upstream's model list has no priced models")
        self._remote = _RemoteState(remote, datetime.now(UTC), None, self._remote.attempts)
        self._merged = {**remote, **self._local}
        return len(remote)

    def disable_remote(self) -> None:
        """Serve local entries only (no upstream catalog is configured to be read)."""
        self.remote_enabled = False

    def failed(self, reason: str) -> CatalogError:
        """Record a failed refresh (the last good catalog stays) and return the error to raise."""
        self._remote.last_error = reason
        return CatalogError(reason)

    def status(self) -> dict[str, Any]:
        """For /readyz: `ok`, `stale` (a refresh failed; the last good catalog serves), `local_only` (never
        loaded; only locally configured models serve), `loading` (no attempt finished yet) or `local` (remote
        loading is switched off)."""
        remote = self._remote
        if not self.remote_enabled:
            state = "local"
        elif remote.last_error is None:
            state = "ok" if remote.loaded_at is not None else "loading"
        else:
            state = "stale" if remote.loaded_at is not None else "local_only"
        return {
            "status": state,
            "models": len(self._merged),
            "local_models": len(self._local),
            "remote_models": len(remote.entries),
            "loaded_at": remote.loaded_at,
            "error": remote.last_error,
        }
