"""What the connections of one listener share for its limits (`server.max_concurrency`).

`proxy.protocol` checks the limit as each request's head completes. uvicorn's own count of
requests is its set of request tasks, and a task leaves it one loop iteration after it ends (a
done callback), after its response went out: a keep-alive client's next request, or another
client's, could find the answered one still counted. Requests whose response is complete are
therefore subtracted.
"""

from __future__ import annotations

import asyncio


class Listener:
    """State shared by the connections of one listener (one per `protocol_class`)."""

    __slots__ = ("_answered",)

    def __init__(self) -> None:
        # Request tasks whose response is complete; each leaves when its task ends.
        self._answered: set[asyncio.Task[None]] = set()

    def requests(self, tasks: set[asyncio.Task[None]]) -> int:
        """Requests in flight: uvicorn's request tasks less those already answered."""
        return len(tasks) - len(self._answered)

    def answered(self) -> None:
        """Called inside a request task as its response completes."""
        task = asyncio.current_task()
        if task is not None and task not in self._answered:
            self._answered.add(task)
            task.add_done_callback(self._answered.discard)
