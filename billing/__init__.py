"""Meterline's money: pricing, the ledger, accounts and keys. Nothing here imports aiohttp."""
