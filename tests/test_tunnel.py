"""One tunnel end to end: a ServerEndpoint and a client TunnelConnection over netsim.

Everything runs on a fake clock over a simulated path that can lose, reorder and
duplicate datagrams (seeded, so a failure replays).  The tests check what users rely
on: who gets authenticated and who does not, that bytes arrive exactly, that streams
end, refuse, reset and close as documented, that buffers stay within their Limits,
and that a misbehaving peer costs one stream, not the tunnel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import UnionType

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from netsim import (
    CLIENT_ADDR,
    SERVER_ADDR,
    App,
    Link,
    RawStreams,
    Simulation,
    Writer,
    digest,
    payload,
    pump_all,
    send_all,
)

from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import (
    Authenticator,
    SimpleAckConnector,
    SimpleAckListener,
    TokenConnector,
    TokenListener,
)
from snocat_proto._wire.codes import CloseCode, StreamCode
from snocat_proto._wire.errors import LocalProtocolError, SendBufferFull
from snocat_proto._wire.events import (
    AuthenticationCompleted,
    ConnectionTerminated,
    CredentialRequired,
    DataReceived,
    HandshakeCompleted,
    StreamAccepted,
    StreamEnded,
    StreamRejected,
    StreamRequested,
    StreamReset,
    StreamWritable,
    TunnelEvent,
)
from snocat_proto._wire.features import FEATURES
from snocat_proto._wire.framing import encode_frame
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.negotiation import HEADER
from snocat_proto._wire.tunnel import TunnelConnection, TunnelState

LIMITS = Limits()
ADDRESS = RouteAddress.of("proxy-tcp", "dns", "example.com", "tcp", "443")
CLIENT_NAME = "10.0.0.2:50000"
SECRET = b"s3cret"
WRONG_SECRET = b"not-the-s3cret-xyz"


# Helpers --------------------------------------------------------------------------


def token_server(limits: Limits = LIMITS) -> Callable[[str], Authenticator]:
    return lambda peer_name: TokenListener(os.urandom(32), limits=limits)


def simple_sim(**kwargs: object) -> Simulation:
    return Simulation(
        server_auth=SimpleAckListener,
        client_auth=SimpleAckConnector(),
        **kwargs,  # type: ignore[arg-type]
    )


def both_authenticated(sim: Simulation) -> bool:
    return bool(
        sim.client_app.of_type(AuthenticationCompleted)
        and sim.server_app.of_type(AuthenticationCompleted)
    )


def connected(**kwargs: object) -> Simulation:
    """A SimpleAck simulation, run until both sides are authenticated."""
    sim = simple_sim(**kwargs)
    sim.run_until(lambda: both_authenticated(sim), timeout=10)
    return sim


def app_of(sim: Simulation, tunnel: TunnelConnection) -> App:
    return sim.client_app if tunnel is sim.client else sim.server_app_of(tunnel)


def open_stream(sim: Simulation, opener: TunnelConnection, address: RouteAddress = ADDRESS) -> int:
    """Open a stream from ``opener`` and run until the peer has accepted or refused it."""
    stream_id = opener.open_stream(address)
    sim.touch(opener)
    app = app_of(sim, opener)

    def decided() -> bool:
        return any(
            isinstance(e, StreamAccepted | StreamRejected) and e.stream_id == stream_id
            for e in app.events
        )

    sim.run_until(decided, timeout=10)
    return stream_id


def events_for(
    app: App, stream_id: int, kind: type[TunnelEvent] | UnionType = TunnelEvent
) -> list[TunnelEvent]:
    return [
        e for e in app.events if isinstance(e, kind) and getattr(e, "stream_id", None) == stream_id
    ]


def assert_credit_is_earned(tunnel: TunnelConnection) -> None:
    """The tunnel never lets the peer send more than it received plus the window.

    Credit returned (consumed, or released for bytes nobody will read) may not exceed
    the bytes that actually arrived: anything more widens the window for good.
    """
    engine = tunnel._quic
    assert engine._consumed_total <= engine._local_max_data.used


def closed_both(sim: Simulation) -> bool:
    return sim.client_app.closed is not None and sim.server_app.closed is not None


# 1. Authentication ----------------------------------------------------------------


def test_simple_ack_names_the_server_tunnel_by_client_address() -> None:
    sim = connected()
    (server_auth,) = sim.server_app.of_type(AuthenticationCompleted)
    (client_auth,) = sim.client_app.of_type(AuthenticationCompleted)
    assert server_auth == AuthenticationCompleted(name=CLIENT_NAME, scheme="simple-ack")
    assert client_auth == AuthenticationCompleted(name="", scheme="simple-ack")
    assert sim.client.features == sim.server_tunnel.features == frozenset()  # 0.8: none
    assert sim.server_tunnel.name == CLIENT_NAME
    assert sim.client.name == ""
    assert sim.client.state is sim.server_tunnel.state is TunnelState.AUTHENTICATED


def test_token_authentication_succeeds_with_the_right_secret() -> None:
    sim = Simulation(
        server_auth=token_server(), client_auth=TokenConnector("alpha", SECRET, limits=LIMITS)
    )
    sim.server_app.credentials = {"alpha": SECRET}
    sim.run_until(lambda: both_authenticated(sim), timeout=10)
    assert sim.server_app.of_type(CredentialRequired) == [CredentialRequired(name="alpha")]
    expected = AuthenticationCompleted(name="alpha", scheme="token", features=FEATURES)
    assert sim.server_app.of_type(AuthenticationCompleted) == [expected]
    assert sim.client_app.of_type(AuthenticationCompleted) == [expected]
    assert sim.client.features == sim.server_tunnel.features == FEATURES
    assert "s3cret" not in repr(sim.server_app.events) + repr(sim.client_app.events)
    # And the tunnel carries streams.
    stream_id = open_stream(sim, sim.client)
    assert events_for(sim.client_app, stream_id, StreamAccepted)


def _failed_auth(
    client_auth: Authenticator, server_auth: Callable[[str], Authenticator]
) -> Simulation:
    sim = Simulation(server_auth=server_auth, client_auth=client_auth)
    sim.server_app.credentials = {"alpha": SECRET}
    sim.run_until(lambda: len(sim.server) == 1, timeout=5)
    server_tunnel = sim.server_tunnel
    sim.run_until(lambda: closed_both(sim), timeout=15)
    # Neither side may open streams on a tunnel that never authenticated.
    for tunnel in (sim.client, server_tunnel):
        assert tunnel.name is None
        with pytest.raises(LocalProtocolError):
            tunnel.open_stream(ADDRESS)
    assert not sim.client_app.of_type(AuthenticationCompleted)
    assert not sim.server_app.of_type(AuthenticationCompleted)
    # Nothing follows ConnectionTerminated, and the secrets were never shown to anyone.
    sim.run_until_quiet()
    for app in (sim.client_app, sim.server_app):
        assert isinstance(app.events[-1], ConnectionTerminated)
        shown = repr(app.events)
        assert "s3cret" not in shown
        assert SECRET.hex() not in shown
    return sim


def test_an_application_refusal_is_not_reported_as_a_wrong_token() -> None:
    # A full aggregator refuses a good credential with LIMIT_EXCEEDED, so that the
    # client retries later instead of giving up as it must for a wrong token.
    sim = Simulation(
        server_auth=token_server(), client_auth=TokenConnector("alpha", SECRET, limits=LIMITS)
    )
    sim.server_app.hold_credentials = True
    sim.run_until(lambda: bool(sim.server_app.of_type(CredentialRequired)), timeout=10)
    server_tunnel = sim.server_tunnel
    server_tunnel.reject_credential("aggregator is at its tunnel limit", CloseCode.LIMIT_EXCEEDED)
    sim.touch(server_tunnel)
    sim.run_until(lambda: closed_both(sim), timeout=10)
    closed = sim.client_app.closed
    assert closed is not None and closed.application and closed.by_peer
    assert closed.code == CloseCode.LIMIT_EXCEEDED
    assert "tunnel limit" in closed.reason


@pytest.mark.parametrize(
    ("name", "secret"),
    [("alpha", WRONG_SECRET), ("nobody", SECRET)],
    ids=["wrong-secret", "unknown-name"],
)
def test_token_bad_credentials_close_both_sides(name: str, secret: bytes) -> None:
    sim = _failed_auth(TokenConnector(name, secret, limits=LIMITS), token_server())
    server_closed, client_closed = sim.server_app.closed, sim.client_app.closed
    assert server_closed is not None and client_closed is not None
    assert server_closed.code == client_closed.code == CloseCode.AUTHENTICATION_FAILED
    assert server_closed.application and client_closed.application
    assert not server_closed.by_peer
    assert "unknown tunnel name or a wrong token" in server_closed.reason
    # The client is told why (either the server's close or its own reading of the result).
    assert "wrong token" in client_closed.reason


def test_unknown_name_and_wrong_secret_look_the_same_to_the_client() -> None:
    """A client cannot probe which tunnel names exist."""
    reasons = []
    for name, secret in (("alpha", WRONG_SECRET), ("nobody", SECRET)):
        sim = _failed_auth(TokenConnector(name, secret, limits=LIMITS), token_server())
        client_closed = sim.client_app.closed
        assert client_closed is not None
        reasons.append((client_closed.code, client_closed.reason.replace(repr(name), "NAME")))
    assert reasons[0] == reasons[1]


def test_token_server_refuses_simple_ack_client() -> None:
    sim = _failed_auth(SimpleAckConnector(), token_server())
    server_closed, client_closed = sim.server_app.closed, sim.client_app.closed
    assert server_closed is not None and client_closed is not None
    assert server_closed.code == client_closed.code == CloseCode.AUTHENTICATION_FAILED
    assert not client_closed.by_peer and server_closed.by_peer
    for closed in (server_closed, client_closed):
        assert "requires token authentication" in closed.reason
    assert not sim.server_app.of_type(CredentialRequired)


def test_simple_ack_server_refuses_token_client() -> None:
    sim = _failed_auth(TokenConnector("alpha", SECRET, limits=LIMITS), SimpleAckListener)
    server_closed, client_closed = sim.server_app.closed, sim.client_app.closed
    assert server_closed is not None and client_closed is not None
    assert server_closed.code == client_closed.code == CloseCode.AUTHENTICATION_FAILED
    assert not client_closed.by_peer and server_closed.by_peer
    for closed in (server_closed, client_closed):
        assert "SimpleAck" in closed.reason and "token" in closed.reason


# 2. Authentication timeouts -------------------------------------------------------


class SilentAuthenticator(Authenticator):
    """Never says anything and never decides: a stuck or hostile peer."""

    scheme = "silent"

    def _process(self) -> None:
        pass

    def _on_eof(self) -> None:
        pass


def assert_timed_out_after(app: App, auth_timeout: float) -> None:
    """The close came ``auth_timeout`` after the handshake ended (Limits' definition)."""
    handshake, closed = app.first(HandshakeCompleted), app.first(ConnectionTerminated)
    assert handshake is not None and closed is not None
    assert auth_timeout <= closed[0] - handshake[0] <= auth_timeout + 0.01


def test_server_times_out_a_client_that_never_answers() -> None:
    server_limits = Limits(auth_timeout=4.0)
    sim = Simulation(
        server_auth=SimpleAckListener,
        client_auth=SilentAuthenticator(),
        limits=server_limits,
        client_limits=Limits(auth_timeout=60.0),
    )
    sim.run_until(lambda: closed_both(sim), timeout=30)
    server_closed, client_closed = sim.server_app.closed, sim.client_app.closed
    assert server_closed is not None and client_closed is not None
    assert not server_closed.by_peer and client_closed.by_peer
    assert server_closed.code == client_closed.code == CloseCode.AUTHENTICATION_TIMEOUT
    assert client_closed.reason == server_closed.reason != ""
    assert_timed_out_after(sim.server_app, server_limits.auth_timeout)
    sim.run_until_quiet()
    assert len(sim.server) == 0


def test_client_times_out_a_server_that_never_says_hello() -> None:
    client_limits = Limits(auth_timeout=3.0)
    sim = Simulation(
        server_auth=lambda peer_name: SilentAuthenticator(),
        client_auth=SimpleAckConnector(),
        limits=Limits(auth_timeout=60.0),
        client_limits=client_limits,
    )
    sim.run_until(lambda: closed_both(sim), timeout=30)
    server_closed, client_closed = sim.server_app.closed, sim.client_app.closed
    assert server_closed is not None and client_closed is not None
    assert not client_closed.by_peer and server_closed.by_peer
    assert server_closed.code == client_closed.code == CloseCode.AUTHENTICATION_TIMEOUT
    assert_timed_out_after(sim.client_app, client_limits.auth_timeout)
    assert not sim.client_app.of_type(AuthenticationCompleted)


# 3. Streams both ways ---------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        ADDRESS,
        RouteAddress.of("a/b", "c\\d", "", "ünïcødé"),
        RouteAddress.of(),
        RouteAddress.of(""),
    ],
    ids=["proxy-tcp", "escapes", "empty", "one-empty-segment"],
)
@pytest.mark.parametrize("opener_side", ["client", "server"])
def test_stream_request_carries_the_exact_address(address: RouteAddress, opener_side: str) -> None:
    sim = connected()
    opener = sim.client if opener_side == "client" else sim.server_tunnel
    acceptor_app = sim.server_app if opener_side == "client" else sim.client_app
    stream_id = open_stream(sim, opener, address)
    assert acceptor_app.of_type(StreamRequested) == [
        StreamRequested(stream_id=stream_id, address=address)
    ]
    assert events_for(app_of(sim, opener), stream_id) == [StreamAccepted(stream_id=stream_id)]
    # Client streams are even, server streams odd (and never 1, the auth channel).
    assert stream_id % 2 == (0 if opener_side == "client" else 1)
    assert stream_id != 1


