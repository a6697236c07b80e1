"""A Hypothesis state machine over credit grants (issue 16): grants (paid and promotional, with priorities,
future effective times and expiries), top-ups, holds, charges (overruns included), voids, refunds, negative
adjustments, grant sweeps and a pinned clock moved forward, checked against an independent model of the rules
billing/grants.py states.

After every step, the database must agree with the model grant by grant (remaining, spent, expired: the spending
order), the balance and holds must match, the ledger must be zero-sum with no overspend (`verify`), and the
statement identity (opening + credits - debits = closing, expiries as their own kind) must hold.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from billing import db, grants, ledger, statements
from billing.errors import InsufficientBalance
from billing.verify import verify
from tests.conftest import reset

TICK = timedelta(minutes=1)
BASE = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)


@dataclass
class Grant:
    id: str
    category: str
    priority: int
    amount: int
    effective: int  # ticks after BASE
    expires: int | None
    seq: int  # the order grants were made in
    posted: bool = False
    remaining: int = 0
    spent: int = 0
    expired: int = 0


@dataclass
class Model:
    """The rules, written again from their statement: nothing here calls the code under test."""

    clock: int = 0
    balance: int = 0
    grants: list[Grant] = field(default_factory=list)
    held: dict[str, int] = field(default_factory=dict)
    settled: set[str] = field(default_factory=set)
    expired_total: int = 0
    debt_allowed: int = 0  # overruns and refunds past the balance: the only ways below zero available

    @property
    def available(self) -> int:
        return self.balance - sum(self.held.values())

    def due(self, g: Grant) -> bool:
        return g.expires is not None and g.expires <= self.clock

    def post(self, g: Grant) -> None:
        before = self.balance
        self.balance += g.amount
        debt = min(g.amount, max(0, -before))
        g.posted, g.remaining, g.spent = True, g.amount - debt, debt

    def to_clock(self) -> None:
        """Post the grants whose time has come, then expire what pending holds do not need."""
        for g in sorted((g for g in self.grants if not g.posted and g.effective <= self.clock),
                        key=lambda g: (g.effective, g.id)):
            self.post(g)
        live = [g for g in self.grants if g.posted and g.remaining > 0]
        expiring = sum(g.remaining for g in live if self.due(g))
        kept = sum(g.remaining for g in live if not self.due(g))
        to_expire = expiring - min(expiring, max(0, sum(self.held.values()) - kept))
        for g in sorted((g for g in live if self.due(g)), key=lambda g: (g.expires or 0, g.id)):
            take = min(g.remaining, to_expire)
            g.remaining -= take
            g.expired += take
            self.balance -= take
            self.expired_total += take
            to_expire -= take

    def draw(self, amount: int, *, paid_first: bool) -> None:
        def order(g: Grant) -> tuple[object, ...]:
            other = "promotional" if paid_first else "paid"
            return (self.due(g), g.category == other, g.priority,
                    (1, 0) if g.expires is None else (0, g.expires), g.effective, g.seq)

        for g in sorted((g for g in self.grants if g.remaining > 0), key=order):
            take = min(g.remaining, amount)
            g.remaining -= take
            g.spent += take
            amount -= take


AMOUNT = st.integers(min_value=1, max_value=10_000)


class GrantsMachine(RuleBasedStateMachine):
    database_url = ""
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.run(db.connect(self.database_url))
        self.run(reset(self.conn))
        self.account = self.run(self.conn.fetchval(
            "INSERT INTO accounts (id, kind, name) VALUES ('acct_gm', 'customer', 'gm') RETURNING id"))
        self.model = Model()
        self.counter = 0
        self.pin()

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.conn.close())
        self.loop.close()

    def at(self, ticks: int) -> datetime:
        return BASE + ticks * TICK

    def pin(self) -> None:
        self.run(self.conn.execute(f"SET meterline.now = '{self.at(self.model.clock).isoformat()}'"))

    def due_in_db(self) -> bool:
        """Whether the database would bring the grants to the clock now (grants_due_at has come)."""
        return bool(self.run(self.conn.fetchval(
            "SELECT COALESCE(grants_due_at <= meterline_now(), false) FROM accounts WHERE id = $1", self.account)))

    @rule(category=st.sampled_from(["paid", "promotional"]), priority=st.sampled_from([0, 50, 100]),
          amount=AMOUNT, starts=st.sampled_from([None, 0, 1, 2]), lasts=st.sampled_from([None, 1, 2, 4]))
    def grant(self, category: str, priority: int, amount: int, starts: int | None, lasts: int | None) -> None:
        effective = self.model.clock + (starts or 0)
        expires = None if lasts is None else effective + lasts
        row = self.run(grants.create_grant(
            self.conn, account_id=self.account, category=category, amount_micros=amount, priority=priority,
            effective_at=None if starts is None else self.at(effective),
            expires_at=None if expires is None else self.at(expires)))
        self.model.to_clock()
        g = Grant(row["id"], category, priority, amount, effective, expires, len(self.model.grants))
        self.model.grants.append(g)
        if effective <= self.model.clock:
            self.model.post(g)

    @rule(amount=AMOUNT)
    def top_up(self, amount: int) -> None:
        posting = self.run(ledger.post(self.conn, account_id=self.account, kind="topup", amount_micros=amount,
                                       description=None))
        self.model.to_clock()
        grant_id = self.run(self.conn.fetchval("SELECT id FROM credit_grants WHERE transfer_id = $1",
                                               posting.transfer_id))
        g = Grant(grant_id, "paid", grants.DEFAULT_PRIORITY, amount, self.model.clock, None, len(self.model.grants))
        self.model.grants.append(g)
        self.model.post(g)

    @rule(target=holds, amount=st.integers(min_value=0, max_value=3_000))
    def reserve(self, amount: int) -> str:
        self.counter += 1
        rid = f"req_{self.counter}"
        self.model.to_clock()
        expected = self.model.available >= amount and self.model.available >= 0
        try:
            self.run(ledger.reserve(self.conn, request_id=rid, account_id=self.account, amount_micros=amount,
                                    ttl_seconds=3600))
        except InsufficientBalance as refused:
            assert not expected, f"refused {amount} with {self.model.available} available"
            assert refused.available_micros == self.model.available
            return rid
        assert expected, f"granted {amount} with only {self.model.available} available"
        self.model.held[rid] = amount
        return rid

    @rule(rid=holds, part=st.sampled_from([0, 0.5, 1, 1, 1.25]))
    def settle(self, rid: str, part: float) -> None:
        if rid not in self.model.held:
            return
        held = self.model.held.pop(rid)
        actual = int(held * part)
        outcome = self.run(ledger.settle(self.conn, request_id=rid, actual_micros=actual))
        assert (outcome.state, outcome.replayed, outcome.actual_micros) == ("settled", False, actual)
        self.model.debt_allowed += max(0, actual - held)
        self.model.balance -= actual
        self.model.draw(actual, paid_first=False)
        self.model.to_clock()
        self.model.settled.add(rid)

    @rule(rid=holds)
    def void(self, rid: str) -> None:
        if rid not in self.model.held:
            return
        self.model.held.pop(rid)
        self.run(ledger.void(self.conn, request_id=rid, reason="test"))
        self.model.to_clock()

    @rule(amount=st.integers(min_value=1, max_value=1_000))
    def refund(self, amount: int) -> None:
        self.run(ledger.post(self.conn, account_id=self.account, kind="refund", amount_micros=-amount,
                             description="refund", overdraw=True))
        self.model.to_clock()
        self.model.debt_allowed += amount
        self.model.balance -= amount
        self.model.draw(amount, paid_first=True)

    @rule(amount=st.integers(min_value=1, max_value=3_000))
    def take_back(self, amount: int) -> None:
        before = copy.deepcopy(self.model)
        self.model.to_clock()
        try:
            self.run(ledger.post(self.conn, account_id=self.account, kind="adjustment", amount_micros=-amount,
                                 description="correction"))
        except InsufficientBalance:
            assert self.model.available < amount
            self.model = before  # refused: its transaction, the grants brought to the clock included, is undone
            return
        assert self.model.available >= amount
        self.model.balance -= amount
        self.model.draw(amount, paid_first=True)

    @rule(ticks=st.integers(min_value=1, max_value=3))
    def advance(self, ticks: int) -> None:
        self.model.clock += ticks
        self.pin()

    @rule(target=holds, category=st.sampled_from(["paid", "promotional"]), amount=AMOUNT,
          share=st.sampled_from([0.25, 0.5, 1.0]), ticks=st.integers(min_value=1, max_value=2))
    def hold_across_an_expiry(self, category: str, amount: int, share: float, ticks: int) -> str:
        """Credit that expires next tick, a hold on part of what is available, then the clock moved past the
        expiry while the hold is pending."""
        self.grant(category, 0, amount, None, 1)
        rid = self.reserve(max(0, int(self.model.available * share)))
        self.advance(ticks)
        return rid

    @rule()
    def sweep(self) -> None:
        due = self.due_in_db()
        assert self.run(grants.sweep(self.conn)) == int(due)
        self.model.to_clock()
        # Still due only while expired credit is kept for the holds pending when it expired.
        assert self.due_in_db() == any(g.remaining > 0 and self.model.due(g) for g in self.model.grants)

    @invariant()
    def database_matches_the_model(self) -> None:
        rows = self.run(self.conn.fetch(
            "SELECT id, posted_at IS NOT NULL AS posted, remaining_micros, spent_micros, expired_micros"
            " FROM credit_grants WHERE account_id = $1", self.account))
        assert {r["id"]: (r["posted"], r["remaining_micros"], r["spent_micros"], r["expired_micros"])
                for r in rows} == {g.id: (g.posted, g.remaining, g.spent, g.expired) for g in self.model.grants}
        row = self.run(self.conn.fetchrow(
            "SELECT credits_posted - debits_posted AS balance, held_micros FROM accounts WHERE id = $1",
            self.account))
        assert (row["balance"], row["held_micros"]) == (self.model.balance, sum(self.model.held.values()))
        # No overspend: below zero available only by what overruns and refunds took (verify's overdraft check
        # says the same from the ledger alone).
        assert self.model.available >= -self.model.debt_allowed
        assert self.run(verify(self.conn)) == []
        stmt = self.run(statements.statement(self.conn, account_id=self.account, start=BASE - timedelta(days=2),
                                             end=BASE + timedelta(days=2)))
        assert stmt["opening_balance_micros"] == 0
        assert stmt["credits_micros"] - stmt["debits_micros"] == stmt["closing_balance_micros"] == self.model.balance
        expiries = {r["kind"]: r["amount_micros"] for r in stmt["debits"]["adjustments"]}.get("expiry", 0)
        assert expiries == self.model.expired_total


@pytest.mark.timeout(600)
def test_grants_state_machine(database_url: str) -> None:
    GrantsMachine.database_url = database_url
    machine_test = GrantsMachine.TestCase
    machine_test.settings = settings(
        max_examples=60, stateful_step_count=40, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    machine_test("runTest").runTest()
