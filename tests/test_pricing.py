"""The pricing arithmetic: exact costs rounded once half-up, holds that cover every charge they allow, the
affordable output for a short balance, and exact conversion of upstream USD prices."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing import pricing
from billing.pricing import TokenPrices, Usage

tokens_st = st.integers(min_value=0, max_value=10_000_000)
price_st = st.fractions(min_value=0, max_value=100_000_000, max_denominator=10**9)
prices_st = st.builds(TokenPrices, price_st, price_st, st.none() | price_st)


def decimal_half_up(value: Fraction) -> int:
    """An independent rounding: Decimal with ample precision, ROUND_HALF_UP to an integer."""
    with localcontext() as ctx:
        ctx.prec = 200
        exact = Decimal(value.numerator) / Decimal(value.denominator)
        return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


@given(prices_st, tokens_st, tokens_st, tokens_st)
def test_cost_is_the_exact_rule_rounded_once_half_up(
    prices: TokenPrices, prompt: int, completion: int, cached: int
) -> None:
    cached = min(cached, prompt)
    cached_price = prices.input if prices.cached_input is None else prices.cached_input
    exact = ((prompt - cached) * prices.input + cached * cached_price + completion * prices.output) / 10**6
    assert pricing.cost_micros(prices, Usage(prompt, completion, cached)) == decimal_half_up(exact)


@pytest.mark.parametrize(("prices", "usage", "micros"), [
    (TokenPrices(Fraction(1), Fraction(1)), Usage(499_999, 0), 0),
    (TokenPrices(Fraction(1), Fraction(1)), Usage(500_000, 0), 1),  # exactly half rounds up
    (TokenPrices(Fraction(1), Fraction(1)), Usage(250_000, 250_000), 1),  # rounded once, not per part
    (TokenPrices(Fraction(500_000), Fraction(3_000_000), Fraction(50_000)), Usage(1_234, 567, 200, 100), 2_228),
    (TokenPrices(Fraction(500_000), Fraction(3_000_000)), Usage(0, 0), 0),
    (TokenPrices(Fraction(10), Fraction(10)), Usage(100, 0, cached_tokens=500), 0),  # cached clamped to prompt
], ids=["below-half", "half", "once-per-call", "seed-model", "zero", "cached-clamped"])
def test_cost_examples(prices: TokenPrices, usage: Usage, micros: int) -> None:
    assert pricing.cost_micros(prices, usage) == micros


@given(prices_st, tokens_st, tokens_st, tokens_st, tokens_st)
def test_a_hold_covers_any_usage_within_its_allowance(
    prices: TokenPrices, prompt: int, max_output: int, used_prompt: int, used_output: int
) -> None:
    used = Usage(min(used_prompt, prompt), min(used_output, max_output))
    hold = pricing.hold_micros(prices, prompt_tokens=prompt, max_output_tokens=max_output)
    assert pricing.cost_micros(prices, used) <= hold


@given(prices_st, tokens_st, st.integers(min_value=0, max_value=10**9), st.integers(min_value=1, max_value=10**6))
def test_affordable_output_is_the_largest_allowance_the_grant_covers(
    prices: TokenPrices, prompt: int, granted: int, ceiling: int
) -> None:
    cap = pricing.affordable_output_tokens(prices, granted_micros=granted, prompt_tokens=prompt, ceiling=ceiling)
    assert 0 <= cap <= ceiling
    if prices.output == 0:
        assert cap == ceiling
        return
    if cap > 0:
        assert pricing.hold_micros(prices, prompt_tokens=prompt, max_output_tokens=cap) <= granted
    if cap < ceiling:  # one more token would cost more than the grant, exactly
        assert pricing.exact_cost(prices, Usage(prompt, cap + 1)) > granted


@given(st.decimals(min_value=0, max_value=1, places=15, allow_nan=False, allow_infinity=False),
       st.decimals(min_value=0, max_value=3, places=4, allow_nan=False, allow_infinity=False))
def test_upstream_usd_per_token_prices_convert_exactly(price: Decimal, markup: Decimal) -> None:
    converted = pricing.usd_per_token_to_per_mtok(str(price), markup)
    assert converted == Fraction(price) * 10**12 * (1 + Fraction(markup))


@pytest.mark.parametrize("text", ["-1", "abc", "", None, True, "NaN", "Infinity", [1]],
                         ids=["negative", "word", "empty", "none", "bool", "nan", "inf", "list"])
def test_unusable_upstream_prices_are_refused(text: object) -> None:
    assert pricing.usd_per_token_to_per_mtok(text, Decimal(0)) is None


@pytest.mark.parametrize(("value", "micros"), [
    (0.000123, 123), ("0.0000125", 13), (0.0000124999, 12), (2, 2_000_000), (0, 0), (None, None),
    (-0.5, None), ("x", None), (True, None), ("1e100000000", 2**63 - 1), ("999999999999", 999999999999_000_000),
], ids=["float", "half-up", "below-half", "int", "zero", "absent", "negative", "text", "bool", "huge-exponent",
        "largest-exact"])
def test_upstream_reported_usd_to_micros(value: object, micros: int | None) -> None:
    assert pricing.usd_to_micros_rounded(value) == micros


@given(prices_st, st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=10**6))
def test_estimate_lines_add_up_to_the_hold(prices: TokenPrices, prompt: int, output: int) -> None:
    padded = pricing.padded_prompt_tokens(prompt, Decimal("1.1"))
    estimate = pricing.token_estimate(prices, counted_prompt_tokens=prompt, padded_prompt_tokens=padded,
                                      max_output_tokens=output)
    assert estimate.total_micros == pricing.hold_micros(prices, prompt_tokens=padded, max_output_tokens=output)
    assert sum(c.total_cost_micros for c in estimate.components) == estimate.total_micros
    assert all(c.total_cost_micros >= 0 for c in estimate.components)


@pytest.mark.parametrize(("counted", "factor", "padded"), [
    (0, "1.1", 0), (10, "1.1", 11), (11, "1.1", 13), (100, "1", 100), (3, "1.05", 4),
])
def test_prompt_padding_rounds_up(counted: int, factor: str, padded: int) -> None:
    assert pricing.padded_prompt_tokens(counted, Decimal(factor)) == padded


@pytest.mark.parametrize(("raw", "usage"), [
    ({"prompt_tokens": 10, "completion_tokens": 5}, Usage(10, 5)),
    ({"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4},
      "completion_tokens_details": {"reasoning_tokens": 2}}, Usage(10, 5, 4, 2)),
    ({"prompt_tokens": 0, "completion_tokens": 0}, Usage(0, 0)),
    ({"prompt_tokens": 10}, None),
    ({"prompt_tokens": "10", "completion_tokens": 5}, None),
    ({"prompt_tokens": -1, "completion_tokens": 5}, None),
    (None, None),
    ([], None),
], ids=["plain", "details", "zero", "no-completion", "string", "negative", "none", "list"])
def test_usage_parsing(raw: object, usage: Usage | None) -> None:
    assert pricing.parse_usage(raw) == usage
