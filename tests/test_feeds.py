"""Activity feeds are bounded: a subscriber that stops reading is closed, not grown.

Both bindings: a laggard reads what it had queued, then gets FeedOverflowError (never
a silent gap); the feed counts it; a subscriber that keeps up loses nothing; and the
backlog limit is the config's ``Limits.max_subscriber_backlog``.
"""

from __future__ import annotations

import threading

import anyio
import pytest

import snocat_anyio
import snocat_sync
from snocat_proto import Limits, Reconnecting, ServerConfig
from snocat_proto._service.activity import Activity

LIMIT = 50


def record(index: int) -> Activity:
    return Reconnecting(at=float(index), attempt=index, delay=0.0, reason="test")


@pytest.mark.anyio
async def test_anyio_laggard_is_closed_with_what_it_had() -> None:
    feed = snocat_anyio.ActivityFeed(LIMIT)
    slow = feed.subscribe()
    fast = feed.subscribe()
    seen: list[Activity] = []

    async def read_fast() -> None:
        async for item in fast:
            seen.append(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_fast)
        for index in range(3 * LIMIT):
            feed.publish(record(index))
            await anyio.sleep(0)
        await anyio.sleep(0.05)
        feed.close()
    assert [r.attempt for r in seen] == list(range(3 * LIMIT))  # type: ignore[attr-defined]
    got = [await slow.get() for _ in range(LIMIT)]
    assert [r.attempt for r in got] == list(range(LIMIT))  # type: ignore[attr-defined]
    with pytest.raises(snocat_anyio.FeedOverflowError, match="fell 50 records behind"):
        await slow.get()
    assert feed.laggards == 1


@pytest.mark.anyio
async def test_anyio_feed_end_is_end_of_stream_not_overflow() -> None:
    feed = snocat_anyio.ActivityFeed(LIMIT)
    subscription = feed.subscribe()
    feed.publish(record(1))
    feed.close()
    assert (await subscription.get()).attempt == 1  # type: ignore[attr-defined]
    with pytest.raises(anyio.EndOfStream):
        await subscription.get()
    assert feed.laggards == 0


def test_sync_laggard_is_closed_with_what_it_had() -> None:
    feed = snocat_sync.ActivityFeed(LIMIT)
    slow = feed.subscribe()
    fast = feed.subscribe()
    seen: list[Activity] = []
    reader = threading.Thread(target=lambda: seen.extend(fast))
    reader.start()
    for index in range(3 * LIMIT):
        feed.publish(record(index))
        while fast.pending > LIMIT // 2:  # let the reader keep up, as a live one does
            threading.Event().wait(0.001)
    feed.close()
    reader.join(5)
    assert [r.attempt for r in seen] == list(range(3 * LIMIT))  # type: ignore[attr-defined]
    got = [slow.get(timeout=1) for _ in range(LIMIT)]
    assert [r.attempt for r in got] == list(range(LIMIT))  # type: ignore[attr-defined]
    with pytest.raises(snocat_sync.FeedOverflowError):
        slow.get(timeout=1)
    assert feed.laggards == 1


def test_sync_feed_end_is_end_of_stream_not_overflow() -> None:
    feed = snocat_sync.ActivityFeed(LIMIT)
    subscription = feed.subscribe()
    feed.publish(record(1))
    feed.close()
    assert subscription.get(timeout=1).attempt == 1  # type: ignore[attr-defined]
    with pytest.raises(snocat_sync.EndOfStream):
        subscription.get(timeout=1)
    assert list(subscription) == []
    assert feed.laggards == 0


@pytest.mark.parametrize("binding", [snocat_anyio, snocat_sync])
def test_a_timeout_is_timeout_error(binding: object) -> None:
    feed = binding.ActivityFeed(LIMIT)  # type: ignore[attr-defined]
    subscription = feed.subscribe()
    with pytest.raises(TimeoutError):
        if binding is snocat_anyio:
            anyio.run(subscription.get, 0.01)
        else:
            subscription.get(timeout=0.01)


@pytest.mark.parametrize("binding", [snocat_anyio, snocat_sync])
def test_servers_size_their_feed_from_the_limits(binding: object, server_identity: object) -> None:
    config = ServerConfig(
        certificate_pem=server_identity.certificate_pem,  # type: ignore[attr-defined]
        private_key_pem=server_identity.private_key_pem,  # type: ignore[attr-defined]
        limits=Limits(max_subscriber_backlog=7),
    )
    server = binding.TunnelServer(config)  # type: ignore[attr-defined]
    assert server.activity.limit == 7
    assert server.registry.subscribe().pending == 0
