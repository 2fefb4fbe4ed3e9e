"""Delivering :mod:`snocat_proto._service.activity` records to subscribers.

Publishing is synchronous and never waits, so the pump cannot be stalled by a slow
observer; each subscriber has its own queue (a
:class:`~snocat_proto._service.fanout.Fanout` subscription), so none misses an event
while it keeps up.  One that falls ``Limits.max_subscriber_backlog`` records behind
is closed: it reads what it had, then :meth:`Subscription.get` raises
:class:`FeedOverflowError`, and :attr:`ActivityFeed.laggards` counts it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType

import anyio

from snocat_proto._service.activity import Activity
from snocat_proto._service.fanout import Fanout
from snocat_proto._service.fanout import Subscription as Queue

from ._backend import Condition, Lock
from ._errors import FeedOverflowError


class Subscription:
    """An async iterator over the activity published after it was created."""

    def __init__(self, feed: ActivityFeed, queue: Queue[Activity]) -> None:
        self._feed = feed
        self._queue = queue

    @property
    def pending(self) -> int:
        return self._queue.pending

    def get_nowait(self) -> Activity | None:
        return self._queue.next_event()

    async def get(self) -> Activity:
        """The next record.  Raises ``anyio.EndOfStream`` once the feed (or this
        subscription) is closed and the queue is empty, :class:`FeedOverflowError`
        if it was closed because it fell behind."""
        while (record := self._queue.next_event()) is None:
            if self._queue.closed:
                if self._queue.overflowed:
                    raise FeedOverflowError(self._feed.limit)
                raise anyio.EndOfStream
            await self._feed.changed.wait_for(
                lambda: bool(self._queue.pending) or self._queue.closed
            )
        return record

    def __aiter__(self) -> AsyncIterator[Activity]:
        return self

    async def __anext__(self) -> Activity:
        try:
            return await self.get()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving."""
        self._queue.close()
        self._feed.changed.notify_all()

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

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.changed = Condition(Lock())
        self._fanout: Fanout[Activity] = Fanout(limit)

    @property
    def laggards(self) -> int:
        """Subscriptions closed because they fell ``limit`` records behind."""
        return self._fanout.laggards

    def subscribe(self) -> Subscription:
        return Subscription(self, self._fanout.subscribe())

    def publish(self, activity: Activity) -> None:
        self._fanout.publish(activity)
        self.changed.notify_all()

    def close(self) -> None:
        """End every subscription (at shutdown); what they queued stays readable."""
        self._fanout.close()
        self.changed.notify_all()
