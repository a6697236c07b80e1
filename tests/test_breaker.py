"""The circuit breaker's rule (gateway/breaker.py), stated as properties over any sequence of calls, outcomes and
passing time, plus the plain story: N failures open it, the cool-down half-opens it, one trial closes or reopens."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.breaker import CLOSED, HALF_OPEN, OPEN, Breakers

THRESHOLD, COOLDOWN = 3, 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_open_it_the_cooldown_half_opens_it_and_one_trial_decides() -> None:
    clock, changes = Clock(), []
    breakers = Breakers(threshold=3, cooldown_seconds=10, clock=clock,
                        on_change=lambda key, state: changes.append((key, state)))
    for _ in range(2):
        assert breakers.acquire("a")
        breakers.failed("a")
    assert breakers.state("a") == CLOSED
    breakers.succeeded("a")  # a success in between: the count starts again
    for _ in range(3):
        assert breakers.acquire("a")
        breakers.failed("a")
    assert breakers.state("a") == OPEN and not breakers.acquire("a")
    assert breakers.retry_in("a") == 10.0
    assert breakers.state("b") == CLOSED  # breakers are per provider
    clock.now += 9.999
    assert not breakers.acquire("a")
    clock.now += 0.001
    assert breakers.acquire("a")  # the trial
    assert not breakers.acquire("a")  # only one at a time
    breakers.failed("a")
    assert breakers.state("a") == OPEN and breakers.retry_in("a") == 10.0
    clock.now += 10
    assert breakers.acquire("a")
    breakers.release("a")  # the client left: the trial is given back
    assert breakers.acquire("a")
    breakers.succeeded("a")
    assert breakers.state("a") == CLOSED and breakers.acquire("a") and breakers.acquire("a")
    assert changes == [("a", OPEN), ("a", HALF_OPEN), ("a", OPEN), ("a", HALF_OPEN), ("a", CLOSED)]


@pytest.mark.parametrize(("threshold", "cooldown"), [(0, 1.0), (1, 0.0)])
def test_a_breaker_that_could_never_close_or_open_is_refused(threshold: int, cooldown: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        Breakers(threshold=threshold, cooldown_seconds=cooldown)


class BreakerRules(RuleBasedStateMachine):
    """Any interleaving of calls to two providers against a reference model of the rule."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.breakers = Breakers(threshold=THRESHOLD, cooldown_seconds=COOLDOWN, clock=self.clock)
        self.model: dict[Hashable, dict[str, float | int | bool | str]] = {}
        self.out: dict[Hashable, int] = {"a": 0, "b": 0}  # calls acquired and not yet ended

    def _m(self, key: str) -> dict[str, float | int | bool | str]:
        m = self.model.setdefault(key, {"state": CLOSED, "failures": 0, "opened": 0.0, "trial": False})
        if m["state"] == OPEN and self.clock.now - float(m["opened"]) >= COOLDOWN:
            m["state"], m["trial"] = HALF_OPEN, False
        return m

    @rule(key=st.sampled_from("ab"))
    def acquire(self, key: str) -> None:
        m = self._m(key)
        expected = m["state"] == CLOSED or (m["state"] == HALF_OPEN and not m["trial"])
        if m["state"] == HALF_OPEN and expected:
            m["trial"] = True
        assert self.breakers.acquire(key) == expected
        if expected:
            self.out[key] += 1

    @precondition(lambda self: any(self.out.values()))
    @rule(key=st.sampled_from("ab"), outcome=st.sampled_from(["succeeded", "failed", "release"]))
    def end(self, key: str, outcome: str) -> None:
        if not self.out[key]:
            return
        self.out[key] -= 1
        m = self._m(key)
        if outcome == "succeeded":
            m.update(state=CLOSED, failures=0, trial=False)
        elif outcome == "failed":
            if m["state"] == HALF_OPEN:
                m.update(state=OPEN, opened=self.clock.now, trial=False)
            elif m["state"] == CLOSED:
                m["failures"] = int(m["failures"]) + 1
                if m["failures"] >= THRESHOLD:
                    m.update(state=OPEN, opened=self.clock.now, failures=0)
        elif m["state"] == HALF_OPEN:
            m["trial"] = False
        getattr(self.breakers, outcome)(key)

    @rule(seconds=st.sampled_from([0.5, 3.0, 9.99, 10.0, 25.0]))
    def wait(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def agrees(self) -> None:
        for key in "ab":
            m = self._m(key)
            assert self.breakers.state(key) == m["state"]
            expected_wait = max(0.0, COOLDOWN - (self.clock.now - float(m["opened"]))) if m["state"] == OPEN else 0
            assert self.breakers.retry_in(key) == pytest.approx(expected_wait)


BreakerRules.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_the_breaker_follows_its_rule_in_any_sequence = BreakerRules.TestCase