LINKS = {
    "clean": Link(),
    "loss": Link(loss=0.05),
    "reorder": Link(jitter=0.02),
    "duplicate": Link(duplicate=0.1),
    "all": Link(loss=0.05, jitter=0.02, duplicate=0.1),
}


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("link", list(LINKS.values()), ids=list(LINKS))
def test_simultaneous_bidirectional_transfers_arrive_intact(link: Link, seed: int) -> None:
    sim = connected(link=link, seed=seed)
    server = sim.server_tunnel
    up = open_stream(sim, sim.client, RouteAddress.of("up"))
    down = open_stream(sim, server, RouteAddress.of("down"))
    size = 384 * 1024
    data = {
        (sim.client, up): payload(size, seed=10 + seed),
        (server, up): payload(size, seed=20 + seed),
        (sim.client, down): payload(size, seed=30 + seed),
        (server, down): payload(size, seed=40 + seed),
    }
    writers = [Writer(sim, tunnel, sid, blob) for (tunnel, sid), blob in data.items()]
    pump_all(sim, writers, timeout=120)
    sim.run_until(
        lambda: {up, down} <= sim.server_app.ended and {up, down} <= sim.client_app.ended,
        timeout=120,
    )
    for (tunnel, sid), blob in data.items():
        receiver = sim.server_app if tunnel is sim.client else sim.client_app
        assert digest(receiver.received[sid]) == digest(blob), (tunnel.role, sid)
    for app in (sim.client_app, sim.server_app):
        assert not app.of_type(StreamReset) and not app.of_type(StreamRejected)
        assert app.closed is None


