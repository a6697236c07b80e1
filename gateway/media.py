"""What the image and video routes share at the HTTP edge: the `dryRun` and `Idempotency-Key` inputs,
resolving a media model to its catalog entry, upstream and the id the upstream is sent, and rendering an estimate."""

from __future__ import annotations

from typing import Any, TypeVar

from aiohttp import web

from billing import ledger
from billing.catalog_config import ImageModelConfig, VideoModelConfig
from billing.media_pricing import MediaPriceError
from billing.pricing import Estimate
from gateway.bodies import header
from gateway.errors import ApiError, invalid
from gateway.failover import Routing
from gateway.keys import API_KEY, POOL, SETTINGS
from gateway.multipart import Limits
from gateway.render import json_response
from gateway.settings import Settings

E = TypeVar("E", ImageModelConfig, VideoModelConfig)

DEFAULT_UPSTREAM = "media"
_MAX_IDEMPOTENCY_KEY = 255


def idempotency_key(request: web.Request) -> str | None:
    key = header(request, "Idempotency-Key")
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > _MAX_IDEMPOTENCY_KEY:
        raise invalid(f"Idempotency-Key must be 1 to {_MAX_IDEMPOTENCY_KEY} characters", "Idempotency-Key")
    return key


def media_entry(request: web.Request, model: object, kind: type[E]) -> tuple[str, E]:
    """The catalog entry of a media model: 404 for an unknown model, 400 for a model of another modality."""
    if not isinstance(model, str) or not model:
        raise invalid("model: is required (a model id string)", "model")
    entry = request.app[SETTINGS].models.get(model)
    if entry is None:
        raise ApiError(404, "MODEL_NOT_FOUND", f"The model {model!r} does not exist or is not priced",
                       param="model")
    if not isinstance(entry, kind):
        article = "an image" if kind is ImageModelConfig else "a video"
        raise invalid(f"The model {model!r} is not {article} model", "model")
    return model, entry


def forwarded_model(model: str, entry: ImageModelConfig | VideoModelConfig) -> str:
    """The model id the upstream is sent: the upstream's own for an alias (`upstream_model`), else `model`. The
    client's answer, its charge and its request record name `model` all the same."""
    return entry.upstream_model or model


def upload_limits(request: web.Request) -> Limits:
    settings = request.app[SETTINGS]
    return Limits(max_bytes=settings.max_upload_bytes, max_parts=settings.max_upload_parts,
                  max_field_bytes=settings.max_form_field_bytes)


def media_routing(request: web.Request, model: str, entry: ImageModelConfig | VideoModelConfig) -> Routing:
    """The providers of a media model (its one upstream, for a model without `providers`)."""
    return Routing(request.app, model, entry, upstream=entry.upstream or DEFAULT_UPSTREAM,
                   forwarded_id=forwarded_model(model, entry))


def price_error(exc: MediaPriceError) -> ApiError:
    return invalid(str(exc), exc.param)


def media_models(settings: Settings, kind: type[E]) -> dict[str, E]:
    return {model: entry for model, entry in settings.models.items() if isinstance(entry, kind)}


def one_of(values: list[str], *, nullable: bool = True) -> dict[str, Any]:
    """A string property that must be one of `values` (any string when there are none to list)."""
    schema: dict[str, Any] = {"type": "string", "enum": sorted(set(values))} if values else {"type": "string"}
    return {"anyOf": [schema, {"type": "null"}]} if nullable else schema


def form_schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """A request body's schema: these properties, nothing else (an unknown field is a 400)."""
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": False}


# `prompt` as required_prompt checks it; model, for the document, as media_entry looks it up.
PROMPT = {"type": "string", "minLength": 1}


def optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"{name}: must be a string", name)
    return value


def required_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if prompt is None or prompt == "":
        raise invalid("prompt: is required", "prompt")
    if not isinstance(prompt, str):
        raise invalid("prompt: must be a string", "prompt")
    if "\x00" in prompt:  # PostgreSQL text cannot hold it, and no model needs it
        raise invalid("prompt: must not contain NUL characters", "prompt")
    return prompt


async def estimate_response(request: web.Request, estimate: Estimate, *, model: str,
                            provider: str) -> web.Response:
    """The dryRun answer (the chat issue's estimate shape); its total is exactly the real call's hold."""
    available = await ledger.available_micros(request.app[POOL], request[API_KEY].account_id)
    return json_response(estimate.as_dict(model=model, provider=provider, available_micros=available))

