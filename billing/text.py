"""Pricing and holding a chat call: the output allowance, the prompt's estimate, the hold, and what a short balance
affords. The rules are README's "The hold"; the arithmetic is billing.pricing's.

A prompt longer than `bound_above_chars` is first quoted on its byte bound (tokens.Prompt.bound), which holds at
least what counting would, without counting (~40 ns a byte) before the upstream is even called. The bound is used
only for a hold covered in full; otherwise the prompt is counted and the counted rule decides (a reduced output
limit, or a refusal), so a short balance gets exactly the answer counting gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from billing import ledger, pricing, tokens
from billing.errors import InsufficientBalance, KeyLimitExceeded
from billing.holds import Hold
from billing.ledger import Reservation
from billing.pricing import Estimate, TokenPrices

# No ordinary text of the tokenizers in use upstream spends fewer than this many UTF-8 bytes a token on average,
# while cl100k_base packs runs of spaces or of one character many to a token: the prompt is held on at least
# its bytes over this, so such input is not held far below what another tokenizer bills for it.
BYTES_PER_TOKEN_FLOOR = 4


@dataclass(frozen=True, slots=True)
class HoldRules:
    """The settings a chat hold follows."""

    safety_factor: Decimal  # the prompt's count is multiplied by this
    min_output_tokens: int  # the least output a reduced limit may leave; below it, 402
    bound_above_chars: int  # longer prompts are held on their byte bound first
    default_max_output_tokens: int  # the allowance of a model that publishes no output limit
    overhead_per_message: int = 0  # chat-template tokens a provider may add to each message, beyond OpenAI's 3
    overhead_per_request: int = 0  # and to each request (a default system prompt, the reply's header)
    overhead_with_tools: int = 0  # and when tools are defined (a tool-use system prompt)


def held_prompt_tokens(prompt: tokens.Prompt, counted: int, rules: HoldRules) -> int:
    """The prompt tokens a hold assumes: the count (or bound), at least the text's bytes over
    BYTES_PER_TOKEN_FLOOR, times the safety factor, plus the chat-template overheads."""
    floor = -(-prompt.text_bytes() // BYTES_PER_TOKEN_FLOOR) + prompt.framing + prompt.images * tokens.IMAGE_PART_TOKENS
    padded = pricing.padded_prompt_tokens(max(counted, floor), rules.safety_factor)
    return (padded + rules.overhead_per_message * prompt.messages + rules.overhead_per_request
            + (rules.overhead_with_tools if prompt.tools else 0))


def output_allowance(asked: int | None, model_limit: int | None, rules: HoldRules) -> int:
    """The per-choice output limit a call is held for and sent with: what the client asked, capped at the model's
    limit; without either, the model's limit or (a model that publishes none) `default_max_output_tokens`."""
    ceiling = model_limit or rules.default_max_output_tokens
    return min(asked, ceiling) if asked is not None else ceiling


class TextQuote:
    """A chat call priced for its hold. `counted` is the prompt's token count, or (`exact` False) its byte bound."""

    __slots__ = ("counted", "estimate", "exact", "max_output", "minimum", "n", "padded", "prices", "prompt",
                 "rules")

    def __init__(self, prompt: tokens.Prompt, prices: TokenPrices, *, counted: int, exact: bool, max_output: int,
                 n: int, rules: HoldRules) -> None:
        self.prompt = prompt
        self.prices = prices
        self.counted = counted
        self.exact = exact
        self.max_output = max_output
        self.n = n
        self.rules = rules
        self.padded = held_prompt_tokens(prompt, counted, rules)
        self.estimate: Estimate = pricing.token_estimate(prices, counted_prompt_tokens=counted,
                                                         padded_prompt_tokens=self.padded,
                                                         max_output_tokens=max_output * n)
        self.minimum = pricing.hold_micros(prices, prompt_tokens=self.padded,
                                           max_output_tokens=min(rules.min_output_tokens, max_output) * n)

    @classmethod
    async def of(cls, prompt: tokens.Prompt, prices: TokenPrices, *, max_output: int, n: int,
                 rules: HoldRules) -> TextQuote:
        """Quote on the byte bound when the prompt is long, else on its count."""
        if len(prompt.text) > rules.bound_above_chars:
            return cls(prompt, prices, counted=prompt.bound(), exact=False, max_output=max_output, n=n, rules=rules)
        return cls(prompt, prices, counted=await prompt.count(), exact=True, max_output=max_output, n=n, rules=rules)

    async def counted_quote(self) -> TextQuote:
        """This quote again on the prompt's count (for a bounded one)."""
        if self.exact:
            return self
        return TextQuote(self.prompt, self.prices, counted=await self.prompt.count(), exact=True,
                         max_output=self.max_output, n=self.n, rules=self.rules)

    async def prompt_tokens(self) -> int:
        """The prompt's count, for a charge estimated because the upstream reported no usage."""
        return self.counted if self.exact else await self.prompt.count()

    def output_tokens(self, granted_micros: int) -> int:
        """The per-choice output limit the granted hold affords: the whole allowance when it was granted in full."""
        if granted_micros >= self.estimate.total_micros:
            return self.max_output
        total = pricing.affordable_output_tokens(self.prices, granted_micros=granted_micros,
                                                 prompt_tokens=self.padded, ceiling=self.max_output * self.n)
        # The minimum hold is rounded like any cost, so the floor can land a token short of the minimum.
        return max(total // self.n, min(self.rules.min_output_tokens, self.max_output))


async def reserve(hold: Hold, quote: TextQuote) -> tuple[TextQuote, Reservation, int]:
    """Take the hold; returns the quote it was taken on, the reservation and the per-choice output limit it
    affords. A bounded prompt is first held in full on its bound; only if the balance or the key's limit cannot
    cover that is it counted. A refused hold writes nothing, so the second attempt reuses the request id."""
    if not quote.exact:
        total = quote.estimate.total_micros
        try:
            reservation = await hold.reserve(total, min_micros=total)
            return quote, reservation, quote.max_output
        except (InsufficientBalance, KeyLimitExceeded):
            quote = await quote.counted_quote()
    reservation = await hold.reserve(quote.estimate.total_micros, min_micros=quote.minimum)
    return quote, reservation, quote.output_tokens(reservation.granted_micros)


def _grants(left: int | None, amount: int) -> bool:
    """Whether meterline_reserve grants `amount` in full from `left` (None: no limit applies)."""
    return left is None or (left >= amount and left >= 0)


async def dry_run(pool: asyncpg.Pool, quote: TextQuote, *, account_id: str, key_id: str) -> tuple[TextQuote, int]:
    """The quote the real call would hold on now, and the available balance: for a bounded prompt that depends
    (as in `reserve`) on whether the balance and the key's limit cover its bound in full."""
    available, key_left = await ledger.coverable_micros(pool, account_id, key_id)
    total = quote.estimate.total_micros
    if not quote.exact and not (_grants(available, total) and _grants(key_left, total)):
        quote = await quote.counted_quote()
    return quote, available