# 4. Half-close ----------------------------------------------------------------------


@pytest.mark.parametrize("first_to_end", ["opener", "acceptor"])
def test_half_close_keeps_the_other_direction_open(first_to_end: str) -> None:
    sim = connected(link=Link(loss=0.02, jitter=0.005), seed=3)
    stream_id = open_stream(sim, sim.client)
    server = sim.server_tunnel
    early, late = (sim.client, server) if first_to_end == "opener" else (server, sim.client)
    early_app, late_app = app_of(sim, early), app_of(sim, late)
    early_data, late_data = payload(100_000, seed=5), payload(600_000, seed=6)

    send_all(sim, early, stream_id, early_data, end=True)
    sim.run_until(lambda: stream_id in late_app.ended, timeout=30)
    assert late_app.received[stream_id] == early_data
    # The ended side can no longer write; the other side writes on as before.
    assert early.send_capacity(stream_id) == 0
    with pytest.raises(LocalProtocolError):
        early.send_data(stream_id, b"more")
    assert late.send_capacity(stream_id) > 0
    assert stream_id not in early_app.ended

    send_all(sim, late, stream_id, late_data, end=True)
    sim.run_until(lambda: stream_id in early_app.ended, timeout=60)
    assert digest(early_app.received[stream_id]) == digest(late_data)
    for app in (early_app, late_app):
        assert events_for(app, stream_id, StreamEnded) == [StreamEnded(stream_id=stream_id)]
        assert not events_for(app, stream_id, StreamReset)
    # The stream is over for both; the tunnel is not.
    assert open_stream(sim, late) is not None


# 5. Refusal, reset, close -----------------------------------------------------------


def test_refused_route_reaches_the_opener() -> None:
    sim = connected()
    sim.server_app.route = lambda address: address != RouteAddress.of("nope")
    refused = open_stream(sim, sim.client, RouteAddress.of("nope"))
    (event,) = events_for(sim.client_app, refused)
    assert isinstance(event, StreamRejected) and "refused" in event.reason
    with pytest.raises(LocalProtocolError):
        sim.client.send_data(refused, b"x")
    sim.run_for(1.0)
    # The acceptor heard the request and nothing else; the tunnel still works.
    assert events_for(sim.server_app, refused) == [
        StreamRequested(stream_id=refused, address=RouteAddress.of("nope"))
    ]
    accepted = open_stream(sim, sim.client, RouteAddress.of("yes"))
    send_all(sim, sim.client, accepted, b"hello")
    sim.run_until(lambda: accepted in sim.server_app.ended)
    assert sim.server_app.received[accepted] == b"hello"


@pytest.mark.parametrize("resetter_side", ["client", "server"])
def test_reset_reaches_the_peer_with_its_code(resetter_side: str) -> None:
    sim = connected(link=Link(jitter=0.01), seed=4)
    stream_id = open_stream(sim, sim.client)
    server = sim.server_tunnel
    resetter, other = (sim.client, server) if resetter_side == "client" else (server, sim.client)
    other_app = app_of(sim, other)
    # The other side is busy writing when the reset comes.
    writer = Writer(sim, other, stream_id, payload(2_000_000))
    sim.run_until(lambda: writer.pump() or writer.offset > 200_000, timeout=30)
    resetter.reset_stream(stream_id, 0x42)
    sim.touch(resetter)
    with pytest.raises(LocalProtocolError):
        resetter.send_data(stream_id, b"x")
    sim.run_until(lambda: events_for(other_app, stream_id, StreamReset), timeout=10)
    (reset,) = events_for(other_app, stream_id, StreamReset)
    assert isinstance(reset, StreamReset)
    assert reset.code == 0x42 and reset.by_peer
    # The resetter hears nothing of its own reset; the writer can no longer write.
    assert not events_for(app_of(sim, resetter), stream_id, StreamReset)
    assert other.state is TunnelState.AUTHENTICATED
    with pytest.raises(LocalProtocolError):
        other.send_data(stream_id, b"x")
    sim.run_for(2.0)
    assert len(events_for(other_app, stream_id, StreamReset)) == 1


@pytest.mark.parametrize("closer_side", ["client", "server"])
def test_close_reaches_the_peer_and_everything_terminates(closer_side: str) -> None:
    sim = connected()
    stream_id = open_stream(sim, sim.client)
    server = sim.server_tunnel
    closer = sim.client if closer_side == "client" else server
    closer_app, peer_app = (
        (sim.client_app, sim.server_app)
        if closer_side == "client"
        else (sim.server_app, sim.client_app)
    )
    cids = server._quic.host_connection_ids
    assert cids
    closer.send_data(stream_id, b"in flight")  # open streams do not hold the close up
    closer.close(CloseCode.SHUTTING_DOWN, "going away for maintenance")
    closer.close(CloseCode.NORMAL, "again")  # idempotent
    sim.touch(closer)
    sim.run_until(lambda: closed_both(sim), timeout=5)
    assert closer_app.closed == ConnectionTerminated(
        code=CloseCode.SHUTTING_DOWN,
        reason="going away for maintenance",
        by_peer=False,
        application=True,
    )
    assert peer_app.closed == ConnectionTerminated(
        code=CloseCode.SHUTTING_DOWN,
        reason="going away for maintenance",
        by_peer=True,
        application=True,
    )
    for tunnel in (sim.client, server):
        assert tunnel.state is TunnelState.CLOSED
        with pytest.raises(LocalProtocolError):
            tunnel.open_stream(ADDRESS)
    sim.run_until_quiet(timeout=10)
    for tunnel in (sim.client, server):
        assert tunnel.is_terminated
        assert tunnel.get_timer() is None
        assert tunnel.datagrams_to_send(sim.now) == []
        assert tunnel.next_event() is None
    assert len(sim.server) == 0
    assert sim.server.get_timer() is None
    assert sim.server.datagrams_to_send(sim.now) == []
    for app in (sim.client_app, sim.server_app):
        assert isinstance(app.events[-1], ConnectionTerminated)
    # A late datagram for the forgotten tunnel reaches nothing and starts nothing.
    dropped = sim.server.dropped_datagrams
    for cid in cids:
        sim.server.receive_datagram(b"\x40" + cid + bytes(40), CLIENT_ADDR, sim.now)
    assert sim.server.dropped_datagrams == dropped + len(cids)
    assert len(sim.server) == 0 and sim.server.datagrams_to_send(sim.now) == []


