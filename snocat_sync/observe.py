"""Delivering :mod:`snocat_proto._service.activity` records to subscribers, across threads.

Publishing never waits, so the pump cannot be stalled by a slow observer; every
subscriber has its own queue, so none can miss an event.  A subscriber that stops
reading holds its backlog in memory: read, or close.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from types import TracebackType

from snocat_proto._service.activity import Activity


class Subscription:
    """A blocking iterator over the activity published after it was created."""

    def __init__(self, feed: ActivityFeed) -> None:
        self._feed = feed
        self._queue: deque[Activity] = deque()
        self._changed = threading.Condition(feed._lock)
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    def get_nowait(self) -> Activity | None:
        with self._changed:
            return self._queue.popleft() if self._queue else None

    def get(self, timeout: float | None = None) -> Activity | None:
        """The next record; None once the feed has ended and the queue is empty.

        Raises ``TimeoutError`` if nothing came within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not self._queue:
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("no activity within the timeout")
                self._changed.wait(remaining)
            return self._queue.popleft()

    def __iter__(self) -> Iterator[Activity]:
        while (record := self.get()) is not None:
            yield record

    def close(self) -> None:
        """Stop receiving; what is queued can still be read."""
        with self._changed:
            self._closed = True
            self._feed._subscribers.discard(self)
            self._changed.notify_all()

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
        self._lock = threading.Lock()
        self._subscribers: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        with self._lock:
            self._subscribers.add(subscription)
        return subscription

    def publish(self, activity: Activity) -> None:
        with self._lock:
            for subscription in self._subscribers:
                subscription._queue.append(activity)
                subscription._changed.notify_all()

    def close(self) -> None:
        """End every subscription (at shutdown)."""
        with self._lock:
            subscribers = list(self._subscribers)
        for subscription in subscribers:
            subscription.close()
