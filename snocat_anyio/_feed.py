"""Delivering :mod:`snocat_proto._service.activity` records to subscribers.

The source of both bindings' feeds (``snocat_sync/_feed.py`` is generated from it).
Publishing never waits, so the pump cannot be stalled by a slow observer; each
subscriber has its own queue (a :class:`~snocat_proto._service.fanout.Fanout`
subscription), so none misses a record while it keeps up.  One that falls
``Limits.max_subscriber_backlog`` records behind is closed: it reads what it had,
then :meth:`Subscription.get` raises :class:`FeedOverflowError`, and
:attr:`ActivityFeed.laggards` counts it.  After the feed's end ``get`` raises
``EndOfStream`` and iteration stops.
"""

from __future__ import annotations

from types import TracebackType

from snocat_proto._service.activity import Activity
from snocat_proto._service.fanout import Fanout
from snocat_proto._service.fanout import Subscription as Queue

from ._backend import Condition, EndOfStream, Lock
from ._errors import FeedOverflowError


class Subscription:
    """An iterator over the activity published after it was created."""

    def __init__(self, feed: ActivityFeed, queue: Queue[Activity]) -> None:
        self._feed = feed
        self._queue = queue

    @property
    def pending(self) -> int:
        with self._feed.lock:
            return self._queue.pending

    def get_nowait(self) -> Activity | None:
        with self._feed.lock:
            return self._queue.next_event()

    async def get(self, timeout: float | None = None) -> Activity:
        """The next record.  Raises ``EndOfStream`` once the feed (or this
        subscription) is closed and the queue is empty, :class:`FeedOverflowError` if
        it was closed because it fell behind, ``TimeoutError`` after ``timeout`` s."""
        queue = self._queue
        if not await self._feed.changed.wait_for(
            lambda: bool(queue.pending) or queue.closed, timeout
        ):
            raise TimeoutError("no activity within the timeout")
        with self._feed.lock:
            record = queue.next_event()
            if record is not None:
                return record
            if queue.overflowed:
                raise FeedOverflowError(self._feed.limit)
        raise EndOfStream

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Activity:
        try:
            return await self.get()
        except EndOfStream:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving."""
        with self._feed.lock:
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
        #: Guards the queues (publishers run on the pump, readers anywhere).
        self.lock = Lock()
        self.changed = Condition(self.lock)
        self._fanout: Fanout[Activity] = Fanout(limit)

    @property
    def laggards(self) -> int:
        """Subscriptions closed because they fell ``limit`` records behind."""
        return self._fanout.laggards

    def subscribe(self) -> Subscription:
        with self.lock:
            return Subscription(self, self._fanout.subscribe())

    def publish(self, activity: Activity) -> None:
        with self.lock:
            self._fanout.publish(activity)
            self.changed.notify_all()

    def close(self) -> None:
        """End every subscription (at shutdown); what they queued stays readable."""
        with self.lock:
            self._fanout.close()
            self.changed.notify_all()