# 6. Backpressure --------------------------------------------------------------------


def _receive_backlog(app: App) -> int:
    return sum(app.unacknowledged.values())


def test_stalled_reader_bounds_both_buffers_and_then_drains() -> None:
    limits = Limits(stream_receive_window=64 * 1024, stream_send_buffer=128 * 1024)
    sim = connected(limits=limits, link=Link(loss=0.01), seed=5)
    sim.server_app.consume = False
    stream_id = open_stream(sim, sim.client)
    engine = sim.client._quic
    peak = {"backlog": 0, "buffered": 0}

    def within_limits() -> None:
        backlog = _receive_backlog(sim.server_app)
        buffered = engine.send_buffered(stream_id)
        peak["backlog"] = max(peak["backlog"], backlog)
        peak["buffered"] = max(peak["buffered"], buffered)
        assert backlog <= limits.stream_receive_window
        assert buffered <= limits.stream_send_buffer

    sim.checks.append(within_limits)
    data = payload(1_000_000, seed=7)
    writer = Writer(sim, sim.client, stream_id, data)
    sim.run_until(lambda: writer.pump() or sim.client.send_capacity(stream_id) == 0, timeout=30)
    sim.run_for(60.0)  # many seconds with a stalled reader
    assert not writer.pump()
    assert sim.client.send_capacity(stream_id) == 0
    with pytest.raises(SendBufferFull):
        sim.client.send_data(stream_id, b"x")
    # The reader holds at most a window (credit is re-granted in half-window steps),
    # and exactly a send buffer's worth waits in the writer.
    window = limits.stream_receive_window
    assert window // 2 < _receive_backlog(sim.server_app) <= window
    assert engine.send_buffered(stream_id) == limits.stream_send_buffer
    assert writer.offset == _receive_backlog(sim.server_app) + limits.stream_send_buffer
    assert sim.client_app.closed is None and sim.server_app.closed is None

    # The reader catches up: credit flows, the writer hears it may write again.
    writable_before = len(events_for(sim.client_app, stream_id, StreamWritable))
    sim.server_app.consume = True
    sim.server_app.acknowledge_all(sim.server_tunnel)
    sim.touch(sim.server_tunnel)
    sim.run_until(
        lambda: len(events_for(sim.client_app, stream_id, StreamWritable)) > writable_before,
        timeout=10,
    )
    assert sim.client.send_capacity(stream_id) > 0
    pump_all(sim, [writer], timeout=60)
    sim.run_until(lambda: stream_id in sim.server_app.ended, timeout=60)
    assert digest(sim.server_app.received[stream_id]) == digest(data)
    assert peak["backlog"] <= window and peak["buffered"] == limits.stream_send_buffer


def test_tunnel_wide_buffers_bound_several_streams_together() -> None:
    limits = Limits(
        stream_receive_window=32 * 1024,
        tunnel_receive_window=64 * 1024,
        stream_send_buffer=48 * 1024,
        tunnel_send_buffer=96 * 1024,
    )
    sim = connected(limits=limits, link=Link(jitter=0.005), seed=6)
    sim.server_app.consume = False
    stream_ids = [open_stream(sim, sim.client, RouteAddress.of(str(n))) for n in range(4)]
    engine = sim.client._quic

    def within_limits() -> None:
        buffered = [engine.send_buffered(sid) for sid in stream_ids]
        assert max(buffered) <= limits.stream_send_buffer
        assert sum(buffered) <= limits.tunnel_send_buffer
        backlog = [sim.server_app.unacknowledged[sid] for sid in stream_ids]
        assert max(backlog) <= limits.stream_receive_window
        assert sum(backlog) <= limits.tunnel_receive_window

    sim.checks.append(within_limits)
    data = {sid: payload(300_000, seed=sid) for sid in stream_ids}
    writers = [Writer(sim, sim.client, sid, blob) for sid, blob in data.items()]

    def all_full() -> bool:
        for writer in writers:
            writer.pump()
        return all(sim.client.send_capacity(sid) == 0 for sid in stream_ids)

    sim.run_until(all_full, timeout=30)
    deadline = sim.now + 30.0  # many seconds of a stalled reader and an eager writer
    while sim.now < deadline:
        all_full()
        sim.step(until=deadline)
    assert all_full()
    assert sum(engine.send_buffered(sid) for sid in stream_ids) == limits.tunnel_send_buffer
    window = limits.tunnel_receive_window
    assert window // 2 < _receive_backlog(sim.server_app) <= window
    for sid in stream_ids:
        with pytest.raises(SendBufferFull):
            sim.client.send_data(sid, b"x")

    sim.server_app.consume = True
    sim.server_app.acknowledge_all(sim.server_tunnel)
    sim.touch(sim.server_tunnel)
    pump_all(sim, writers, timeout=60)
    sim.run_until(lambda: set(stream_ids) <= sim.server_app.ended, timeout=60)
    for sid, blob in data.items():
        assert digest(sim.server_app.received[sid]) == digest(blob)
    assert {e.stream_id for e in sim.client_app.of_type(StreamWritable)} == set(stream_ids)  # type: ignore[attr-defined]


def test_send_beyond_capacity_is_refused_and_writes_nothing() -> None:
    sim = connected()
    stream_id = open_stream(sim, sim.client)
    capacity = sim.client.send_capacity(stream_id)
    before = sim.client._quic.send_buffered(stream_id)
    assert capacity == LIMITS.stream_send_buffer - before
    with pytest.raises(SendBufferFull):
        sim.client.send_data(stream_id, bytes(capacity + 1))
    assert sim.client._quic.send_buffered(stream_id) == before
    sim.client.send_data(stream_id, bytes(capacity))
    assert sim.client.send_capacity(stream_id) == 0


@pytest.mark.parametrize("resetter_side", ["reader", "writer"])
def test_reset_returns_the_credit_of_unread_bytes(resetter_side: str) -> None:
    """Bytes nobody will read must not shrink the tunnel's receive window for good."""
    limits = Limits(stream_receive_window=32 * 1024, tunnel_receive_window=64 * 1024)
    sim = connected(limits=limits)
    sim.server_app.consume = False
    stalled = [open_stream(sim, sim.client, RouteAddress.of("stall", str(n))) for n in range(2)]
    writers = [Writer(sim, sim.client, sid, payload(100_000)) for sid in stalled]
    # Both stalled streams fill their windows, and with them the tunnel's.
    full = limits.tunnel_receive_window - 200  # less the NYAN bytes, consumed but not re-granted
    sim.run_until(
        lambda: [w.pump() for w in writers] and _receive_backlog(sim.server_app) >= full,
        timeout=10,
    )
    resetter = sim.server_tunnel if resetter_side == "reader" else sim.client
    for sid in stalled:
        resetter.reset_stream(sid)
    sim.touch(resetter)
    sim.server_app.consume = True
    sim.server_app.unacknowledged.clear()
    fresh = open_stream(sim, sim.client, RouteAddress.of("fresh"))
    data = payload(300_000, seed=9)
    send_all(sim, sim.client, fresh, data, timeout=30)
    sim.run_until(lambda: fresh in sim.server_app.ended, timeout=30)
    assert sim.server_app.received[fresh] == data


