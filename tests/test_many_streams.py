"""Many streams in one tunnel (issue 16): the engine's stream scheduler.

aioquic tries every stream, and checks every stream's window, for each packet it
builds; ``QuicEngine._write_application`` serves a queue of the streams that have
something to send instead, at most ``STREAMS_PER_PACKET`` a packet, round robin, each
for up to ``Limits.stream_send_turn`` bytes at a time (a stream just given work goes
first, for ``stream_first_turn``), and writes window
updates only where one is due.  Two tunnels on the simulated network (tests/netsim.py,
fake clock, real aioquic handshakes): data arrives intact, no stream starves, windows
keep opening, finished streams are forgotten, and the work per packet stays flat as
the streams grow (counted, never timed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aioquic.quic.stream import QuicStreamSender
from netsim import Link, Simulation, Writer, digest, payload

from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import SimpleAckConnector, SimpleAckListener
from snocat_proto._wire.engine import STREAMS_PER_PACKET, QuicEngine
from snocat_proto._wire.events import (
    AuthenticationCompleted,
    StreamAccepted,
    StreamRejected,
    StreamReset,
    StreamWritable,
)
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.tunnel import TunnelConnection

ADDRESS = RouteAddress.of("proxy-tcp", "dns", "example.com", "tcp", "443")


def connected(**kwargs: Any) -> Simulation:
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector(), **kwargs)
    sim.run_until(
        lambda: (
            sim.client_app.of_type(AuthenticationCompleted)
            and sim.server_app.of_type(AuthenticationCompleted)
        ),
        timeout=10,
    )
    return sim


def open_streams(sim: Simulation, count: int) -> list[int]:
    """``count`` streams from the client, opened at once; run until all are accepted."""
    ids = [sim.client.open_stream(ADDRESS) for _ in range(count)]
    sim.touch(sim.client)
    sim.run_until(lambda: len(sim.client_app.of_type(StreamAccepted)) >= count, timeout=30)
    assert not sim.client_app.of_type(StreamRejected)
    return ids


def run_writing(
    sim: Simulation, writers: list[Writer], until: Callable[[], bool], *, timeout: float = 120.0
) -> None:
    """Step the simulation, keeping every writer's stream full, until ``until()``."""
    deadline = sim.now + timeout
    while not until():
        for writer in writers:
            writer.pump()
        if sim.now >= deadline or not sim.step(until=deadline):
            raise AssertionError(f"not done by t+{timeout}s (now={sim.now})")


def engine(tunnel: TunnelConnection) -> QuicEngine:
    return tunnel._quic


# Data ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "link", [Link(), Link(loss=0.03, jitter=0.005, duplicate=0.02)], ids=["clean", "lossy"]
)
def test_64_streams_each_way_arrive_intact_and_are_forgotten(link: Link) -> None:
    sim = connected(link=link, seed=5)
    server = sim.server_tunnel
    ids = open_streams(sim, 64)
    up = {sid: payload(8 * 1024 + 97 * index, seed=100 + index) for index, sid in enumerate(ids)}
    down = {sid: payload(6 * 1024 + 89 * index, seed=300 + index) for index, sid in enumerate(ids)}
    writers = [Writer(sim, sim.client, sid, blob) for sid, blob in up.items()]
    writers += [Writer(sim, server, sid, blob) for sid, blob in down.items()]
    run_writing(
        sim,
        writers,
        lambda: set(ids) <= sim.server_app.ended and set(ids) <= sim.client_app.ended,
    )
    for sid in ids:
        assert digest(sim.server_app.received[sid]) == digest(up[sid]), sid
        assert digest(sim.client_app.received[sid]) == digest(down[sid]), sid
    for app in (sim.client_app, sim.server_app):
        assert not app.of_type(StreamReset) and app.closed is None
    # Both halves finished and acknowledged: the engines forget every stream, the
    # send queues drain (nothing left waiting for a window that will not open).
    sim.run_for(2.0)
    for tunnel in (sim.client, server):
        quic = engine(tunnel)
        assert not set(ids) & set(quic._streams), tunnel.role
        assert not quic._send_queue and not quic._queued, tunnel.role
        assert not quic._waiting_for_max_data and not quic._window_updates_due, tunnel.role


