"""Integer micros (1/1,000,000 USD) and the one rounding rule.

Amounts are `int` micros everywhere. Decimal appears only to read human input ("12.50") and to write exact USD
strings; a float never touches an amount.

The rounding rule, used for every computed price: the exact rational cost is rounded once per call, half-up to a
whole micro (costs are never negative, so half-up and half-away-from-zero agree).
"""

from __future__ import annotations

from decimal import Decimal, DecimalException, InvalidOperation
from typing import NewType

from billing.errors import InvalidAmount

Micros = NewType("Micros", int)

MICROS_PER_USD = 1_000_000
MAX_MICROS = 2**63 - 1  # PostgreSQL bigint


def round_half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half-up to an integer, for numerator >= 0 and denominator > 0."""
    if numerator < 0 or denominator <= 0:
        raise ValueError("round_half_up takes a non-negative numerator and a positive denominator")
    return (2 * numerator + denominator) // (2 * denominator)


def usd_to_micros(text: str) -> int:
    """Parse a human USD amount ("12.50") into micros exactly; refuse anything finer than a micro."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidAmount("amount_usd must be a decimal string such as \"12.50\"")
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise InvalidAmount(f"amount_usd {text!r} is not a decimal number") from None
    if not value.is_finite():
        raise InvalidAmount(f"amount_usd {text!r} is not a finite number")
    try:
        micros = value * MICROS_PER_USD
    except DecimalException:  # an exponent past what Decimal's context can hold
        raise InvalidAmount(f"amount_usd {text!r} is outside the range of a 64-bit integer") from None
    if micros != micros.to_integral_value():
        raise InvalidAmount(f"amount_usd {text!r} is finer than one micro (0.000001 USD)")
    result = int(micros)
    check_range(result)
    return result


def check_range(micros: int) -> int:
    if abs(micros) > MAX_MICROS:
        raise InvalidAmount(f"amount {micros} micros is outside the range of a 64-bit integer")
    return micros


def micros_to_usd(micros: int) -> Decimal:
    """The exact USD value of an amount of micros."""
    return Decimal(micros).scaleb(-6)


def format_usd(micros: int) -> str:
    """Exact USD decimal string with six places, e.g. 12500000 -> "12.500000"."""
    return f"{micros_to_usd(micros):.6f}"