@pytest.mark.parametrize("seed", [2, 3, 5, 14])
def test_resets_amid_out_of_order_bytes_grant_no_extra_credit(seed: int) -> None:
    """Bytes that arrive after a reset, having been paid for when it released the
    stream, must not be credited again: that would widen the tunnel window for good."""
    limits = Limits(stream_receive_window=64 * 1024, tunnel_receive_window=128 * 1024)
    sim = connected(limits=limits, link=Link(loss=0.1, jitter=0.02), seed=seed)
    server = sim.server_tunnel
    sim.checks.append(lambda: assert_credit_is_earned(server))
    stream_ids = [open_stream(sim, sim.client, RouteAddress.of(str(n))) for n in range(4)]
    data = {sid: payload(200_000, seed=sid) for sid in stream_ids}
    writers = [Writer(sim, sim.client, sid, blob) for sid, blob in data.items()]
    for _ in range(40):
        for writer in writers:
            writer.pump()
        sim.step()
    for sid in stream_ids[:3]:
        server.reset_stream(sid)
    sim.touch(server)
    survivor = stream_ids[3]
    pump_all(sim, writers[3:], timeout=60)
    sim.run_until(lambda: survivor in sim.server_app.ended, timeout=60)
    assert digest(sim.server_app.received[survivor]) == digest(data[survivor])


# 7. Negotiation faults (a peer driving its QUIC engine directly) ----------------------


def address_frame(address: RouteAddress = ADDRESS) -> bytes:
    return encode_frame(address.encode())


def test_wrong_magic_resets_only_that_stream() -> None:
    sim = connected()
    raw = RawStreams(sim.client)
    bad = raw.open(b"NYAX\x00" + address_frame())
    sim.run_until(lambda: bad in raw.resets, timeout=5)
    assert raw.resets[bad] == StreamCode.PROTOCOL_VIOLATION
    assert not sim.server_app.of_type(StreamRequested)
    assert sim.server_tunnel.state is TunnelState.AUTHENTICATED
    good = open_stream(sim, sim.client)
    data = payload(200_000, seed=11)
    send_all(sim, sim.client, good, data)
    sim.run_until(lambda: good in sim.server_app.ended)
    assert sim.server_app.received[good] == data
    assert sim.client_app.closed is None and sim.server_app.closed is None


def test_missing_header_is_reset_after_the_negotiation_timeout() -> None:
    limits = Limits(negotiation_timeout=4.0)
    sim = connected(limits=limits)
    raw = RawStreams(sim.client)
    start = sim.now
    stuck = raw.open(b"NY")
    sim.run_until(lambda: stuck in raw.resets, timeout=20)
    assert raw.resets[stuck] == StreamCode.TIMEOUT
    assert limits.negotiation_timeout <= sim.now - start <= limits.negotiation_timeout + 0.5
    assert not sim.server_app.of_type(StreamRequested)
    assert sim.server_tunnel.state is TunnelState.AUTHENTICATED


def test_opener_times_out_an_acceptor_that_never_answers() -> None:
    limits = Limits(negotiation_timeout=3.0)
    sim = connected(limits=limits)
    raw = RawStreams(sim.server_tunnel)
    stream_id = sim.client.open_stream(ADDRESS)
    # The server's engine hides the stream from its tunnel: nobody answers.
    raw.ids.add(stream_id)
    sim.run_until(lambda: events_for(sim.client_app, stream_id), timeout=10)
    (event,) = events_for(sim.client_app, stream_id)
    assert isinstance(event, StreamRejected) and "timed out" in event.reason
    assert raw.received[stream_id].startswith(HEADER)


def test_unsupported_version_closes_the_tunnel() -> None:
    sim = connected()
    raw = RawStreams(sim.client)
    raw.open(b"NYAN\x01" + address_frame())
    sim.run_until(lambda: closed_both(sim), timeout=5)
    server_closed, client_closed = sim.server_app.closed, sim.client_app.closed
    assert server_closed is not None and client_closed is not None
    assert server_closed.code == client_closed.code == CloseCode.UNSUPPORTED_VERSION
    assert not server_closed.by_peer and client_closed.by_peer
    assert "version 1" in client_closed.reason


def test_address_size_limit_is_2048_bytes() -> None:
    sim = connected()
    sim.server_app.route = lambda address: True
    raw = RawStreams(sim.client)
    largest = RouteAddress.of("a" * 2047)
    assert len(largest.encode()) == 2048
    fits = raw.open(HEADER + address_frame(largest))
    too_big = raw.open(HEADER + encode_frame(b"/" + b"a" * 2048))
    huge_prefix = raw.open(HEADER + (1 << 31).to_bytes(4, "big"))
    sim.run_until(lambda: {too_big, huge_prefix} <= set(raw.resets), timeout=5)
    assert raw.resets[too_big] == raw.resets[huge_prefix] == StreamCode.PROTOCOL_VIOLATION
    sim.run_until(lambda: raw.received[fits] == HEADER + b"\x00", timeout=5)
    assert sim.server_app.of_type(StreamRequested) == [
        StreamRequested(stream_id=fits, address=largest)
    ]


def test_bad_address_text_resets_the_stream() -> None:
    sim = connected()
    raw = RawStreams(sim.client)
    bad = [
        raw.open(HEADER + encode_frame(b"no-leading-slash")),
        raw.open(HEADER + encode_frame(b"/bad\\escape")),
        raw.open(HEADER + encode_frame(b"/\xff\xfe")),
        raw.open(HEADER + b"\x00\x00", end=True),  # EOF inside the length prefix
    ]
    sim.run_until(lambda: set(bad) <= set(raw.resets), timeout=5)
    assert {raw.resets[sid] for sid in bad} == {StreamCode.PROTOCOL_VIOLATION}
    assert not sim.server_app.of_type(StreamRequested)
    assert sim.server_tunnel.state is TunnelState.AUTHENTICATED


def test_pending_requests_beyond_the_limit_are_refused() -> None:
    limits = Limits(max_pending_requests=3)
    sim = connected(limits=limits)
    sim.server_app.route = lambda address: None  # undecided
    raw = RawStreams(sim.client)
    opened = [raw.open(HEADER + address_frame(RouteAddress.of(str(n)))) for n in range(5)]
    sim.run_until(lambda: len(raw.resets) == 2, timeout=5)
    sim.run_for(1.0)
    requested = [e.stream_id for e in sim.server_app.of_type(StreamRequested)]  # type: ignore[attr-defined]
    assert requested == opened[:3]
    assert raw.resets == {sid: StreamCode.LIMIT_EXCEEDED for sid in opened[3:]}
    server = sim.server_tunnel
    for sid in requested:
        server.accept_stream(sid)
    sim.touch(server)
    sim.run_until(lambda: all(raw.received[sid] == HEADER + b"\x00" for sid in requested))
    raw.send(requested[0], b"service bytes", end=True)
    sim.run_until(lambda: requested[0] in sim.server_app.ended)
    assert sim.server_app.received[requested[0]] == b"service bytes"
    # Decided requests free their slots.
    later = raw.open(HEADER + address_frame(RouteAddress.of("later")))
    sim.run_until(lambda: events_for(sim.server_app, later, StreamRequested), timeout=5)
    assert later not in raw.resets


