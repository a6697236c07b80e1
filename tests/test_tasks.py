"""The background supervisor loops (hold sweeper, video poller): a failed tick is logged and the loop goes on."""

from __future__ import annotations

import asyncio

import pytest

from billing.errors import DatabaseUnavailable
from gateway.tasks import every


@pytest.mark.parametrize("error", [ValueError("an upstream's odd answer"), OSError("refused"),
                                   DatabaseUnavailable("the database is unavailable")],
                         ids=["unexpected", "network", "database"])
async def test_a_failing_tick_is_logged_and_the_loop_goes_on(error: Exception, caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    ticks: list[int] = []
    third = asyncio.Event()

    async def step() -> None:
        ticks.append(len(ticks))
        if len(ticks) == 1:
            raise error
        if len(ticks) == 3:
            third.set()

    loop = asyncio.create_task(every(0.001, step, "test step"))
    await asyncio.wait_for(third.wait(), 5)
    assert not loop.done()
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    assert ticks[:3] == [0, 1, 2]
    # An outage is logged once by billing.db's Health, not on every tick of every loop; anything else is a fault.
    assert [r.getMessage().split(";")[0] for r in caplog.records if r.name == "meterline.tasks"] == (
        [] if isinstance(error, DatabaseUnavailable) else ["test step failed unexpectedly"])
