"""Fan-out of events to subscribers, each with its own bounded queue.

The registry's events and the bindings' activity feeds go through a :class:`Fanout`.
Publishing never waits and never drops silently: every :class:`Subscription` has its
own FIFO and sees every event published after it subscribed, in order, until its
reader falls ``limit`` events behind (``Limits.max_subscriber_backlog``).  Such a
laggard is closed rather than left to grow without bound: what it had queued can
still be read, then :attr:`Subscription.overflowed` says that events after it were
lost, and the fan-out counts it (:attr:`Fanout.laggards`).  A reader that must see
everything reads faster, or subscribes again (the registry can replay its state).

The fan-out keeps only weak references: a subscription that is simply dropped stops
receiving and frees its queue.  Nothing here waits; the bindings add that.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

from .._wire.errors import LocalProtocolError

__all__ = ["Fanout", "Subscription"]

T = TypeVar("T")


class Subscription(Generic[T]):
    """One reader's FIFO.  Create it with :meth:`Fanout.subscribe`."""

    __slots__ = ("__weakref__", "_closed", "_fanout", "_limit", "_overflowed", "_queue")

    def __init__(self, fanout: Fanout[T], limit: int) -> None:
        self._fanout: Fanout[T] | None = fanout
        self._limit = limit
        self._queue: deque[T] = deque()
        self._closed = False
        self._overflowed = False

    def next_event(self) -> T | None:
        """The oldest unread event, or ``None`` when there is none."""
        return self._queue.popleft() if self._queue else None

    def drain(self) -> list[T]:
        """Every unread event, oldest first, emptying the queue."""
        events = list(self._queue)
        self._queue.clear()
        return events

    @property
    def pending(self) -> int:
        """How many events wait to be read."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        """No more events will arrive (closed, overflowed, or the fan-out ended)."""
        return self._closed

    @property
    def overflowed(self) -> bool:
        """The reader fell too far behind: events after the queued ones were lost."""
        return self._overflowed

    def close(self) -> None:
        """Unsubscribe and free the queue.  Idempotent."""
        self._queue.clear()
        self.end()

    def __enter__(self) -> Subscription[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def deliver(self, event: T) -> None:
        """(The fan-out's) Queue ``event``, or close a reader that fell behind."""
        if self._closed:
            return
        if len(self._queue) >= self._limit:
            self._overflowed = True
            fanout = self._fanout
            self.end()
            if fanout is not None:
                fanout.laggards += 1
            return
        self._queue.append(event)

    def end(self) -> None:
        """(The fan-out's) Stop receiving; what is queued stays readable."""
        self._closed = True
        fanout, self._fanout = self._fanout, None
        if fanout is not None:
            fanout.discard(self)


class Fanout(Generic[T]):
    """Delivers every published event to every current subscription."""

    def __init__(self, limit: int) -> None:
        if not isinstance(limit, int) or limit < 1:
            raise LocalProtocolError(f"a subscriber backlog limit must be >= 1, not {limit!r}")
        self.limit = limit
        #: Subscriptions closed because their reader fell ``limit`` events behind.
        self.laggards = 0
        self._subscriptions: weakref.WeakSet[Subscription[T]] = weakref.WeakSet()

    def subscribe(self, initial: Iterable[T] = ()) -> Subscription[T]:
        """A new subscription; its queue starts with ``initial`` (a snapshot), then
        receives every event published from now on."""
        subscription = Subscription(self, self.limit)
        for event in initial:
            subscription.deliver(event)
        if not subscription.closed:
            self._subscriptions.add(subscription)
        return subscription

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def publish(self, event: T) -> None:
        for subscription in tuple(self._subscriptions):
            subscription.deliver(event)

    def discard(self, subscription: Subscription[T]) -> None:
        """Forget ``subscription`` (it closed)."""
        self._subscriptions.discard(subscription)

    def close(self) -> None:
        """End every subscription (what they queued stays readable)."""
        for subscription in tuple(self._subscriptions):
            subscription.end()
