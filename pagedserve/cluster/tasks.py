"""Ending the background tasks of the router and the launcher."""
from __future__ import annotations

import asyncio


async def cancel_tasks(tasks) -> None:
    """Cancel background tasks and wait until every one has ended, cancelling again while any runs on.

    Why again: on Python < 3.12, `asyncio.wait_for` drops a cancellation that arrives as the awaitable it
    wraps completes (CPython gh-86296), so a loop task can lose one `cancel()` and keep looping; a plain
    cancel-then-await then waits forever. Seen in CI: the router's scrape loop (nvidia-smi under
    `wait_for`) kept running and `Router.stop()` never returned. Exceptions of the ended tasks are
    retrieved and dropped, as a shutdown wants."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for t in tasks:
        if not t.cancelled():
            t.exception()
