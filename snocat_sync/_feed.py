"""Delivering :mod:`snocat_proto._service.activity` records to subscribers, across threads.

Publishing never waits, so the pump cannot be stalled by a slow observer; each
subscriber has its own queue (a :class:`~snocat_proto._service.fanout.Fanout`
subscription), so none misses an event while it keeps up.  One that falls
``Limits.max_subscriber_backlog`` records behind is closed: it reads what it had,
then :meth:`Subscription.get` raises :class:`FeedOverflowError`, and
:attr:`ActivityFeed.laggards` counts it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import TracebackType

from snocat_proto._service.activity import Activity
from snocat_proto._service.fanout import Fanout
from snocat_proto._service.fanout import Subscription as Queue

from ._errors import FeedOverflowError


class Subscription:
    """A blocking iterator over the activity published after it was created."""

    def __init__(self, feed: ActivityFeed, queue: Queue[Activity]) -> None:
        self._feed = feed
        self._queue = queue

    @property
    def pending(self) -> int:
        with self._feed.changed:
            return self._queue.pending

    def get_nowait(self) -> Activity | None:
        with self._feed.changed:
            return self._queue.next_event()

    def get(self, timeout: float | None = None) -> Activity | None:
        """The next record; None once the feed (or this subscription) is closed and
        the queue is empty.  Raises ``TimeoutError`` if nothing came within
        ``timeout`` seconds, :class:`FeedOverflowError` if the subscription was
        closed because it fell behind."""
        queue = self._queue
        with self._feed.changed:
            if not self._feed.changed.wait_for(lambda: queue.pending or queue.closed, timeout):
                raise TimeoutError("no activity within the timeout")
            record = queue.next_event()
            if record is None and queue.overflowed:
                raise FeedOverflowError(self._feed.limit)
            return record

    def __iter__(self) -> Iterator[Activity]:
        while (record := self.get()) is not None:
            yield record

    def close(self) -> None:
        """Stop receiving."""
        with self._feed.changed:
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
        #: Guards the queues; notified on every record.
        self.changed = threading.Condition(threading.Lock())
        self._fanout: Fanout[Activity] = Fanout(limit)

    @property
    def laggards(self) -> int:
        """Subscriptions closed because they fell ``limit`` records behind."""
        return self._fanout.laggards

    def subscribe(self) -> Subscription:
        with self.changed:
            return Subscription(self, self._fanout.subscribe())

    def publish(self, activity: Activity) -> None:
        with self.changed:
            self._fanout.publish(activity)
            self.changed.notify_all()

    def close(self) -> None:
        """End every subscription (at shutdown); what they queued stays readable."""
        with self.changed:
            self._fanout.close()
            self.changed.notify_all()
