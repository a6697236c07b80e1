"""What the admin API's modules share: body types, the Idempotency-Key money movements require, and pages."""

from __future__ import annotations

from typing import Annotated, Any

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from billing.money import MAX_MICROS, usd_to_micros
from gateway.bodies import header
from gateway.errors import invalid
from gateway.params import HeaderParam

# Money movements require one: a retry with the same key and body answers the first posting.
IDEMPOTENCY_KEY = HeaderParam("Idempotency-Key", "Required: a retry with the same key and body answers the first "
                              "posting (with Idempotent-Replayed: true) instead of posting again", required=True,
                              where="header")


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[StrictStr, AfterValidator(_no_nul)]
Name = Annotated[Text, Field(min_length=1, max_length=200)]
Micros = Annotated[StrictInt, Field(ge=-MAX_MICROS, le=MAX_MICROS)]


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The schema says what Amount._one_amount checks: one of the two, given and not null.
ONE_AMOUNT: dict[str, Any] = {"oneOf": [{"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                                        for name in ("amount_micros", "amount_usd")]}


class Amount(StrictBody):
    model_config = ConfigDict(json_schema_extra=ONE_AMOUNT)

    amount_micros: Micros | None = None
    # Parsed by billing.money.usd_to_micros (any exact decimal string); the schema shows the plain spelling.
    amount_usd: Annotated[StrictStr, Field(json_schema_extra={"pattern": r"^-?[0-9]{1,12}(\.[0-9]{1,6})?$",
                                                              "examples": ["12.50"]})] | None = None

    @model_validator(mode="after")
    def _one_amount(self) -> Amount:
        if (self.amount_micros is None) == (self.amount_usd is None):
            raise ValueError("give exactly one of amount_micros and amount_usd")
        return self

    def micros(self) -> int:
        if self.amount_micros is not None:
            return self.amount_micros
        assert self.amount_usd is not None
        return usd_to_micros(self.amount_usd)


def page(data: list[dict[str, Any]], *, limit: int, cursor: str | None) -> dict[str, Any]:
    has_more = len(data) > limit
    return {"object": "list", "data": data[:limit], "has_more": has_more,
            "next_cursor": cursor if has_more else None}


def idempotency_key(request: web.Request) -> str:
    key = (header(request, "Idempotency-Key") or "").strip()
    if not key:
        raise invalid("An Idempotency-Key header is required for money movements", "Idempotency-Key")
    if len(key) > 255:
        raise invalid("Idempotency-Key is longer than 255 characters", "Idempotency-Key")
    return key
