"""The start of a visitor's connection on a public listener (snocat_proto/_service/visitors.py),
and who serves a name (name_routes.py): pools, takeover, fair shares."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

import pytest

from snocat_proto._service.aggregator import Aggregator, TunnelSession
from snocat_proto._service.config import ServerConfig
from snocat_proto._service.name_routes import NameRoutes, host_label
from snocat_proto._service.tokens import format_tokens, parse_token_file, parse_tokens
from snocat_proto._service.visitors import (
    Failure,
    Forward,
    ListenerKind,
    ProxyHeaderGuard,
    ProxyHeaderRefused,
    Refuse,
    TrustedNetworks,
    VisitorStart,
    refusal,
)
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.names import TunnelDomain
from snocat_proto._wire.proxy_protocol import ProxyAddresses, encode_v1, encode_v2
from snocat_proto._wire.sni import encode_unrecognized_name_alert
from snocat_proto._wire.targets import ProxyTcpTarget

DOMAIN = TunnelDomain.parse("tunnels.example.com")
LIMITS = Limits()
PEER = ProxyAddresses(IPv4Address("192.0.2.10"), 50000, IPv4Address("192.0.2.1"), 80)
VISITOR = ProxyAddresses(IPv4Address("203.0.113.7"), 40000, IPv4Address("198.51.100.1"), 443)
REQUEST = b"GET /x HTTP/1.1\r\nHost: Office-1.Tunnels.Example.com:8080\r\nAccept: */*\r\n\r\n"


def client_hello(server_name: str | None) -> bytes:
    """A real ClientHello from Python's ssl module (memory BIOs, no socket)."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def start(kind: ListenerKind, **options: object) -> VisitorStart:
    return VisitorStart(kind, limits=LIMITS, connection=PEER, domain=DOMAIN, **options)  # type: ignore[arg-type]


def feed_all(machine: VisitorStart, data: bytes, step: int) -> Forward | Refuse | None:
    decision: Forward | Refuse | None = machine.start()
    for offset in range(0, len(data), step):
        if decision is not None:
            break
        decision = machine.receive_data(data[offset : offset + step])
    return decision


@pytest.mark.parametrize("step", [1, 7, 10_000])
def test_a_request_head_names_the_tunnel_whatever_the_split(step: int) -> None:
    decision = feed_all(start(ListenerKind.HTTP), REQUEST + b"body", step)
    assert isinstance(decision, Forward)
    host = "office-1.tunnels.example.com"
    assert (decision.name, decision.host, decision.visitor) == ("office-1", host, PEER)
    assert REQUEST.startswith(decision.data[: len(REQUEST)])  # every byte read, forwarded


@pytest.mark.parametrize("step", [1, 100, 100_000])
def test_a_client_hello_names_the_tunnel_whatever_the_split(step: int) -> None:
    hello = client_hello("office-1.tunnels.example.com")
    decision = feed_all(start(ListenerKind.TLS), hello, step)
    assert isinstance(decision, Forward)
    assert decision.name == "office-1" and decision.data == hello


