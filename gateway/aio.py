"""Fire-and-forget tasks that cannot be garbage-collected half way.

The event loop keeps only weak references to tasks; one nobody holds may vanish mid-run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

_running: set[asyncio.Task[Any]] = set()


def background(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Start coro as a task that stays referenced until it finishes."""
    task = asyncio.get_running_loop().create_task(coro)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