def test_refused_over_limit_stream_stays_refused_when_a_slot_frees() -> None:
    """More bytes on a stream refused for the pending limit, after the limit has room again."""
    limits = Limits(max_pending_requests=1)
    sim = connected(limits=limits)
    first = RouteAddress.of("first")
    sim.server_app.route = lambda address: True if address == first else None
    raw = RawStreams(sim.client)
    accepted = raw.open(HEADER + address_frame(first))
    over = raw.open(HEADER + address_frame(RouteAddress.of("over")))
    sim.flush()
    sim.now += 0.001  # the rest of "over" leaves a little later, in another datagram
    raw.send(over, b"more bytes after the address")
    sim.flush()
    sim.run_until(lambda: over in raw.resets, timeout=5)
    sim.run_for(1.0)
    assert raw.resets[over] == StreamCode.LIMIT_EXCEEDED
    assert not events_for(sim.server_app, over)
    assert raw.received[accepted] == HEADER + b"\x00"
    assert sim.server_tunnel.state is TunnelState.AUTHENTICATED


# 8. Streams from a peer that is not authenticated yet --------------------------------


def _held_stream_sim() -> tuple[Simulation, RawStreams, int]:
    sim = Simulation(
        server_auth=token_server(), client_auth=TokenConnector("alpha", SECRET, limits=LIMITS)
    )
    sim.server_app.credentials = {"alpha": SECRET}
    sim.server_app.hold_credentials = True
    sim.run_until(lambda: sim.server_app.of_type(CredentialRequired), timeout=5)
    raw = RawStreams(sim.client)
    stream_id = raw.open(HEADER + address_frame() + b"early bytes")
    sim.run_for(2.0)
    assert sim.server_tunnel.state is TunnelState.AUTHENTICATING
    assert not sim.server_app.of_type(StreamRequested)
    assert not sim.server_app.of_type(DataReceived)
    assert raw.received[stream_id] == b""  # not even the acceptor's header went out
    return sim, raw, stream_id


def test_streams_before_authentication_are_held_then_processed() -> None:
    sim, raw, stream_id = _held_stream_sim()
    server = sim.server_tunnel
    server.supply_credential(SECRET)
    sim.touch(server)
    sim.run_until(lambda: stream_id in sim.server_app.received, timeout=5)
    assert sim.server_app.of_type(StreamRequested) == [
        StreamRequested(stream_id=stream_id, address=ADDRESS)
    ]
    assert bytes(sim.server_app.received[stream_id]) == b"early bytes"
    sim.run_until(lambda: raw.received[stream_id] == HEADER + b"\x00", timeout=5)
    kinds = [type(e) for e in sim.server_app.events]
    assert kinds.index(AuthenticationCompleted) < kinds.index(StreamRequested)


def test_streams_before_failed_authentication_never_surface() -> None:
    sim, raw, stream_id = _held_stream_sim()
    server = sim.server_tunnel
    server.supply_credential(WRONG_SECRET)
    sim.touch(server)
    sim.run_until(lambda: closed_both(sim), timeout=5)
    sim.run_until_quiet()
    assert not sim.server_app.of_type(StreamRequested)
    assert not sim.server_app.of_type(DataReceived)
    assert raw.received[stream_id] == b""


def test_client_may_not_open_streams_before_authentication() -> None:
    sim = Simulation(
        server_auth=token_server(), client_auth=TokenConnector("alpha", SECRET, limits=LIMITS)
    )
    sim.server_app.credentials = {"alpha": SECRET}
    sim.server_app.hold_credentials = True
    with pytest.raises(LocalProtocolError):
        sim.client.open_stream(ADDRESS)
    sim.run_until(lambda: sim.server_app.of_type(CredentialRequired), timeout=5)
    for tunnel in (sim.client, sim.server_tunnel):
        with pytest.raises(LocalProtocolError):
            tunnel.open_stream(ADDRESS)


# 10. Keep-alive ---------------------------------------------------------------------


def test_keepalive_holds_an_idle_tunnel_open() -> None:
    sim = connected()
    sim.run_for(75.0)  # idle timeout is 30 s
    assert sim.client_app.closed is None and sim.server_app.closed is None
    stream_id = open_stream(sim, sim.client)
    send_all(sim, sim.client, stream_id, b"still here")
    sim.run_until(lambda: stream_id in sim.server_app.ended)
    assert sim.server_app.received[stream_id] == b"still here"


def test_an_idle_tunnel_costs_one_ping_and_its_ack_per_client_interval() -> None:
    sim = connected(link=Link(delay=0.005))
    sim.run_for(5.0)
    sim.sent_log = []
    start = sim.now
    sim.run_for(150.0)
    from_client = [t for t, source, _ in sim.sent_log if source == CLIENT_ADDR]
    from_server = [t for t, source, _ in sim.sent_log if source == SERVER_ADDR]
    # The client pings every 15 s of silence (+ a round trip); the aggregator, whose
    # own fallback is 20 s here (2/3 of 30), only ever answers, at once rather than
    # after an ACK delay.
    assert 9 <= len(from_client) <= 10
    assert len(from_server) == len(from_client)
    for sent, answered in zip(from_client, from_server, strict=True):
        assert answered == pytest.approx(sent + 0.005)
    assert from_client[0] - start <= 15.0


def test_a_stream_opened_after_a_long_silence_gets_its_whole_negotiation_time() -> None:
    # 14 s without a datagram or a timer: the tunnel's last notion of "now" is that old.
    sim = connected(link=Link(delay=0.005))
    sim.run_for(14.0)
    stream_id = open_stream(sim, sim.client)
    assert sim.client_app.of_type(StreamAccepted)[-1] == StreamAccepted(stream_id=stream_id)


def test_the_aggregator_keeps_a_tunnel_to_a_silent_client_open() -> None:
    # A client that never pings (snocat 0.8 need not): the aggregator's fallback does.
    sim = connected(keepalive_interval=None)
    sim.run_for(75.0)
    assert sim.client_app.closed is None and sim.server_app.closed is None


def test_the_keepalive_follows_the_shorter_idle_timeout_of_the_peer() -> None:
    # The aggregator allows 8 s of silence: the client's 15 s setting must shrink.
    sim = connected(server_keepalive_interval=None, server_idle_timeout=8.0)
    sim.run_for(60.0)
    assert sim.client_app.closed is None and sim.server_app.closed is None


def test_a_downloading_client_whose_address_changes_is_found_again_at_once() -> None:
    # A NAT rebinding during a pause in a download: what the aggregator sends next goes
    # to the lapsed mapping, and the client, which only receives, has nothing to send.
    # Its probe of the silence (1 s while streams are open, not the 15 s keep-alive)
    # carries its new address, which the aggregator follows.
    sim = connected(link=Link(delay=0.005))
    stream_id = open_stream(sim, sim.client)
    first, rest = payload(500_000, seed=1), payload(1_500_000, seed=2)
    send_all(sim, sim.server_tunnel, stream_id, first, end=False)
    sim.run_for(0.5)  # all of it received and acknowledged: nothing left to say
    received = sim.client_app.received[stream_id]
    assert received == first
    (client,) = sim.clients
    client.address = ("10.0.0.2", 50001)
    moved_at = sim.now
    send_all(sim, sim.server_tunnel, stream_id, rest)
    sim.run_until(lambda: stream_id in sim.client_app.ended, timeout=30)
    assert digest(received) == digest(first + rest)
    assert sim.now - moved_at < 3.0
    assert sim.client_app.closed is None and sim.server_app.closed is None