def test_reset_streams_among_bulk_ones_leave_the_others_intact() -> None:
    sim = connected(link=Link(loss=0.02), seed=9)
    ids = open_streams(sim, 16)
    blobs = {sid: payload(96 * 1024, seed=500 + index) for index, sid in enumerate(ids)}
    writers = {sid: Writer(sim, sim.client, sid, blob) for sid, blob in blobs.items()}
    doomed = ids[::3]
    run_writing(
        sim, list(writers.values()), lambda: len(sim.server_app.received[ids[0]]) > 16 * 1024
    )
    for sid in doomed:
        sim.client.reset_stream(sid)
        writers[sid].done = True
    sim.touch(sim.client)
    kept = [sid for sid in ids if sid not in doomed]
    run_writing(
        sim,
        [writers[sid] for sid in kept],
        lambda: (
            set(kept) <= sim.server_app.ended
            and {getattr(e, "stream_id", None) for e in sim.server_app.of_type(StreamReset)}
            >= set(doomed)
        ),
    )
    for sid in kept:
        assert digest(sim.server_app.received[sid]) == digest(blobs[sid]), sid


# Fairness --------------------------------------------------------------------------


def test_a_late_small_stream_completes_while_bulk_streams_run() -> None:
    """With 8 streams sending as fast as they can, a stream opened later with a few
    kilobytes is served within a few turns: it ends while every bulk stream is still
    far from done, and the bulk streams share the tunnel evenly meanwhile."""
    sim = connected(seed=2)
    bulk = open_streams(sim, 8)
    size = 4_000_000
    writers = [
        Writer(sim, sim.client, sid, payload(size, seed=700 + i)) for i, sid in enumerate(bulk)
    ]
    received = sim.server_app.received
    run_writing(sim, writers, lambda: sum(len(received[sid]) for sid in bulk) > 1_000_000)
    late = sim.client.open_stream(ADDRESS)
    sim.touch(sim.client)
    small = payload(4096, seed=9)

    def accepted() -> bool:
        return StreamAccepted(stream_id=late) in sim.client_app.of_type(StreamAccepted)

    run_writing(sim, writers, accepted, timeout=30)
    writers.append(Writer(sim, sim.client, late, small))
    run_writing(sim, writers, lambda: late in sim.server_app.ended, timeout=30)
    assert bytes(received[late]) == small
    done = [len(received[sid]) for sid in bulk]
    assert max(done) < size / 2, done  # the bulk streams are still running
    # Round robin: none of them fell behind the others by more than a few turns.
    turn = Limits().stream_send_turn
    assert max(done) - min(done) <= 4 * turn + 256 * 1024, done


def test_a_stream_given_work_is_served_ahead_of_the_busy_ones() -> None:
    """With 12 streams sending as fast as they can, 4 KiB written to an idle stream
    leave the sender ahead of them (``Limits.stream_first_turn``): meanwhile the
    bulk streams put less than one regular turn on the wire.  Queued behind them,
    it would wait for up to 12 turns (``stream_send_turn`` bytes each).  (12 full
    stream send buffers leave room in the tunnel's for the idle one.)"""
    sim = connected(link=Link(bandwidth=20e6), seed=3)
    bulk = open_streams(sim, 12)
    writers = [
        Writer(sim, sim.client, sid, payload(4_000_000, seed=800 + i)) for i, sid in enumerate(bulk)
    ]
    received = sim.server_app.received
    run_writing(sim, writers, lambda: sum(len(received[sid]) for sid in bulk) > 2_000_000)
    late = sim.client.open_stream(ADDRESS)
    sim.touch(sim.client)
    run_writing(
        sim,
        writers,
        lambda: StreamAccepted(stream_id=late) in sim.client_app.of_type(StreamAccepted),
    )
    quic = engine(sim.client)
    senders = [quic._streams[sid].sender for sid in bulk]
    late_sender = quic._streams[late].sender
    small = payload(4096, seed=11)
    start = late_sender.next_offset
    bulk_before = sum(sender.highest_offset for sender in senders)
    writers.append(Writer(sim, sim.client, late, small, end=False))
    run_writing(sim, writers, lambda: late_sender.next_offset >= start + len(small))
    bulk_meanwhile = sum(sender.highest_offset for sender in senders) - bulk_before
    assert bulk_meanwhile < Limits().stream_send_turn, bulk_meanwhile
    run_writing(sim, writers, lambda: len(received[late]) >= len(small))
    assert bytes(received[late]) == small


