"""The model catalog at the edge: `GET models`, `GET models/{id}`, resolving a requested model, and keeping
the catalog fresh (loaded at start, then every `catalog_refresh_seconds`, in an owned background task)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from billing.catalog import Catalog, CatalogEntry, CatalogError
from gateway import upstream, wire
from gateway.auth import requires_key
from gateway.contract import MODEL_NOT_FOUND, operation
from gateway.errors import ApiError
from gateway.keys import CATALOG, SETTINGS, TASKS
from gateway.render import json_response
from gateway.tasks import every

log = logging.getLogger("meterline.catalog")

# How long a request for a model the catalog does not know yet waits for the first load to finish.
_FIRST_LOAD_WAIT_SECONDS = 10.0
FIRST_LOAD = web.AppKey("catalog_first_load", asyncio.Event)


def model_not_found(model_id: str) -> ApiError:
    return ApiError(404, "MODEL_NOT_FOUND", f"The model {model_id!r} does not exist or is not available",
                    param="model")


async def refresh_catalog(app: web.Application) -> bool:
    """Load the text upstream's catalog once; on failure keep the last good one. Returns success."""
    catalog = app[CATALOG]
    try:
        target = upstream.upstream_named(app, catalog.text_upstream)
        async with upstream.request(app, target, "GET", "models") as response:
            payload = await response.json()
        count = catalog.load_remote(payload)
    except upstream.UpstreamError as exc:
        catalog.failed(exc.message)
        log.warning("model catalog refresh failed (%s); serving the last good catalog", exc.message)
        return False
    except CatalogError as exc:
        log.warning("model catalog refresh failed (%s); serving the last good catalog", exc)
        return False
    finally:
        app[FIRST_LOAD].set()
    log.info("model catalog loaded: %d priced upstream models", count)
    return True


async def _keep_fresh(app: web.Application) -> None:
    await refresh_catalog(app)
    await every(app[SETTINGS].catalog_refresh_seconds, lambda: refresh_catalog(app), "catalog refresh")


async def catalog_ctx(app: web.Application) -> AsyncIterator[None]:
    """Build the catalog from local entries; load the upstream's in the background (start is not delayed by
    a slow or unreachable upstream). Needs the task owner, so it goes after `tasks_ctx`."""
    settings = app[SETTINGS]
    catalog = Catalog(settings.models, text_upstream=settings.text_upstream, markup=settings.markup)
    app[CATALOG] = catalog
    app[FIRST_LOAD] = asyncio.Event()
    if settings.remote_catalog:
        app[TASKS].background(_keep_fresh(app), "catalog-refresh")
    else:
        catalog.disable_remote()
        app[FIRST_LOAD].set()
    yield


async def resolve_model(app: web.Application, model_id: str, *, modality: str | None = None) -> CatalogEntry:
    """The priced entry for `model_id` (`openrouter/` prefix optional), or 404 MODEL_NOT_FOUND. A request
    arriving before the first catalog load waits for it briefly rather than failing."""
    catalog = app[CATALOG]
    entry = catalog.get(model_id)
    if entry is None and not app[FIRST_LOAD].is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(app[FIRST_LOAD].wait(), _FIRST_LOAD_WAIT_SECONDS)
        entry = catalog.get(model_id)
    if entry is None or (modality is not None and entry.modality != modality):
        raise model_not_found(model_id)
    return entry


@operation("Every priced model (text, image, video) with its prices and limits", answer=wire.ModelList)
@requires_key
async def list_models(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    return json_response({"object": "list", "data": [entry.as_model() for entry in catalog.entries()]})


@operation("One model (its id may contain /)", answer=wire.Model, errors=(MODEL_NOT_FOUND,))
@requires_key
async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    entry = request.app[CATALOG].get(model_id)
    if entry is None:
        raise model_not_found(model_id)
    return json_response(entry.as_model())


def add_routes(app: web.Application, prefixes: tuple[str, ...]) -> None:
    for prefix in prefixes:
        app.router.add_get(f"{prefix}/models", list_models)
        app.router.add_get(f"{prefix}/models/{{model_id:.+}}", get_model)
