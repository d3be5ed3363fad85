"""The bounded event wait that every loop a shutdown cancels uses (reloader, workers, native control)."""

from __future__ import annotations

import asyncio

import pytest

from authz_service.waiting import set_within


async def test_a_cancel_in_the_same_iteration_as_the_set_ends_the_task_cancelled() -> None:
    """The race that kept `serve` running after SIGTERM: the inotify reader sets the watcher's event
    and the shutdown cancels the watcher before either runs on. On 3.11, ``asyncio.wait_for``
    returned True here and the watcher went on waiting forever."""
    event = asyncio.Event()
    waiter = asyncio.create_task(set_within(event, 3600))
    await asyncio.sleep(0)  # the waiter's first step runs: it is waiting on the event now
    assert not waiter.done()
    event.set()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert waiter.cancelled()


async def test_true_when_set_false_on_timeout_and_an_outer_timeout_stays_the_outer_one() -> None:
    event = asyncio.Event()
    assert await set_within(event, 0) is False
    event.set()
    assert await set_within(event, 3600) is True
    event.clear()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await set_within(event, 3600)
