"""Typed application and request keys: every shared resource the app opens lives under one of these."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from billing.batcher import LedgerBatcher
from billing.catalog import Catalog
from billing.keys import ApiKey, KeyStore
from gateway.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
KEY_STORE = web.AppKey("key_store", KeyStore)
# Holds and settlements go through here: group-committed with those of concurrent requests.
LEDGER = web.AppKey("ledger", LedgerBatcher)
TASKS: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("tasks")
# The one client session (and connection pool) for every upstream call.
HTTP = web.AppKey("http", aiohttp.ClientSession)
# The priced model catalog (local entries + the text upstream's, refreshed in the background).
CATALOG = web.AppKey("catalog", Catalog)
# Settlement tasks: awaited (not cancelled) at shutdown, so a charge in flight is always written.
SETTLING = web.AppKey("settling", set[asyncio.Task[Any]])

API_KEY = web.RequestKey("api_key", ApiKey)
