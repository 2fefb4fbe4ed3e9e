"""Delivering :mod:`snocat_proto._service.activity` records to subscribers.

Publishing is synchronous and never waits, so the pump cannot be stalled by a
slow observer; every subscriber has its own queue, so none can miss an event.
A subscriber that stops reading holds its backlog in memory: read, or close.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType

import anyio

from snocat_proto._service.activity import Activity


class Subscription:
    """An async iterator over the activity published after it was created."""

    def __init__(self, feed: ActivityFeed) -> None:
        self._feed = feed
        self._queue: deque[Activity] = deque()
        self._wakeup = anyio.Event()
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _push(self, activity: Activity) -> None:
        self._queue.append(activity)
        self._wakeup.set()

    def get_nowait(self) -> Activity | None:
        return self._queue.popleft() if self._queue else None

    async def get(self) -> Activity:
        while not self._queue:
            if self._closed:
                raise anyio.EndOfStream
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        return self._queue.popleft()

    def __aiter__(self) -> AsyncIterator[Activity]:
        return self

    async def __anext__(self) -> Activity:
        try:
            return await self.get()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving; what is queued can still be read."""
        self._closed = True
        self._feed._subscribers.discard(self)
        self._wakeup.set()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ActivityFeed:
    """Fan-out of activity records to every current :class:`Subscription`."""

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self._subscribers.add(subscription)
        return subscription

    def publish(self, activity: Activity) -> None:
        for subscription in list(self._subscribers):
            subscription._push(activity)

    def close(self) -> None:
        """End every subscription (at shutdown)."""
        for subscription in list(self._subscribers):
            subscription.close()
