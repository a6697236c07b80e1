"""Which providers a call tries, in which order (issue 15). The rule, as README states it:

1. A request may name providers in `provider.order` (OpenRouter's field): those go first, in its order. With
   `provider.allow_fallbacks: false` only they are tried. `provider.only` keeps just the named ones and
   `provider.ignore` drops the named ones. A name the model does not have is a 400 naming it.
2. The others follow by `priority`, lower first; providers of equal priority are shuffled for each call in
   proportion to their `weight` (a provider of weight 3 comes first three times as often as one of weight 1).
3. A provider whose circuit breaker is open (gateway.breaker) is skipped without being called.

A model configured without `providers` has one provider, its upstream; its `provider` field, if any, is not read
here but forwarded to that upstream as before (OpenRouter routes among its own providers with it).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from billing.catalog_config import ImageProviderConfig, ModelConfig, TextProviderConfig, VideoProviderConfig
from billing.pricing import TokenPrices
from gateway.breaker import Breakers
from gateway.errors import invalid

ProviderConfig = TextProviderConfig | ImageProviderConfig | VideoProviderConfig
# The fields of a request's `provider` object Meterline reads for a model with providers.
PREFERENCE_FIELDS = frozenset({"order", "allow_fallbacks", "only", "ignore"})


@dataclass(frozen=True, slots=True)
class Route:
    """One provider of a model: the name it is known by, its upstream, the model id sent there and its cost
    price (None for a model without `providers`, whose upstream's reported cost is all there is)."""

    name: str
    upstream: str
    model: str
    priority: int = 1
    weight: int = 1
    cost: ProviderConfig | None = None

    @property
    def breaker_key(self) -> tuple[str, str]:
        return (self.upstream, self.model)

    def media_cost_micros(self, quantity: int) -> int | None:
        """A media provider's configured cost of `quantity` images or seconds (None: no cost price)."""
        if isinstance(self.cost, ImageProviderConfig):
            return self.cost.per_image_cost_micros * quantity
        if isinstance(self.cost, VideoProviderConfig):
            return self.cost.per_second_cost_micros * quantity
        return None

    @property
    def cost_prices(self) -> TokenPrices | None:
        """A text provider's configured cost price, as token prices (what the call cost us when the provider
        reports no cost of its own)."""
        cost = self.cost
        if not isinstance(cost, TextProviderConfig):
            return None
        cached = cost.cached_input_cost_per_mtok_micros
        return TokenPrices(Fraction(cost.input_cost_per_mtok_micros), Fraction(cost.output_cost_per_mtok_micros),
                           None if cached is None else Fraction(cached))


def routes_of(config: ModelConfig | None, *, upstream: str, forwarded_id: str) -> list[Route]:
    """A model's providers; a model without `providers` has one, its upstream (under its forwarded id)."""
    providers: Sequence[ProviderConfig] | None = getattr(config, "providers", None)
    if not providers:
        return [Route(name=upstream, upstream=upstream, model=forwarded_id)]
    return [Route(name=p.provider_name, upstream=p.upstream, model=p.model, priority=p.priority, weight=p.weight,
                  cost=p) for p in providers]


@dataclass(frozen=True, slots=True)
class Preference:
    order: tuple[str, ...] = ()
    allow_fallbacks: bool = True
    only: frozenset[str] | None = None
    ignore: frozenset[str] = frozenset()


def _names(value: Any, field: str, known: set[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise invalid(f"{field} must be an array of provider names", field)
    unknown = [name for name in value if name not in known]
    if unknown:
        raise invalid(f"{field} names {', '.join(repr(n) for n in unknown[:5])}, which this model does not have; "
                      f"its providers are {', '.join(sorted(known))}", field)
    return tuple(dict.fromkeys(value))


def parse_preference(raw: Mapping[str, Any] | None, routes: Sequence[Route]) -> Preference:
    """A request's `provider` object, for a model with providers; a 400 names what is wrong with it."""
    if raw is None:
        return Preference()
    unknown = sorted(set(raw) - PREFERENCE_FIELDS)
    if unknown:
        raise invalid(f"provider.{unknown[0]} is not supported: this model's providers are chosen by Meterline "
                      f"(provider takes {', '.join(sorted(PREFERENCE_FIELDS))})", f"provider.{unknown[0]}")
    known = {route.name for route in routes}
    allow = raw.get("allow_fallbacks", True)
    if not isinstance(allow, bool):
        raise invalid("provider.allow_fallbacks must be a boolean", "provider.allow_fallbacks")
    return Preference(
        order=_names(raw["order"], "provider.order", known) if "order" in raw else (),
        allow_fallbacks=allow,
        only=frozenset(_names(raw["only"], "provider.only", known)) if "only" in raw else None,
        ignore=frozenset(_names(raw["ignore"], "provider.ignore", known)) if "ignore" in raw else frozenset(),
    )


def _weighted_shuffle(routes: list[Route], rng: random.Random) -> list[Route]:
    """Order by priority; equal priorities by a weighted random draw (Efraimidis-Spirakis: u ** (1 / w), largest
    first, puts a route first with probability weight / total weight)."""
    keyed = [(route.priority, -(rng.random() ** (1 / route.weight)), index, route) for index, route in
             enumerate(routes)]
    return [route for *_, route in sorted(keyed)]


def order(routes: Sequence[Route], preference: Preference, breakers: Breakers | None,
          rng: random.Random) -> tuple[list[Route], list[Route]]:
    """The providers to try, in order, and those skipped because their breaker is open."""
    if len(routes) == 1 and breakers is None:  # a model with one upstream: nothing to order
        return list(routes), []
    allowed = [route for route in routes
               if (preference.only is None or route.name in preference.only) and route.name not in preference.ignore]
    by_name = {route.name: route for route in allowed}
    first = [by_name[name] for name in preference.order if name in by_name]
    rest = [] if not preference.allow_fallbacks and preference.order else _weighted_shuffle(
        [route for route in allowed if route.name not in preference.order], rng)
    candidates = first + rest
    if breakers is None:
        return candidates, []
    healthy = [route for route in candidates if breakers.available(route.breaker_key)]
    return healthy, [route for route in candidates if route not in healthy]