def test_an_open_but_quiet_stream_costs_a_few_probes_then_the_keepalive() -> None:
    # An idle interactive session: the silence probe backs off (1, 2, 4, 8 s) to the
    # keep-alive interval instead of pinging every second for hours.
    sim = connected(link=Link(delay=0.005))
    open_stream(sim, sim.client)
    sim.run_for(1.0)
    sim.sent_log = []
    sim.run_for(150.0)
    from_client = [t for t, source, _ in sim.sent_log if source == CLIENT_ADDR]
    assert len(from_client) <= 4 + 150 / 15 + 1
    assert sim.client_app.closed is None and sim.server_app.closed is None


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_a_client_with_open_streams_notices_a_dead_aggregator_within_5_s(direction: str) -> None:
    # The aggregator vanishes mid-transfer (its process killed: nothing comes back, not
    # even an ICMP error here).  Without the rule the client waited for the 30 s idle
    # timeout; with it, a probe unanswered for probe_answer_timeout closes the tunnel.
    sim = connected(link=Link(delay=0.005))
    stream_id = open_stream(sim, sim.client)
    sender = sim.server_tunnel if direction == "download" else sim.client
    sender.send_data(stream_id, payload(200_000, seed=3))
    sim.flush()
    sim.run_for(0.2)
    sim.link.loss = 1.0
    died_at = sim.now
    if direction == "upload":
        sim.client.send_data(stream_id, payload(50_000, seed=4))
        sim.flush()
    sim.run_until(lambda: sim.client_app.closed is not None, timeout=30)
    assert sim.now - died_at < 5.0
    closed = sim.client_app.closed
    assert closed is not None and "no answer from the peer" in closed.reason
    assert sim.client_app.first(ConnectionTerminated) is not None


def test_an_idle_client_notices_a_dead_aggregator_within_its_idle_timeout() -> None:
    # No streams open: no extra probes are spent; the keep-alive (15 s) going
    # unanswered is the sign.  Without the rule, the PING itself restarted the idle
    # timer (RFC 9000 10.1) and a dead aggregator was noticed after 45 s.
    sim = connected(link=Link(delay=0.005))
    sim.run_for(1.0)
    sim.link.loss = 1.0
    died_at = sim.now
    sim.run_until(lambda: sim.client_app.closed is not None, timeout=60)
    assert 15.0 <= sim.now - died_at < 30.0


def test_an_aggregator_opening_a_stream_to_a_vanished_client_closes_within_4_s() -> None:
    # A client process killed (kill -9: no goodbye): the aggregator learns of it when a
    # visitor's stream goes unanswered, not at the idle timeout (30 s), so the visitor
    # is tried on another member of a pool and the port is free again soon.  Without
    # the rule the open waited for the negotiation timeout (10 s) and the tunnel stayed.
    sim = connected(link=Link(delay=0.005))  # idle timeout 30 s
    sim.run_for(1.0)
    sim.link.loss = 1.0
    died_at = sim.now
    stream_id = sim.server_tunnel.open_stream(ADDRESS)
    sim.touch(sim.server_tunnel)
    sim.run_until(lambda: sim.server_app.closed is not None, timeout=30)
    assert sim.now - died_at < 4.0
    closed = sim.server_app.closed
    assert closed is not None and "no answer from the peer" in closed.reason
    assert not events_for(sim.server_app, stream_id, StreamAccepted)


def test_a_lossy_client_answering_late_keeps_its_tunnel_and_its_stream() -> None:
    # 20 % loss each way while the aggregator opens streams: the open or its ACK is
    # often lost, but aioquic retransmits it within the answer timeout.
    sim = connected(link=Link(delay=0.02, jitter=0.01))
    sim.link.loss = 0.2
    for _ in range(30):
        sim.run_for(5.0)
        stream_id = open_stream(sim, sim.server_tunnel)
        assert events_for(sim.server_app, stream_id, StreamAccepted)
    assert sim.client_app.closed is None and sim.server_app.closed is None


def test_a_quiet_stream_on_a_lossy_path_is_not_taken_for_a_dead_aggregator() -> None:
    # 20 % loss each way: a probe or its ACK is often lost, but aioquic retransmits the
    # PING within the answer timeout, so a live aggregator is never given up on.
    sim = connected(link=Link(delay=0.02, jitter=0.01))
    open_stream(sim, sim.client)
    sim.link.loss = 0.2
    sim.run_for(300.0)
    assert sim.client_app.closed is None and sim.server_app.closed is None


def test_without_keepalive_an_idle_tunnel_times_out() -> None:
    sim = connected(keepalive_interval=None, server_keepalive_interval=None)
    idle_since = sim.now
    sim.run_until(lambda: closed_both(sim), timeout=60)
    found = sim.client_app.first(ConnectionTerminated)
    assert found is not None
    at, closed = found
    assert isinstance(closed, ConnectionTerminated)
    assert 30.0 <= at - idle_since <= 35.0
    assert "idle" in closed.reason.lower()
    assert not closed.application  # a transport-level end, whatever its code says
    sim.run_until_quiet()
    assert len(sim.server) == 0


# 11. A stateful model of two peers over a bad network ------------------------------


STATEFUL_LIMITS = Limits(
    stream_send_buffer=24 * 1024,
    tunnel_send_buffer=48 * 1024,
    stream_receive_window=16 * 1024,
    tunnel_receive_window=32 * 1024,
    max_pending_requests=8,
)


#: NYAN bytes one stream may write outside the send buffers (model addresses are short).
NEGOTIATION_ALLOWANCE = len(HEADER) + 4 + len("/model/server") + 1


