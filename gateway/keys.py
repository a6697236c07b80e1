"""Typed application and request keys: every shared resource the app opens lives under one of these."""

from __future__ import annotations

import aiohttp
import asyncpg
from aiohttp import web

from billing.catalog import Catalog
from billing.holds import Holds
from billing.keys import ApiKey, KeyStore
from billing.quotas import QuotaBook
from billing.tasks import TaskOwner
from gateway.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
KEY_STORE = web.AppKey("key_store", KeyStore)
# Every task the app starts: settlements are drained at shutdown, background loops cancelled.
TASKS = web.AppKey("tasks", TaskOwner)
# The one hold lifecycle every billed call goes through (holds and settlements group-committed for chat).
HOLDS = web.AppKey("holds", Holds)
# This process's quota grants (billing.quotas), unless `quotas` is off.
QUOTAS = web.AppKey("quotas", QuotaBook)
# The one client session (and connection pool) for every upstream call.
HTTP = web.AppKey("http", aiohttp.ClientSession)
# The priced model catalog (local entries + the text upstream's, refreshed in the background).
CATALOG = web.AppKey("catalog", Catalog)

API_KEY = web.RequestKey("api_key", ApiKey)
