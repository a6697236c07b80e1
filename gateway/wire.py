"""The published shapes of the JSON answers, as pydantic models for the OpenAPI document (gateway.contract).

They state the fields a client may rely on (present, of this type) and allow more: the answers are rendered by
their handlers, and tests/test_contract_fuzz.py checks the answers a live server gives against these shapes, so a
renamed or retyped field fails there. Timestamps are ISO-8601 UTC strings unless the API Meterline imitates uses
Unix seconds (OpenAI's `created`, the video object). Amounts are integer micros; `*_usd` and `cost` beside them
are exact decimal strings, except where OpenRouter or Lumenfall define a JSON number.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Shape(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Shape):
    message: str
    type: str
    code: str
    param: str | None


class Error(_Shape):
    """Every error: OpenAI's shape with Lumenfall's codes. A 402 adds the amounts that refused it."""

    error: ErrorDetail


class Health(_Shape):
    status: Literal["ok"]


class Readiness(_Shape):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str]
    catalog: dict[str, Any]


class UsdAmount(_Shape):
    amount: float
    currency: Literal["usd"]


class NextExpiry(_Shape):
    """When credit next expires, and how much of it is unspent now."""

    at: str
    amount_micros: int


class Balance(_Shape):
    """`balance_micros` is what the account's credit grants hold (`paid_micros` + `promotional_micros`) when it is
    positive; below zero it is debt and both parts are 0."""

    object: Literal["balance"]
    billing_type: Literal["prepaid"]
    available: UsdAmount
    available_micros: int
    balance_micros: int
    held_micros: int
    paid_micros: int
    promotional_micros: int
    next_expiry: NextExpiry | None


class Account(_Shape):
    id: str
    object: Literal["account"]
    name: str
    balance_micros: int
    held_micros: int
    available_micros: int
    low_balance_threshold_micros: int | None
    created_at: str


class AccountList(_Shape):
    object: Literal["list"]
    data: list[Account]
    has_more: bool
    next_cursor: str | None


class ApiKey(_Shape):
    id: str
    object: Literal["api_key"]
    account_id: str
    name: str | None
    prefix: str
    created_at: str
    revoked_at: str | None
    limit_micros: int | None
    limit_reset: Literal["daily", "weekly", "monthly"] | None
    rpm_limit: int | None
    rpd_limit: int | None
    detailed_logging: bool


class NewApiKey(ApiKey):
    key: str  # the secret, shown this once


class ApiKeyList(_Shape):
    object: Literal["list"]
    data: list[ApiKey]
    has_more: bool


class Posting(_Shape):
    """A top-up or an adjustment, as posted to the ledger."""

    object: Literal["topup", "adjustment"]


class LedgerEntry(_Shape):
    id: int
    object: Literal["ledger_entry"]
    kind: str
    amount_micros: int
    balance_after_micros: int | None
    created_at: str


class LedgerPage(_Shape):
    object: Literal["list"]
    data: list[LedgerEntry]
    has_more: bool
    next_cursor: str | None


class KeyStatus(_Shape):
    """OpenRouter's `GET /key`, with every amount in micros too."""

    data: ApiKeyStatus


class ApiKeyStatus(_Shape):
    id: str
    object: Literal["api_key"]
    label: str
    limit_micros: int | None
    limit_remaining_micros: int | None
    usage_micros: int
    held_micros: int


class Model(_Shape):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    modality: Literal["text", "image", "video"]
    pricing: dict[str, Any]


class ModelList(_Shape):
    object: Literal["list"]
    data: list[Model]


class EstimateLine(_Shape):
    type: str
    metric: str
    quantity: int
    billable_quantity: int
    total_cost_micros: int


class Estimate(_Shape):
    """A `?dryRun=true` answer: `total_cost_micros` is exactly the hold the real call would take."""

    estimated: Literal[True]
    model: str
    provider: str
    total_cost_micros: int
    currency: Literal["USD"]
    components: list[EstimateLine]
    available_micros: int
    sufficient_balance: bool


class ChatCompletion(_Shape):
    """OpenAI's chat completion as the upstream answered it, with `usage` priced (`cost` in USD as OpenRouter
    gives it, `cost_micros` exact). A streamed call answers `text/event-stream` chunks, the last with usage."""

    id: str
    object: str
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, Any]


class Images(_Shape):
    """OpenAI's images answer; `metadata` carries the charge and the request id."""

    data: list[dict[str, Any]]
    metadata: dict[str, Any]


class Video(_Shape):
    """OpenAI's video object with Lumenfall's metadata (estimate while unfinished, charge once finished)."""

    id: str
    object: Literal["video"]
    model: str
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    progress: int | None
    created_at: int | None
    seconds: str
    size: str
    metadata: dict[str, Any]


class RequestUsage(_Shape):
    prompt_tokens: int | None
    completion_tokens: int | None
    quantity: int | None