def test_refusals_name_the_problem() -> None:
    outside = feed_all(start(ListenerKind.HTTP), b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n", 99)
    assert isinstance(outside, Refuse) and outside.failure is Failure.UNKNOWN_NAME
    assert outside.reply.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert outside.reply.endswith(b"\r\n\r\nno tunnel at example.org\n")
    no_sni = feed_all(start(ListenerKind.TLS), client_hello(None), 10_000)
    assert isinstance(no_sni, Refuse) and no_sni.failure is Failure.NO_NAME
    assert no_sni.reply == encode_unrecognized_name_alert() == bytes.fromhex("15030300020270")
    junk = feed_all(start(ListenerKind.TLS), b"SSH-2.0-OpenSSH_9\r\n", 99)
    assert isinstance(junk, Refuse) and junk.failure is Failure.BAD_REQUEST and junk.reply == b""
    bad = feed_all(start(ListenerKind.HTTP), b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 99)
    assert isinstance(bad, Refuse) and bad.reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    h2 = feed_all(start(ListenerKind.HTTP), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 99)
    assert isinstance(h2, Refuse) and h2.reply == b""


def test_the_head_bound_counts_the_whole_head() -> None:
    line = b"GET / HTTP/1.1\r\nHost: office-1.tunnels.example.com\r\n"
    filler = LIMITS.max_http_header_bytes - len(line) - len(b"X: \r\n\r\n")
    exact = line + b"X: " + b"a" * filler + b"\r\n\r\n"
    assert len(exact) == LIMITS.max_http_header_bytes
    assert isinstance(feed_all(start(ListenerKind.HTTP), exact, 4096), Forward)
    over = line + b"X: " + b"a" * (filler + 1) + b"\r\n\r\n"
    refused = feed_all(start(ListenerKind.HTTP), over, 4096)
    assert isinstance(refused, Refuse) and refused.failure is Failure.TOO_LARGE
    assert refused.reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_time_and_the_end_decide_too() -> None:
    silent = start(ListenerKind.HTTP)
    assert silent.start() is None
    timed_out = silent.timed_out()
    assert timed_out.failure is Failure.TIMEOUT and timed_out.reply == b""
    partial = start(ListenerKind.HTTP)
    assert partial.receive_data(b"GET / HT") is None
    assert partial.timed_out().reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    ended = start(ListenerKind.TLS)
    assert ended.receive_data(b"\x16\x03\x01") is None
    end = ended.receive_eof()
    assert isinstance(end, Refuse) and end.failure is Failure.BAD_REQUEST


def test_a_port_is_forwarded_at_once_unless_a_header_is_owed() -> None:
    plain = start(ListenerKind.PORT)
    forward = plain.start()
    assert isinstance(forward, Forward) and forward.visitor == PEER and forward.data == b""
    assert not plain.guarding
    assert start(ListenerKind.PORT, guard=True).guarding


@pytest.mark.parametrize("encode", [encode_v1, encode_v2], ids=["v1", "v2"])
@pytest.mark.parametrize("step", [1, 5, 1000])
def test_a_trusted_load_balancer_says_who_the_visitor_is(encode: object, step: int) -> None:
    header = encode(VISITOR)  # type: ignore[operator]
    port = start(ListenerKind.PORT, trusted=True)
    decision = feed_all(port, header + b"SSH-2.0-x\r\n", step)
    assert isinstance(decision, Forward) and decision.visitor == VISITOR
    assert b"SSH-2.0-x\r\n".startswith(decision.data)  # the header is stripped
    shared = start(ListenerKind.HTTP, trusted=True)
    decision = feed_all(shared, header + REQUEST, step)
    assert isinstance(decision, Forward) and decision.visitor == VISITOR
    assert decision.data == REQUEST[: len(decision.data)] and decision.name == "office-1"


def test_a_trusted_peer_must_send_a_header_and_a_local_one_means_itself() -> None:
    missing = feed_all(start(ListenerKind.PORT, trusted=True), REQUEST, 99)
    assert isinstance(missing, Refuse) and missing.failure is Failure.PROXY_HEADER
    local = feed_all(start(ListenerKind.PORT, trusted=True), encode_v1(None) + b"x", 99)
    assert isinstance(local, Forward) and local.visitor == PEER and local.data == b"x"


@pytest.mark.parametrize("header", [encode_v1(VISITOR), encode_v2(VISITOR)], ids=["v1", "v2"])
def test_a_header_from_anyone_else_is_refused(header: bytes) -> None:
    for kind in (ListenerKind.HTTP, ListenerKind.TLS):
        for step in (1, 3, 100):
            refused = feed_all(start(kind, guard=True), header + REQUEST, step)
            assert isinstance(refused, Refuse) and refused.failure is Failure.PROXY_HEADER, kind
    # On a port the relay's guard does it, without holding other protocols back.
    guard = ProxyHeaderGuard()
    assert guard.feed(header[:3]) == b""
    with pytest.raises(ProxyHeaderRefused):
        guard.feed(header[3:])


def test_the_guard_passes_everything_else_at_once() -> None:
    guard = ProxyHeaderGuard()
    assert guard.feed(b"PO") == b"PO"  # not "PR": decided
    assert guard.feed(b"ST / HTTP/1.1") == b"ST / HTTP/1.1"
    held = ProxyHeaderGuard()
    assert held.feed(b"PROX") == b""
    assert held.feed(b"Y-ish") == b"PROXY-ish"
    ended = ProxyHeaderGuard()
    assert ended.feed(b"\r\n") == b""
    assert ended.end() == b"\r\n"
    # Without the option, a PROXY line is only a malformed request (400).
    plain = feed_all(start(ListenerKind.HTTP), encode_v1(VISITOR) + REQUEST, 99)
    assert isinstance(plain, Refuse) and plain.failure is Failure.BAD_REQUEST


def test_trusted_networks() -> None:
    networks = TrustedNetworks(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])
    assert networks.trusts(IPv4Address("10.1.2.3"))
    assert networks.trusts(IPv4Address("192.0.2.7")) and not networks.trusts(
        IPv4Address("192.0.2.8")
    )
    assert networks.trusts(IPv6Address("::ffff:10.0.0.1"))  # dual stack
    assert not TrustedNetworks() and networks
    with pytest.raises(LocalProtocolError, match="not an IP network"):
        TrustedNetworks(["10.0.0.0/33"])