# Windows ---------------------------------------------------------------------------


@pytest.mark.parametrize("link", [Link(), Link(loss=0.05)], ids=["clean", "lossy"])
def test_streams_with_a_small_receive_window_keep_flowing(link: Link) -> None:
    """A 16 KiB stream window is re-opened about 120 times for 1 MB (every 8 KiB):
    each update (and each one lost) has to be written although no other stream is
    scanned for one."""
    limits = Limits(stream_receive_window=16 * 1024)
    sim = connected(link=link, seed=4, limits=limits, client_limits=limits)
    ids = open_streams(sim, 4)
    blobs = {
        sid: payload(1_000_000 if i == 0 else 64 * 1024, seed=40 + i) for i, sid in enumerate(ids)
    }
    writers = [Writer(sim, sim.client, sid, blob) for sid, blob in blobs.items()]
    run_writing(sim, writers, lambda: set(ids) <= sim.server_app.ended, timeout=300)
    for sid, blob in blobs.items():
        assert digest(sim.server_app.received[sid]) == digest(blob), sid


# The work per packet ---------------------------------------------------------------


def _work_per_packet(monkeypatch: pytest.MonkeyPatch, streams: int) -> tuple[float, float]:
    """``(STREAM-frame attempts per packet of the sender, window-update checks per
    packet of the receiver)`` while ``streams`` streams all have data to send."""
    sim = connected(seed=1)
    ids = open_streams(sim, streams)
    sender, receiver = engine(sim.client), engine(sim.server_tunnel)
    writers = [Writer(sim, sim.client, sid, payload(400_000, seed=i)) for i, sid in enumerate(ids)]
    received = sim.server_app.received
    # Let every stream get going before counting.
    run_writing(sim, writers, lambda: all(len(received[sid]) > 0 for sid in ids))
    senders = {id(sender._streams[sid].sender) for sid in ids}
    counts = {"attempts": 0, "checks": 0}
    get_frame = QuicStreamSender.get_frame
    write_limits = QuicEngine._write_stream_limits

    def counted_get_frame(self: QuicStreamSender, *args: Any, **kwargs: Any) -> Any:
        if id(self) in senders:
            counts["attempts"] += 1
        return get_frame(self, *args, **kwargs)

    def counted_write_limits(self: QuicEngine, *args: Any, **kwargs: Any) -> None:
        if self is receiver:
            counts["checks"] += 1
        write_limits(self, *args, **kwargs)

    monkeypatch.setattr(QuicStreamSender, "get_frame", counted_get_frame)
    monkeypatch.setattr(QuicEngine, "_write_stream_limits", counted_write_limits)
    sent_before, acks_before = sender._packet_number, receiver._packet_number
    # Count while every stream still has most of its data to send.
    run_writing(sim, writers, lambda: min(len(received[sid]) for sid in ids) > 200_000)
    monkeypatch.undo()
    packets = sender._packet_number - sent_before
    receiver_packets = receiver._packet_number - acks_before
    assert packets > 100 and receiver_packets > 10
    return counts["attempts"] / packets, counts["checks"] / receiver_packets


