"""Circuit breakers: a provider that keeps failing is skipped for a while instead of being called and waited on.

One breaker per provider (an upstream and the provider's model id), in each process; health is not money, so it
is not shared through PostgreSQL: each gateway process learns a provider's failures from its own calls.

    closed     calls go through; `threshold` failures in a row open it
    open       calls are not made (the provider is skipped) until `cooldown_seconds` have passed
    half_open  one trial call goes through (others still skip it): its success closes the breaker, its failure
               opens it again for another cool-down; a trial that ends neither way (the client left) gives the
               trial back

A failure is what would make a call move on to the next provider: no connection, a timeout, a 5xx or a 429. A 4xx
caused by the request itself says nothing of the provider's health and is neither a failure nor a success.
Every state change is logged once and reported to `on_change` (the metrics).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

log = logging.getLogger("meterline.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(slots=True)
class _Circuit:
    state: str = CLOSED
    failures: int = 0  # consecutive failures while closed
    opened_at: float = 0.0
    trial: bool = False  # half-open: the one trial call is out


class Breakers:
    def __init__(self, *, threshold: int, cooldown_seconds: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[Hashable, str], None] | None = None) -> None:
        if threshold < 1 or cooldown_seconds <= 0:
            raise ValueError("a breaker needs threshold >= 1 and cooldown_seconds > 0")
        self.threshold = threshold
        self.cooldown_seconds = cooldown_seconds
        self._clock = clock
        self._on_change = on_change
        self._circuits: dict[Hashable, _Circuit] = {}

    def _circuit(self, key: Hashable) -> _Circuit:
        circuit = self._circuits.get(key)
        if circuit is None:
            circuit = self._circuits[key] = _Circuit()
        if circuit.state == OPEN and self._clock() - circuit.opened_at >= self.cooldown_seconds:
            self._move(key, circuit, HALF_OPEN)
            circuit.trial = False
        return circuit

    def _move(self, key: Hashable, circuit: _Circuit, state: str) -> None:
        if circuit.state == state:
            return
        log.warning("provider %s: circuit %s -> %s", key, circuit.state, state)
        circuit.state = state
        if self._on_change is not None:
            self._on_change(key, state)

    def state(self, key: Hashable) -> str:
        return self._circuit(key).state

    def available(self, key: Hashable) -> bool:
        """Whether a call could go to the provider now (without taking the half-open trial)."""
        circuit = self._circuit(key)
        return circuit.state == CLOSED or (circuit.state == HALF_OPEN and not circuit.trial)

    def acquire(self, key: Hashable) -> bool:
        """May a call go to the provider now? In half-open state only the first caller gets the trial; it must
        end in `succeeded`, `failed` or `release`."""
        circuit = self._circuit(key)
        if circuit.state == CLOSED:
            return True
        if circuit.state == HALF_OPEN and not circuit.trial:
            circuit.trial = True
            return True
        return False

    def succeeded(self, key: Hashable) -> None:
        circuit = self._circuit(key)
        circuit.failures = 0
        circuit.trial = False
        self._move(key, circuit, CLOSED)

    def failed(self, key: Hashable) -> None:
        circuit = self._circuit(key)
        if circuit.state == HALF_OPEN:
            circuit.trial = False
            circuit.opened_at = self._clock()
            self._move(key, circuit, OPEN)
            return
        if circuit.state == OPEN:  # a call that began before it opened: the cool-down already runs
            return
        circuit.failures += 1
        if circuit.failures >= self.threshold:
            circuit.failures = 0
            circuit.opened_at = self._clock()
            self._move(key, circuit, OPEN)

    def release(self, key: Hashable) -> None:
        """A call that ended without saying anything of the provider's health (the client left, the request's
        own fault): a half-open trial is given back to the next caller."""
        circuit = self._circuit(key)
        if circuit.state == HALF_OPEN:
            circuit.trial = False

    def retry_in(self, key: Hashable) -> float:
        """Seconds until an open breaker lets a trial through (0 when calls may go now)."""
        circuit = self._circuit(key)
        if circuit.state != OPEN:
            return 0.0
        return max(0.0, self.cooldown_seconds - (self._clock() - circuit.opened_at))
