"""Bounded waits for an event that a shutdown can always cancel.

Python 3.11's ``asyncio.wait_for`` returns the inner result when the waiting task is cancelled in
the same loop iteration as the inner awaitable completes: the cancellation is lost. A loop that
waits that way (a file watcher woken by every inotify event, a supervisor's tick) then goes on
after ``task.cancel()``, and a shutdown that awaits it never ends. ``asyncio.timeout`` (3.11+)
keeps every cancellation that is not its own.
"""

from __future__ import annotations

import asyncio


async def set_within(event: asyncio.Event, seconds: float) -> bool:
    """Wait for ``event`` at most ``seconds``: True if it is set, False on timeout.

    A cancellation of the waiting task always propagates, even when the event is set in the same
    loop iteration."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