class TunnelPair(RuleBasedStateMachine):
    """Random stream operations from both sides; bytes must arrive exactly, in order.

    Preconditions look at the model only: what the simulation reports can vary between
    runs of the same example (aioquic serves streams in set order), and Hypothesis needs
    the same rules to be enabled when it replays one.  Rules that find nothing to act on
    do nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sim: Simulation
        self.sent: dict[tuple[str, int], bytearray] = {}
        self.streams: list[int] = []
        self.reset: set[int] = set()
        self.ended: set[tuple[str, int]] = set()
        self.writes = 0

    @initialize(seed=st.integers(0, 2**16))
    def connect(self, seed: int) -> None:
        self.sim = connected(
            limits=STATEFUL_LIMITS,
            link=Link(loss=0.03, jitter=0.01, duplicate=0.03),
            seed=seed,
        )
        self.sides = {"client": self.sim.client, "server": self.sim.server_tunnel}
        self.sim.checks.append(self.buffers_within_limits)
        # Start with a stream from each side, accepted, so that data flows from step one.
        for side in ("client", "server"):
            self.streams.append(open_stream(self.sim, self.sides[side], RouteAddress.of(side)))

    def app(self, side: str) -> App:
        return self.sim.client_app if side == "client" else self.sim.server_app

    def other(self, side: str) -> str:
        return "server" if side == "client" else "client"

    def writable(self, side: str, stream_id: int) -> bool:
        """The model's view: may ``side`` write to the stream now?"""
        if stream_id in self.reset or (side, stream_id) in self.ended:
            return False
        events = events_for(self.app(side), stream_id)
        if any(isinstance(e, StreamReset | StreamRejected) for e in events):
            return False
        return any(isinstance(e, StreamAccepted | StreamRequested) for e in events)

    def candidates(self) -> list[tuple[str, int]]:
        return [
            (side, sid)
            for sid in self.streams
            for side in ("client", "server")
            if self.writable(side, sid)
        ]

    @precondition(lambda self: len(self.streams) < 8)
    @rule(side=st.sampled_from(["client", "server"]))
    def open(self, side: str) -> None:
        tunnel = self.sides[side]
        stream_id = tunnel.open_stream(RouteAddress.of("model", side))
        self.sim.touch(tunnel)
        self.streams.append(stream_id)

    @rule(pick=st.integers(0, 1000), size=st.integers(1, 40_000))
    def write(self, pick: int, size: int) -> None:
        candidates = self.candidates()
        if not candidates:
            return
        side, stream_id = candidates[pick % len(candidates)]
        tunnel = self.sides[side]
        capacity = tunnel.send_capacity(stream_id)
        self.writes += 1
        chunk = payload(min(size, capacity), seed=self.writes)
        if chunk:
            tunnel.send_data(stream_id, chunk)
            self.sim.touch(tunnel)
            self.sent.setdefault((side, stream_id), bytearray()).extend(chunk)

    @rule(size=st.integers(1, 40_000))
    def write_everywhere(self, size: int) -> None:
        """Every writable stream at once, competing for the tunnel's send buffer."""
        for side, stream_id in self.candidates():
            tunnel = self.sides[side]
            self.writes += 1
            chunk = payload(min(size, tunnel.send_capacity(stream_id)), seed=self.writes)
            if chunk:
                tunnel.send_data(stream_id, chunk)
                self.sim.touch(tunnel)
                self.sent.setdefault((side, stream_id), bytearray()).extend(chunk)

    @rule(pick=st.integers(0, 1000))
    def half_close(self, pick: int) -> None:
        candidates = self.candidates()
        if not candidates:
            return
        side, stream_id = candidates[pick % len(candidates)]
        self.sides[side].send_data(stream_id, b"", end_stream=True)
        self.sim.touch(self.sides[side])
        self.ended.add((side, stream_id))

    @rule(pick=st.integers(0, 1000), code=st.integers(0, 2**16))
    def reset_stream(self, pick: int, code: int) -> None:
        candidates = self.candidates()
        if not candidates:
            return
        side, stream_id = candidates[pick % len(candidates)]
        self.sides[side].reset_stream(stream_id, code)
        self.sim.touch(self.sides[side])
        self.reset.add(stream_id)

    @rule(seconds=st.sampled_from([0.001, 0.01, 0.05, 0.3, 2.0]))
    def advance(self, seconds: float) -> None:
        self.sim.run_for(seconds)

    def note_peer_resets(self) -> None:
        for side in ("client", "server"):
            for event in self.app(side).events:
                if isinstance(event, StreamReset | StreamRejected):
                    self.reset.add(event.stream_id)

    def buffers_within_limits(self) -> None:
        for tunnel in self.sides.values():
            buffered = [tunnel._quic.send_buffered(sid) for sid in self.streams]
            assert max(buffered, default=0) <= STATEFUL_LIMITS.stream_send_buffer
            # open_stream/accept write the NYAN bytes whatever the tunnel buffer holds:
            # a known overshoot of at most one header, address frame and status per stream.
            allowance = len(self.streams) * NEGOTIATION_ALLOWANCE
            assert sum(buffered) <= STATEFUL_LIMITS.tunnel_send_buffer + allowance
            assert_credit_is_earned(tunnel)
        for side in ("client", "server"):
            app = self.app(side)
            assert not app.unacknowledged  # the apps consume everything at once

    @invariant()
    def received_is_a_prefix_of_sent(self) -> None:
        if not hasattr(self, "sim"):
            return
        self.note_peer_resets()
        for side in ("client", "server"):
            assert self.app(side).closed is None
            received = self.app(self.other(side)).received
            for sid in self.streams:
                if sid in self.reset:
                    continue
                sent = self.sent.get((side, sid), b"")
                got = received.get(sid, b"")
                assert sent[: len(got)] == got, (side, sid, len(sent), len(got))

    def teardown(self) -> None:
        if not hasattr(self, "sim"):
            return
        sim = self.sim

        def decided() -> bool:
            return all(
                sid in self.reset
                or (
                    events_for(sim.client_app, sid, StreamAccepted | StreamRequested)
                    and events_for(sim.server_app, sid, StreamAccepted | StreamRequested)
                )
                for sid in self.streams
            )

        def progressed() -> bool:
            self.note_peer_resets()
            return decided()

        sim.run_until(progressed, timeout=30)
        # Every stream still standing is ended from both sides, then everything must arrive.
        for sid in self.streams:
            for side in ("client", "server"):
                if self.writable(side, sid):
                    self.half_close_exact(side, sid)
        live = [sid for sid in self.streams if sid not in self.reset]

        def all_arrived() -> bool:
            self.note_peer_resets()
            return all(
                sid in self.reset or (sid in sim.server_app.ended and sid in sim.client_app.ended)
                for sid in live
            )

        sim.run_until(all_arrived, timeout=120)
        for sid in live:
            if sid in self.reset:
                continue
            for side in ("client", "server"):
                sent = bytes(self.sent.get((side, sid), b""))
                got = bytes(self.app(self.other(side)).received.get(sid, b""))
                assert got == sent, (side, sid, len(sent), len(got))
        assert sim.client_app.closed is None and sim.server_app.closed is None

    def half_close_exact(self, side: str, stream_id: int) -> None:
        self.sides[side].send_data(stream_id, b"", end_stream=True)
        self.sim.touch(self.sides[side])
        self.ended.add((side, stream_id))


TunnelPair.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_tunnel_pair_model = TunnelPair.TestCase


@pytest.mark.parametrize("decision", ["accept", "refuse"])
def test_a_decision_on_a_stream_the_peer_aborted_meanwhile_is_a_no_op(decision: str) -> None:
    # The application cannot know that the request it is deciding was reset since.
    sim = connected()
    sim.server_app.route = lambda address: None  # hold the decision
    stream_id = sim.client.open_stream(ADDRESS)
    sim.touch(sim.client)
    sim.run_until(lambda: bool(sim.server_app.of_type(StreamRequested)), timeout=5)
    sim.client.reset_stream(stream_id)
    sim.touch(sim.client)
    sim.run_for(2.0)  # the reset arrives and the server's record is purged
    server = sim.server_tunnel
    getattr(server, f"{decision}_stream")(stream_id)
    sim.touch(server)
    sim.run_for(1.0)
    assert server.state is TunnelState.AUTHENTICATED
    with pytest.raises(LocalProtocolError):
        server.accept_stream(stream_id + 400)  # a stream that never existed is still misuse
