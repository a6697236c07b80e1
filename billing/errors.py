"""The billing package's exceptions, the only ones it raises on purpose.

    BillingError
    ├── InvalidAmount          an amount that is not a whole number of micros in range
    │   └── InvalidRule        an auto top-up rule that cannot be kept (names the field)
    ├── AccountNotFound        no customer account with that id
    ├── KeyNotFound            no API key with that id
    ├── InsufficientBalance    a debit the available balance cannot cover
    ├── KeyLimitExceeded       a hold the key's spend limit (in its current window) cannot cover
    ├── IdempotencyConflict    an Idempotency-Key reused with a different request
    ├── DuplicateRequest       a hold for a request id that already has one
    └── UnknownHold            settle or void of a request id that was never held

    DatabaseUnavailable        PostgreSQL did not answer: down, unreachable, restarting, or hung past the command
                               timeout (not a BillingError: it says nothing about the request, and is retryable)

The HTTP edge renders each as an OpenAI-shaped error. asyncpg's errors are translated exactly once: connection
failures into DatabaseUnavailable by billing.db's connection class, constraint answers in billing.ledger.
"""

from __future__ import annotations

from datetime import datetime


class BillingError(Exception):
    """Base of every error the billing package raises deliberately."""


class InvalidAmount(BillingError):
    pass


class InvalidRule(InvalidAmount):
    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class AccountNotFound(BillingError):
    def __init__(self, account_id: str) -> None:
        super().__init__(f"No account with id {account_id!r}")
        self.account_id = account_id


class KeyNotFound(BillingError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"No API key with id {key_id!r}")
        self.key_id = key_id


class InsufficientBalance(BillingError):
    def __init__(self, message: str, *, required_micros: int, available_micros: int) -> None:
        super().__init__(message)
        self.required_micros = required_micros
        self.available_micros = available_micros


class KeyLimitExceeded(BillingError):
    """`resets_at` is None for a limit that never resets."""

    def __init__(
        self, message: str, *, key_id: str, limit_micros: int, remaining_micros: int,
        limit_reset: str | None, resets_at: datetime | None,
    ) -> None:
        super().__init__(message)
        self.key_id = key_id
        self.limit_micros = limit_micros
        self.remaining_micros = remaining_micros
        self.limit_reset = limit_reset
        self.resets_at = resets_at


class IdempotencyConflict(BillingError):
    pass


class DuplicateRequest(BillingError):
    pass


class UnknownHold(BillingError):
    def __init__(self, request_id: str) -> None:
        super().__init__(f"No hold for request {request_id!r}")
        self.request_id = request_id


class DatabaseUnavailable(Exception):
    """The database could not be reached or did not answer in time.

    `before_query` is true when the failure came while connecting, so no statement can have run (a hold cannot
    exist); otherwise a statement may have committed just before its answer was lost."""

    def __init__(self, message: str, *, before_query: bool = False) -> None:
        super().__init__(message)
        self.before_query = before_query