class RequestRecord(_Shape):
    """Lumenfall's request record."""

    id: str
    object: Literal["request"]
    created_at: str
    model: str
    modality: str
    endpoint: str
    status: str
    cost_micros: int
    cost: str
    currency: Literal["usd"]
    usage: RequestUsage


class RequestList(_Shape):
    object: Literal["list"]
    data: list[RequestRecord]
    has_more: bool
    next_cursor: str | None


class Conversation(_Shape):
    id: str
    object: Literal["conversation"]
    account_id: str
    key_id: str | None
    model: str | None
    turns: int
    exchanges: int
    created_at: str
    updated_at: str


class ConversationWithMessages(Conversation):
    messages: list[dict[str, Any]]


class ConversationList(_Shape):
    object: Literal["list"]
    data: list[Conversation]
    has_more: bool
    next_cursor: str | None


class Memory(_Shape):
    id: str
    object: Literal["memory"]
    account_id: str
    conversation_id: str
    content: str
    tokens: int
    created_at: str


class MemoryList(_Shape):
    object: Literal["list"]
    data: list[Memory]
    has_more: bool
    next_cursor: str | None


class Deleted(_Shape):
    object: str
    deleted: bool | int


class WebhookEndpoint(_Shape):
    id: str
    object: Literal["webhook_endpoint"]
    account_id: str
    url: str
    events: list[str]
    status: Literal["enabled", "disabled"]
    created_at: str


class WebhookEndpointList(_Shape):
    object: Literal["list"]
    data: list[WebhookEndpoint]


class WebhookAttempt(_Shape):
    object: Literal["webhook_attempt"]
    event_id: str
    status: int | None


class WebhookAttemptList(_Shape):
    object: Literal["list"]
    data: list[WebhookAttempt]


class WebhookSecret(_Shape):
    """The account's Standard Webhooks signing secret (`whsec_...`)."""

    object: Literal["webhook_secret"]
    secret: str
    created_at: str


class Replay(_Shape):
    object: Literal["webhook_event.replay"]
    event_id: str
    deliveries: int


class Statement(_Shape):
    account_id: str
    opening_balance_micros: int
    credits_micros: int
    debits_micros: int
    closing_balance_micros: int


class MarginReport(_Shape):
    object: Literal["margin_report"]
    group_by: str
    data: list[dict[str, Any]]
    totals: dict[str, int]


class FlagsReport(_Shape):
    object: Literal["flags_report"]
    counts: dict[str, int]
    data: list[dict[str, Any]]
    has_more: bool


KeyStatus.model_rebuild()


class CheckoutSession(_Shape):
    """A Stripe Checkout Session created for a top-up: send the customer to `url`."""

    object: Literal["checkout_session"]
    id: str
    url: str
    payment_id: str
    amount_micros: int


class Payment(_Shape):
    """Money paid through Stripe: open until its session (or an auto top-up's PaymentIntent) is paid, then the
    top-up it posted and any reversals; an auto top-up that failed says why."""

    id: str
    object: Literal["payment"]
    kind: Literal["checkout", "auto_topup"]
    status: Literal["open", "paid", "failed", "expired"]
    session_id: str | None
    failure: str | None
    amount_micros: int
    paid_micros: int | None
    refunded_micros: int
    disputed_micros: int
    created_at: str
    completed_at: str | None


class PaymentList(_Shape):
    object: Literal["list"]
    data: list[Payment]


class StripeEventReceipt(_Shape):
    """What a Stripe event did: credited, reversed or ignored (with the reason)."""

    object: Literal["stripe_event"]
    id: str | None
    action: Literal["credited", "reversed", "failed", "expired", "saved", "ignored"]
    amount_micros: int


class AutoTopup(_Shape):
    """An account's auto top-up rule: below `threshold_micros`, charge `payment_method` for `amount_micros`. Three
    failures in a row disable it (`disabled_reason`, `disabled_at`)."""

    object: Literal["auto_topup"]
    account_id: str
    enabled: bool
    threshold_micros: int | None
    amount_micros: int | None
    payment_method: str | None
    failures: int
    disabled_reason: str | None
    disabled_at: str | None


class CreditGrant(_Shape):
    """Credit on an account: paid or promotional, spent promotional first, then by lower priority, earliest expiry
    and age. `status`: scheduled (before effective_at), active, spent, expired. For a posted grant amount =
    remaining + spent + expired."""

    id: str
    object: Literal["credit_grant"]
    account_id: str
    category: Literal["paid", "promotional"]
    priority: int
    status: Literal["scheduled", "active", "spent", "expired"]
    amount_micros: int
    remaining_micros: int
    spent_micros: int
    expired_micros: int
    effective_at: str
    expires_at: str | None
    description: str | None
    transfer_id: int | None
    created_at: str


class CreditGrantList(_Shape):
    object: Literal["list"]
    data: list[CreditGrant]
    has_more: bool
    next_cursor: str | None