def test_the_replies_of_3_14_4() -> None:
    offline = refusal(ListenerKind.HTTP, Failure.OFFLINE, name="office-2")
    assert offline.reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert offline.reply.endswith(b"tunnel office-2 is offline\n")
    unknown = refusal(ListenerKind.HTTP, Failure.UNKNOWN_NAME, name="office-2")
    assert unknown.reply.endswith(b"\r\n\r\nno tunnel named office-2\n")
    assert b"Content-Length: 25\r\n" in unknown.reply  # the example of 3.14.4
    none = refusal(ListenerKind.HTTP, Failure.NO_SERVICE, name="office-2")
    assert none.reply.endswith(b"tunnel office-2 publishes no HTTP service\n")
    for failure in (Failure.UNKNOWN_NAME, Failure.OFFLINE, Failure.NO_SERVICE, Failure.REFUSED):
        assert (
            refusal(ListenerKind.TLS, failure, name="x").reply == encode_unrecognized_name_alert()
        )
    assert refusal(ListenerKind.TLS, Failure.BUSY).reply == b""
    assert refusal(ListenerKind.HTTP, Failure.BUSY).reply.startswith(b"HTTP/1.1 503 ")


# Who serves a name --------------------------------------------------------------------


@dataclass(eq=False)
class Tunnel:
    name: str | None
    closed: bool = False

    @property
    def label(self) -> str:
        return self.name or "?"


HTTP_TARGET = ProxyTcpTarget.parse_host_port("127.0.0.1:8000")


def test_one_name_one_tunnel_the_newest_serves() -> None:
    routes: NameRoutes[Tunnel] = NameRoutes()
    old, new = Tunnel("office-1"), Tunnel("office-1")
    assert routes.publish(old, "http", HTTP_TARGET) is None
    assert routes.publish(new, "http", HTTP_TARGET) is None
    assert {routes.choose("office-1", "http")[0] for _ in range(4)} == {new}  # type: ignore[index]
    assert routes.choose("office-1", "tls") is None
    routes.forget(new)
    assert routes.choose("office-1", "http") == (old, HTTP_TARGET)


