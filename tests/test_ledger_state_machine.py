"""A Hypothesis state machine over reserve / settle / void / top-up / expire, checked against an in-memory model.

After every step the database must agree with the model to the micro, and `verify` must find nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from billing import db, ledger
from billing.errors import InsufficientBalance
from billing.verify import verify
from tests.conftest import reset

AMOUNTS = st.integers(min_value=0, max_value=5_000)


@dataclass
class Model:
    balance: int = 0
    held: dict[str, int] = field(default_factory=dict)
    resolved: dict[str, tuple[str, int]] = field(default_factory=dict)  # request -> (state, charged)

    @property
    def available(self) -> int:
        return self.balance - sum(self.held.values())


class LedgerMachine(RuleBasedStateMachine):
    database_url = ""
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.run(db.connect(self.database_url))
        self.run(reset(self.conn))
        self.account = self.run(self.conn.fetchval(
            "INSERT INTO accounts (id, kind, name) VALUES ('acct_sm', 'customer', 'sm') RETURNING id"))
        self.model = Model()
        self.counter = 0

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.conn.close())
        self.loop.close()

    @rule(amount=st.integers(min_value=1, max_value=20_000))
    def top_up(self, amount: int) -> None:
        self.run(ledger.post(self.conn, account_id=self.account, kind="topup", amount_micros=amount,
                             description=None))
        self.model.balance += amount

    @rule(target=holds, amount=AMOUNTS)
    def reserve(self, amount: int) -> str:
        self.counter += 1
        rid = f"req_{self.counter}"
        expected_ok = self.model.available >= amount and self.model.available >= 0
        try:
            got = self.run(ledger.reserve(self.conn, request_id=rid, account_id=self.account,
                                          amount_micros=amount, ttl_seconds=3600))
        except InsufficientBalance as refused:
            assert not expected_ok, f"refused a hold of {amount} with {self.model.available} available"
            assert refused.available_micros == self.model.available
            return rid
        assert expected_ok, f"granted a hold of {amount} with only {self.model.available} available"
        assert got.granted_micros == amount
        self.model.held[rid] = amount
        return rid

    @rule(rid=holds, actual=st.integers(min_value=0, max_value=8_000))
    def settle(self, rid: str, actual: int) -> None:
        if rid not in self.model.held and rid not in self.model.resolved:
            return  # a refused reservation: there is no hold to settle
        outcome = self.run(ledger.settle(self.conn, request_id=rid, actual_micros=actual))
        if rid in self.model.held:
            held = self.model.held.pop(rid)
            assert (outcome.state, outcome.replayed, outcome.actual_micros) == ("settled", False, actual)
            assert outcome.overrun_micros == max(actual - held, 0)
            self.model.balance -= actual
            self.model.resolved[rid] = ("settled", actual)
        else:
            state, charged = self.model.resolved[rid]
            if state == "expired":  # a late charge is still posted, once
                assert (outcome.state, outcome.replayed, outcome.overrun_micros) == ("settled", False, actual)
                self.model.balance -= actual
                self.model.resolved[rid] = ("settled", actual)
            else:
                assert (outcome.state, outcome.replayed, outcome.actual_micros) == (state, True, charged)

    @rule(rid=holds)
    def void(self, rid: str) -> None:
        if rid not in self.model.held and rid not in self.model.resolved:
            return
        outcome = self.run(ledger.void(self.conn, request_id=rid, reason="test"))
        if rid in self.model.held:
            self.model.held.pop(rid)
            assert (outcome.state, outcome.replayed) == ("voided", False)
            self.model.resolved[rid] = ("voided", 0)
        else:
            assert (outcome.state, outcome.replayed) == (self.model.resolved[rid][0], True)

    @rule(rid=consumes(holds))
    def expire(self, rid: str) -> None:
        if rid not in self.model.held:
            return
        # Move the hold's expiry into the past with the database clock, then sweep.
        self.run(self.conn.execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE request_id = $1", rid))
        assert self.run(ledger.sweep(self.conn)) == 1
        self.model.held.pop(rid)
        self.model.resolved[rid] = ("expired", 0)

    @invariant()
    def database_matches_the_model(self) -> None:
        row = self.run(self.conn.fetchrow(
            "SELECT credits_posted - debits_posted AS balance, held_micros FROM accounts WHERE id = $1",
            self.account))
        assert (row["balance"], row["held_micros"]) == (self.model.balance, sum(self.model.held.values()))
        assert self.run(verify(self.conn)) == []


@pytest.mark.timeout(300)
def test_ledger_state_machine(database_url: str) -> None:
    LedgerMachine.database_url = database_url
    machine_test = LedgerMachine.TestCase
    machine_test.settings = settings(
        max_examples=25, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    machine_test("runTest").runTest()
