"""Handler time bounds (one timer for all runs) and the retry loop around them."""

from __future__ import annotations

import asyncio

import pytest

from choreo.errors import HandlerError
from choreo.retry import Deadlines, RetryPolicy, run_with_retries
from choreo.testing import wait_for


async def test_a_run_past_its_timeout_raises_timeout_error_and_leaves_its_task_uncancelled() -> None:
    deadlines = Deadlines()

    async def slow() -> str:
        await asyncio.Event().wait()  # never set
        return "unreachable"

    with pytest.raises(TimeoutError):
        await deadlines.run(slow, 0.05)
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0  # the timer's cancel was taken back


async def test_only_the_runs_past_their_own_deadline_time_out() -> None:
    deadlines = Deadlines()
    release = asyncio.Event()

    async def handler(i: int) -> int:
        if i % 2:
            await asyncio.Event().wait()  # the odd ones hang
        await release.wait()
        return i

    async def one(i: int) -> object:
        try:
            return await deadlines.run(lambda: handler(i), 0.2 if i % 2 else 30.0)
        except TimeoutError:
            return "timeout"

    runs = [asyncio.create_task(one(i)) for i in range(20)]
    # The hanging ones end by their deadline; the even ones still wait for the release.
    await wait_for(lambda: sum(run.done() for run in runs) == 10, within=5, what="the odd runs to time out")
    assert [run.done() for run in runs] == [bool(i % 2) for i in range(20)]
    release.set()
    results = await asyncio.gather(*runs)
    assert results == [i if i % 2 == 0 else "timeout" for i in range(20)]
    assert deadlines._runs == {}


async def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    deadlines = Deadlines()
    started = asyncio.Event()

    async def waits() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(deadlines.run(waits, 30.0))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_timed_out_try_is_retried_then_reported_with_its_tries() -> None:
    calls = 0

    async def first_hangs() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()
        return "ok"

    policy = RetryPolicy(attempts=3, backoff_s=0.01, timeout_s=0.05)
    assert await run_with_retries(first_hangs, policy, Deadlines()) == ("ok", 2)

    async def always_hangs() -> str:
        await asyncio.Event().wait()
        return "unreachable"

    with pytest.raises(HandlerError) as failure:
        await run_with_retries(always_hangs, RetryPolicy(attempts=2, backoff_s=0.01, timeout_s=0.05))
    assert failure.value.tries == 2
    assert isinstance(failure.value.error, TimeoutError)
    assert not failure.value.permanent