def test_a_pool_spreads_visitors_least_busy_first_round_robin_between_equals() -> None:
    routes: NameRoutes[Tunnel] = NameRoutes(pools={"office-1"})
    members = [Tunnel("office-1") for _ in range(3)]
    for member in members:
        assert routes.publish(member, "http", HTTP_TARGET) is None
    chosen = [routes.choose("office-1", "http")[0] for _ in range(300)]  # type: ignore[index]
    assert Counter(chosen) == {member: 100 for member in members}
    assert chosen[:3] == members  # round robin
    # The least busy gets the next one.
    routes.opened(members[0])
    routes.opened(members[1])
    assert routes.choose("office-1", "http")[0] is members[2]  # type: ignore[index]
    routes.finished(members[0])
    routes.finished(members[1])
    # A member that leaves stops getting visitors at once; a refused one is skipped.
    routes.forget(members[1])
    left = {routes.choose("office-1", "http")[0] for _ in range(10)}  # type: ignore[index]
    assert left == {members[0], members[2]}
    assert routes.choose("office-1", "http", exclude=[members[0]])[0] is members[2]  # type: ignore[index]
    assert routes.choose("office-1", "http", exclude=[members[0], members[2]]) is None


def test_what_may_not_be_published_by_name() -> None:
    routes: NameRoutes[Tunnel] = NameRoutes()
    refused = routes.publish(Tunnel("under_score"), "http", HTTP_TARGET)
    assert refused is not None and "not a DNS label" in refused.reason and not refused.retry
    twice = Tunnel("a")
    assert routes.publish(twice, "http", HTTP_TARGET) is None
    again = routes.publish(twice, "http", HTTP_TARGET)
    assert again is not None and "already" in again.reason
    assert routes.publish(twice, "tls", HTTP_TARGET) is None and routes.services_of(twice) == (
        "http",
        "tls",
    )
    clash = routes.publish(Tunnel("A"), "http", HTTP_TARGET)
    assert clash is not None and "served by the tunnel 'a'" in clash.reason
    assert host_label("Office-1") == "office-1" and host_label("x" * 64) is None
    assert routes.withdraw(twice, "http") and routes.services_of(twice) == ("tls",)


def test_a_pool_name_is_not_taken_over() -> None:
    config = ServerConfig(certificate_pem=b"", private_key_pem=b"", pools=frozenset({"pool-1"}))
    books: Aggregator[TunnelSession] = Aggregator(config, _session, random_bytes=_ids())
    first, second, third = (_authenticated(books, "pool-1") for _ in range(3))
    assert books.take_over(second) == [] and books.take_over(third) == []
    alone = [_authenticated(books, "solo") for _ in range(2)]
    assert [other for other, _ in books.take_over(alone[1])] == [alone[0]]
    assert books.has_tunnel("pool-1") and not books.has_tunnel("nobody")
    del first


def _ids() -> Callable[[int], bytes]:
    counter = itertools.count()
    return lambda size: next(counter).to_bytes(size, "big")


def _session(tunnel: object, tunnel_id: str, peer: str, connected_at: float) -> TunnelSession:
    return TunnelSession(tunnel, tunnel_id, peer, connected_at)  # type: ignore[arg-type]


def _authenticated(books: Aggregator[TunnelSession], name: str) -> TunnelSession:
    class FakeTunnel:
        peer_address = ("192.0.2.1", 1)

    session = books.session(FakeTunnel(), 0.0)  # type: ignore[arg-type]
    assert books.on_authenticated(session, name=name, scheme="token", wall_time=0.0) is None
    return session


# Pools in the tokens file -----------------------------------------------------------------

SECRET = "0123456789abcdef-secret"


def test_a_pool_is_a_flag_on_its_tokens_line() -> None:
    parsed = parse_token_file(f"office-1 {SECRET} pool\nsolo {SECRET}\n")
    assert parsed.tokens == {"office-1": SECRET.encode(), "solo": SECRET.encode()}
    assert parsed.pools == frozenset({"office-1"})
    assert parse_tokens(f"office-1 {SECRET} pool\n") == {"office-1": SECRET.encode()}
    text = format_tokens(parsed.tokens, parsed.pools)
    assert text == f"office-1 {SECRET} pool\nsolo {SECRET}\n"
    with pytest.raises(LocalProtocolError, match="'NAME SECRET pool'"):
        parse_token_file(f"office-1 {SECRET} pooled\n")