def test_the_work_per_packet_does_not_grow_with_the_stream_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aioquic's own scheduler tries every stream for each packet (about 64 attempts
    a packet with 64 streams) and checks every stream's window in each packet the
    receiver sends: both figures must stay flat here."""
    results = {n: _work_per_packet(monkeypatch, n) for n in (2, 64)}
    for attempts, checks in results.values():
        assert attempts <= STREAMS_PER_PACKET, results
        assert checks <= 2, results
    attempts_2, checks_2 = results[2]
    attempts_64, checks_64 = results[64]
    assert attempts_64 <= attempts_2 + 1, results
    assert checks_64 <= checks_2 + 1, results


def _iter_queue(quic: QuicEngine) -> Iterator[int]:
    return (stream.stream_id or 0 for stream in quic._send_queue)


def test_the_send_queue_holds_each_stream_once_and_only_live_ones() -> None:
    sim = connected(link=Link(loss=0.03), seed=12)
    ids = open_streams(sim, 32)
    writers = [
        Writer(sim, sim.client, sid, payload(64 * 1024, seed=i)) for i, sid in enumerate(ids)
    ]
    quic = engine(sim.client)

    def check() -> None:
        queued = list(_iter_queue(quic))
        assert len(queued) == len(set(queued)) == len(quic._queued)
        assert set(queued) == quic._queued
        assert all(sid in quic._streams for sid in queued)

    sim.checks.append(check)
    run_writing(sim, writers, lambda: set(ids) <= sim.server_app.ended)


def test_room_in_the_tunnel_wakes_only_the_writers_it_can_serve() -> None:
    """16 writers behind one tunnel send buffer, each writing only when told it may
    (as a relay does): an acknowledgement that frees room for one or two of them
    must not wake all sixteen, only for fifteen to find nothing and wait again."""
    limits = Limits(tunnel_send_buffer=256 * 1024, stream_send_buffer=128 * 1024)
    threshold = min(limits.stream_send_buffer // 2, limits.writable_threshold)
    sim = connected(seed=3, limits=limits, client_limits=limits)
    client = sim.client
    ids = open_streams(sim, 16)
    blobs = {sid: payload(512 * 1024, seed=900 + i) for i, sid in enumerate(ids)}
    offsets = dict.fromkeys(ids, 0)

    def write(sid: int) -> None:
        room = client.send_capacity(sid)
        if room and offsets[sid] < len(blobs[sid]):
            chunk = blobs[sid][offsets[sid] : offsets[sid] + room]
            client.send_data(sid, chunk, end_stream=offsets[sid] + len(chunk) == len(blobs[sid]))
            offsets[sid] += len(chunk)
        sim.touch(client)

    for sid in ids:
        write(sid)
    seen = len(sim.client_app.events)
    wakeups = empty = 0
    deadline = sim.now + 120
    while not set(ids) <= sim.server_app.ended:
        assert sim.now < deadline and sim.step(until=deadline)
        for event in sim.client_app.events[seen:]:
            if isinstance(event, StreamWritable):
                wakeups += 1
                if client.send_capacity(event.stream_id) < threshold:
                    empty += 1  # woken for room another writer took first
                write(event.stream_id)
        seen = len(sim.client_app.events)
    for sid in ids:
        assert digest(sim.server_app.received[sid]) == digest(blobs[sid]), sid
    assert wakeups > 50
    assert empty <= wakeups // 10, (empty, wakeups)


def test_writers_woken_that_never_write_do_not_strand_the_others() -> None:
    """40 streams wait for room behind one tunnel send buffer; each woken writer gives
    up without writing (a send that timed out, its stream left open).  Once the
    tunnel has nothing in flight no acknowledgement will come to wake the rest, so
    they must all have been told by then: none may wait for ever."""
    limits = Limits(tunnel_send_buffer=64 * 1024, stream_send_buffer=32 * 1024)
    sim = connected(seed=5, limits=limits, client_limits=limits)
    client = sim.client
    ids = open_streams(sim, 40)
    for sid in ids[:2]:
        client.send_data(sid, payload(client.send_capacity(sid), seed=sid))
    for sid in ids:
        assert client.send_capacity(sid) == 0  # all of them wait now
    sim.touch(client)
    sim.run_for(5.0)  # a clean link: everything sent is acknowledged long before
    assert all(client.send_capacity(sid) == limits.stream_send_buffer for sid in ids)
    woken = {e.stream_id for e in sim.client_app.events if isinstance(e, StreamWritable)}
    assert woken == set(ids), f"{len(set(ids) - woken)} writers never told"
