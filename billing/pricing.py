"""Token pricing as pure functions: the exact cost of a call, the hold for a request, what a hold affords.

Prices are micros per million tokens held as exact `Fraction`s (a local price is a whole number of micros; a
remote price converted from OpenRouter's USD-per-token decimals may not be). The cost rule:

    cost = ((prompt - cached) * input + cached * cached_input + completion * output) / 1,000,000

computed exactly and rounded once per call, half-up, to a whole micro (billing.money.round_half_up).
Completion tokens include reasoning tokens, as in OpenAI's usage. A hold is the cost of the largest usage the
request may produce, by the same rule, so a charge for real usage never exceeds its hold.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from billing.money import MAX_MICROS, round_half_up

TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens
_MICROS_PER_USD = Fraction(1_000_000)


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """Exact micros per million tokens; `cached_input` None means cached tokens cost the input price."""

    input: Fraction
    output: Fraction
    cached_input: Fraction | None = None

    @property
    def cached(self) -> Fraction:
        return self.input if self.cached_input is None else self.cached_input


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def parse_usage(raw: object) -> Usage | None:
    """OpenAI-shaped usage (with OpenRouter's details) as token counts; None when absent or unusable, which
    is when a charge has to be estimated instead."""
    if not isinstance(raw, dict):
        return None
    prompt = _count(raw.get("prompt_tokens"))
    completion = _count(raw.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    prompt_details = raw.get("prompt_tokens_details")
    completion_details = raw.get("completion_tokens_details")
    cached = _count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else None
    reasoning = (_count(completion_details.get("reasoning_tokens"))
                 if isinstance(completion_details, dict) else None)
    return Usage(prompt, completion, cached or 0, reasoning or 0)


def exact_cost(prices: TokenPrices, usage: Usage) -> Fraction:
    """The unrounded cost in micros. Cached tokens are part of the prompt (clamped to it)."""
    prompt = max(usage.prompt_tokens, 0)
    cached = min(max(usage.cached_tokens, 0), prompt)
    completion = max(usage.completion_tokens, 0)
    per_mtok = (prompt - cached) * prices.input + cached * prices.cached + completion * prices.output
    return per_mtok / TOKENS_PER_PRICE_UNIT


def cost_micros(prices: TokenPrices, usage: Usage) -> int:
    """The charge for a call: its exact cost rounded once, half-up, to a whole micro."""
    cached_price = prices.cached
    if prices.input.denominator == 1 and prices.output.denominator == 1 and cached_price.denominator == 1:
        # Whole-micro prices (every local price): the same rule in int arithmetic, without Fraction's
        # normalisation on every step (bench/ measured it at 4% of a billed request's CPU).
        prompt = max(usage.prompt_tokens, 0)
        cached = min(max(usage.cached_tokens, 0), prompt)
        per_mtok = ((prompt - cached) * prices.input.numerator + cached * cached_price.numerator
                    + max(usage.completion_tokens, 0) * prices.output.numerator)
        return min(round_half_up(per_mtok, TOKENS_PER_PRICE_UNIT), MAX_MICROS)
    exact = exact_cost(prices, usage)
    return min(round_half_up(exact.numerator, exact.denominator), MAX_MICROS)


def whole_micros(value: Fraction) -> int:
    """A price shown as an integer (GET models, dryRun): rounded half-up; billing keeps the exact value."""
    return round_half_up(value.numerator, value.denominator)


def padded_prompt_tokens(counted: int, safety_factor: Decimal) -> int:
    """The prompt tokens a hold assumes: the tokenizer's count times the safety factor, rounded up."""
    factor = _fraction(safety_factor)
    return -(-counted * factor.numerator // factor.denominator)  # ceil, in ints


@functools.lru_cache(maxsize=64)
def _fraction(value: Decimal) -> Fraction:
    """Decimal -> Fraction is slow and the safety factor is one setting: convert it once."""
    return Fraction(value)


def hold_micros(prices: TokenPrices, *, prompt_tokens: int, max_output_tokens: int) -> int:
    """The hold for a request: the cost of its (padded) prompt plus its whole output allowance."""
    return cost_micros(prices, Usage(prompt_tokens=prompt_tokens, completion_tokens=max_output_tokens))


def affordable_output_tokens(prices: TokenPrices, *, granted_micros: int, prompt_tokens: int,
                             ceiling: int) -> int:
    """The largest output allowance (at most `ceiling`) whose hold fits in `granted_micros`.

    Chosen so that the exact cost is at most the grant, hence the rounded cost is too."""
    if prices.output == 0:
        return ceiling
    room = Fraction(granted_micros) * TOKENS_PER_PRICE_UNIT - prompt_tokens * prices.input
    if room < 0:
        return 0
    return min(ceiling, math.floor(room / prices.output))


def usd_per_token_to_per_mtok(text: object, markup: Decimal) -> Fraction | None:
    """An OpenRouter price (USD per token, a decimal string) as exact micros per million tokens, times
    (1 + markup). None for a missing, malformed or negative price (OpenRouter uses -1 for "varies")."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        return None
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        return None
    if not value.is_finite() or value < 0:
        return None
    return Fraction(value) * _MICROS_PER_USD * TOKENS_PER_PRICE_UNIT * Fraction(1 + markup)


def usd_to_micros_rounded(value: object) -> int | None:
    """A USD amount reported by an upstream (e.g. OpenRouter's usage.cost, a JSON number or string) as
    whole micros, rounded half-up. A float is read through its shortest repr, which is the decimal the
    upstream sent. None if absent or not a finite, non-negative number."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        return None
    try:
        exact = Decimal(str(value))
    except InvalidOperation:
        return None
    if not exact.is_finite() or exact < 0:
        return None
    if exact.adjusted() > 12:  # past $1e12 it is capped anyway; a huge exponent would stall the event loop
        return MAX_MICROS
    micros = Fraction(exact) * _MICROS_PER_USD
    return min(round_half_up(micros.numerator, micros.denominator), MAX_MICROS)


@dataclass(frozen=True, slots=True)
class Component:
    """One priced line of an estimate (Lumenfall's dryRun `components`)."""

    type: str  # input | output
    metric: str  # token | image | second
    quantity: int
    billable_quantity: int
    unit_price_micros: int  # per million tokens for tokens, per unit otherwise
    total_cost_micros: int
    unit_field: str = "unit_price_micros_per_mtok"

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "metric": self.metric,
            "quantity": self.quantity,
            "billable_quantity": self.billable_quantity,
            self.unit_field: self.unit_price_micros,
            "total_cost_micros": self.total_cost_micros,
        }


@dataclass(frozen=True, slots=True)
class Estimate:
    """A cost estimate whose `total_micros` is exactly the hold the real call takes."""

    total_micros: int
    components: tuple[Component, ...]

    def as_dict(self, *, model: str, provider: str, available_micros: int) -> dict[str, Any]:
        return {
            "estimated": True,
            "model": model,
            "provider": provider,
            "total_cost_micros": self.total_micros,
            "currency": "USD",
            "components": [c.as_dict() for c in self.components],
            "available_micros": available_micros,
            "sufficient_balance": available_micros >= self.total_micros,
        }


def token_estimate(prices: TokenPrices, *, counted_prompt_tokens: int, padded_prompt_tokens: int,
                   max_output_tokens: int) -> Estimate:
    """The hold of a chat request, itemised. The total is rounded once (as the hold is); the input line is
    rounded on its own and the output line takes the remainder, so the lines always add up to the total."""
    total = hold_micros(prices, prompt_tokens=padded_prompt_tokens, max_output_tokens=max_output_tokens)
    input_cost = cost_micros(prices, Usage(prompt_tokens=padded_prompt_tokens, completion_tokens=0))
    input_cost = min(input_cost, total)
    return Estimate(total, (
        Component("input", "token", counted_prompt_tokens, padded_prompt_tokens,
                  whole_micros(prices.input), input_cost),
        Component("output", "token", max_output_tokens, max_output_tokens,
                  whole_micros(prices.output), total - input_cost),
    ))
