"""Harnesses for the byte-level parsers and state machines of snocat_proto.

Every harness is ``fn(data: bytes) -> None``.  The input is the peer's bytes as they
arrive on the wire, so the committed seeds are plain wire traces; the choices a
harness makes besides (how to split the bytes into reads, what the application
decides) come from a PRNG seeded with the input, so a run replays exactly.

The invariant of each harness:

* the peer's bytes give a valid result or a :class:`ProtocolError` subclass, and never
  anything else (the authenticators promise more: no exception at all);
* the result does not depend on how the bytes were split into reads (whole,
  byte at a time, random cuts), which is what a stream transport delivers;
* the harness's round-trip or oracle checks (listed with each harness).

An ``AssertionError`` or any other exception is a crash.
"""

from __future__ import annotations

import hmac
import json
import random
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise
from typing import Any

from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import (
    HELLO_SIZE,
    SIMPLE_ACK_ANSWER,
    Authenticated,
    Authenticator,
    AuthEvent,
    Rejected,
    SecretRequired,
    SimpleAckConnector,
    SimpleAckListener,
    TokenConnector,
    TokenListener,
    token_mac,
)
from snocat_proto._wire.errors import (
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    UnsupportedVersion,
)
from snocat_proto._wire.features import FEATURES, parse_features
from snocat_proto._wire.fleet_udp import (
    MAX_RELAYED_DATAGRAM,
    UDP_RELAY,
    RelayedDatagrams,
    UdpRelayRequest,
    encode_relayed_datagram,
)
from snocat_proto._wire.framing import FrameDecoder, encode_frame
from snocat_proto._wire.http_host import RequestHead, RequestHeadError, RequestHeadParser
from snocat_proto._wire.limits import MIN_PROXY_HEADER_BYTES, Limits
from snocat_proto._wire.names import TunnelDomain, check_host_name, is_label
from snocat_proto._wire.negotiation import (
    HEADER,
    Accepted,
    AcceptorNegotiation,
    AddressReceived,
    OpenerNegotiation,
    Refused,
)
from snocat_proto._wire.peek import NeedMore, PeekParser
from snocat_proto._wire.proxy_protocol import (
    V1_MAX_LENGTH,
    V1_PREFIX,
    V2_SIGNATURE,
    ProxyCommand,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    encode_v1,
    encode_v2,
)
from snocat_proto._wire.proxyme import (
    Denied,
    Granted,
    ProxymeClient,
    ProxymeEvent,
    ProxymeRequest,
    ProxymeServer,
    Released,
    ReleaseRequested,
    SubjectReceived,
)
from snocat_proto._wire.sni import (
    ClientHelloError,
    ClientHelloParser,
    NotClientHello,
    NotTLS,
    ServerNameFound,
)
from snocat_proto._wire.targets import ProxyTcpTarget, parse_port
from snocat_proto._wire.udp_flows import (
    MAX_FLOW_ID,
    PROXY_UDP,
    DropReason,
    FlowRequest,
    FlowState,
    FlowTable,
    UdpTarget,
    decode_flow_datagram,
    encode_flow_datagram,
    encode_varint,
)

__all__ = ["HARNESSES", "Harness", "chunkings", "rng_for"]

Harness = Callable[[bytes], None]

#: Feeding byte at a time is quadratic in places; past this size, cut into 64 pieces.
_BYTEWISE_LIMIT = 2048
LIMITS = Limits()
#: Small limits, so that the fuzzer reaches every "too large" branch with short inputs.
SMALL_LIMITS = Limits(
    max_address_size=24,
    max_frame_size=40,
    max_auth_message_size=160,  # room for the default features list (148 bytes)
    max_proxyme_subject_size=12,
)


def rng_for(data: bytes) -> random.Random:
    """The harness's choices for ``data``: a PRNG seeded with the input itself."""
    return random.Random(zlib.crc32(data))


def chunkings(data: bytes, rng: random.Random) -> Iterator[list[bytes]]:
    """The same bytes, split into reads three ways: whole, byte-wise, random cuts."""
    yield [data]
    if len(data) <= 1:
        return
    if len(data) <= _BYTEWISE_LIMIT:
        yield [data[i : i + 1] for i in range(len(data))]
    else:
        step = -(-len(data) // 64)
        yield [data[i : i + step] for i in range(0, len(data), step)]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8))))
    bounds = [0, *cuts, len(data)]
    yield [data[a:b] for a, b in pairwise(bounds)]


#: In a read plan, the application makes its pending decisions here.
DECIDE = None
Plan = list[bytes | None]


def plans(data: bytes, rng: random.Random) -> Iterator[Plan]:
    """Reads with decision points between them, split every way :func:`chunkings` does.

    An application decides when it is ready, not when a read ends, so the decision
    points are fixed positions in the byte stream (chosen by ``rng``), the same in every
    split; a decision the bytes so far call for waits for the next point."""
    points = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(1, 3))))
    bounds = [0, *points, len(data)]
    segments = [data[a:b] for a, b in pairwise(bounds)]
    split = [list(chunkings(segment, random.Random(rng.random()))) for segment in segments]
    for style in range(3):
        plan: Plan = []
        for ways in split:
            plan.extend(chunk for chunk in ways[min(style, len(ways) - 1)] if chunk)
            plan.append(DECIDE)
        yield plan


def _same_for_every_split(outcomes: Sequence[object], what: str) -> None:
    first = outcomes[0]
    for other in outcomes[1:]:
        assert other == first, (
            f"{what}: the outcome depends on how reads are split:\n{first!r}\n{other!r}"
        )


def _pick_limits(rng: random.Random) -> Limits:
    return SMALL_LIMITS if rng.random() < 0.3 else LIMITS


# --- framing ------------------------------------------------------------------------


def _decode_frames(chunks: list[bytes], max_size: int) -> tuple[tuple[bytes, ...], object]:
    decoder = FrameDecoder(max_size)
    frames: list[bytes] = []
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
    except FrameTooLarge:
        return tuple(frames), FrameTooLarge
    return tuple(frames), decoder.take_remainder()


def fuzz_framing(data: bytes) -> None:
    """Length-prefixed frames.  Oracle: frames re-encoded plus the remainder are the
    input; no frame is over the limit; a refusal names a head frame over the limit."""
    if not data:
        return
    max_size, wire = data[0] * 7, data[1:]
    rng = rng_for(data)
    outcomes = [_decode_frames(chunks, max_size) for chunks in chunkings(wire, rng)]
    _same_for_every_split(outcomes, "framing")
    frames, rest = outcomes[0]
    assert all(len(frame) <= max_size for frame in frames)
    encoded = b"".join(encode_frame(frame) for frame in frames)
    assert wire.startswith(encoded)
    if rest is FrameTooLarge:
        head = wire[len(encoded) : len(encoded) + 4]
        assert len(head) == 4 and int.from_bytes(head, "big") > max_size
    else:
        assert encoded + rest == wire  # type: ignore[operator]


# --- route addresses ------------------------------------------------------------------

_VALID_ADDRESS = re.compile(r"(?:/(?:[^/\\]|\\[/\\])*)*", re.DOTALL)
_SEGMENT = re.compile(r"/((?:[^/\\]|\\[/\\])*)", re.DOTALL)


def _reference_parse(text: str) -> tuple[str, ...] | None:
    """An independent reading of the address rules (protocol.md 2.5), as an oracle."""
    if not _VALID_ADDRESS.fullmatch(text):
        return None
    return tuple(re.sub(r"\\([/\\])", r"\1", match.group(1)) for match in _SEGMENT.finditer(text))


def fuzz_address(data: bytes) -> None:
    """Route addresses from wire bytes.  Oracles: an independent regex parser agrees
    on validity and segments; rendering is the exact inverse of parsing."""
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    try:
        address = RouteAddress.decode(data)
    except RemoteProtocolError:
        assert text is None or _reference_parse(text) is None, f"valid address refused: {data!r}"
        return
    assert text is not None
    assert _reference_parse(text) == address.segments, (data, address.segments)
    assert address.encode() == data
    assert str(address) == text
    assert RouteAddress(address.segments) == address
    assert RouteAddress.decode(address.encode()) == address


# --- proxy-tcp targets and proxyme requests -------------------------------------------


def fuzz_targets(data: bytes) -> None:
    """``proxy-tcp`` and ``proxyme`` addresses, and ``--target`` text.  Oracle: what
    parses renders back to an address (text) that parses to the same value."""
    try:
        address = RouteAddress.decode(data)
    except RemoteProtocolError:
        # Still reach the segment checks: cut the text at slashes ourselves.
        text = data.decode("utf-8", errors="replace")
        address = RouteAddress(tuple(text.split("/")[1:]))
    try:
        target = ProxyTcpTarget.from_address(address)
    except RemoteProtocolError:
        target = None
    if target is not None:
        assert ProxyTcpTarget.from_address(target.to_address()) == target
        assert target.connect_host()
        str(target)
    try:
        request = ProxymeRequest.from_address(address)
    except RemoteProtocolError:
        request = None
    if request is not None:
        assert ProxymeRequest.from_address(request.to_address()) == request
        assert ProxyTcpTarget.from_address(request.target().to_address()) == request.target()
    text = data.decode("utf-8", errors="replace")
    port = parse_port(text)
    assert port is None or 1 <= port <= 65535
    try:
        parsed = ProxyTcpTarget.parse_host_port(text)
    except LocalProtocolError:
        return
    assert ProxyTcpTarget.parse_host_port(str(parsed)) == parsed, (text, parsed)


# --- NYAN negotiation ----------------------------------------------------------------


def _acceptor_outcome(chunks: list[bytes], limits: Limits, accept: bool) -> tuple[object, ...]:
    negotiation = AcceptorNegotiation(limits=limits)
    assert negotiation.initial_data() == HEADER
    result: AddressReceived | None = None
    after = bytearray()
    try:
        for chunk in chunks:
            if result is not None:
                after += chunk  # service bytes: no longer the negotiation's business
                continue
            result = negotiation.receive_data(chunk)
            assert result is None or negotiation.complete
        if result is None:
            negotiation.receive_eof()
            raise AssertionError("the end of the stream before the address was accepted")
    except ProtocolError as error:
        assert not isinstance(error, LocalProtocolError), error
        assert not negotiation.complete
        negotiation.receive_eof()  # after a failure the end adds nothing
        return ("failed", type(error))
    status = negotiation.accept() if accept else negotiation.refuse()
    assert status == (b"\x00" if accept else b"\x01") and negotiation.decided
    for late in (negotiation.accept, negotiation.refuse):
        try:
            late()
        except LocalProtocolError:
            pass
        else:
            raise AssertionError("a second decision was taken")
    return ("address", result.address, result.remainder + bytes(after))


def fuzz_nyan_acceptor(data: bytes) -> None:
    """The acceptor's side of NYAN.  Oracle: an address is reported exactly when the
    input is the header, a frame within the limit holding a valid address, then any
    service bytes; an unsupported version is a version byte above 0 after the magic."""
    rng = rng_for(data)
    limits = _pick_limits(rng)
    accept = rng.random() < 0.5
    outcomes = [_acceptor_outcome(chunks, limits, accept) for chunks in chunkings(data, rng)]
    _same_for_every_split(outcomes, "NYAN acceptor")
    outcome = outcomes[0]
    if outcome[0] == "address":
        _, address, service = outcome
        assert isinstance(address, RouteAddress)
        expected = HEADER + encode_frame(address.encode())
        assert data == expected + service  # type: ignore[operator]
        assert len(address.encode()) <= limits.max_address_size
    elif outcome[1] is UnsupportedVersion:
        assert data[:4] == b"NYAN" and data[4] > 0


_OPENER_ADDRESSES = (
    RouteAddress.of("proxyme", "0.0.1", "127.0.0.1", "5000"),
    RouteAddress.of("proxy-tcp", "dns", "127.0.0.1", "tcp", "5000"),
    RouteAddress(()),
)


def _opener_outcome(chunks: list[bytes], address: RouteAddress) -> tuple[object, ...]:
    negotiation = OpenerNegotiation(address, limits=LIMITS)
    assert negotiation.initial_data() == HEADER + encode_frame(address.encode())
    result: Accepted | Refused | None = None
    after = bytearray()
    try:
        for chunk in chunks:
            if result is not None:
                after += chunk
                continue
            result = negotiation.receive_data(chunk)
        if result is None:
            negotiation.receive_eof()
            raise AssertionError("the end of the stream before the status was accepted")
    except ProtocolError as error:
        assert not isinstance(error, LocalProtocolError), error
        assert not negotiation.complete
        negotiation.receive_eof()
        return ("failed", type(error))
    assert negotiation.complete
    negotiation.receive_eof()  # the end after the result is fine
    if isinstance(result, Refused):
        return ("refused", result.status)
    return ("accepted", result.remainder + bytes(after))


def fuzz_nyan_opener(data: bytes) -> None:
    """The opener's side of NYAN.  Oracle: accepted exactly on ``NYAN 00 00``, refused
    with the status byte on ``NYAN 00 xx`` (xx non-zero), unsupported version on a
    version byte above 0."""
    rng = rng_for(data)
    address = rng.choice(_OPENER_ADDRESSES)
    outcomes = [_opener_outcome(chunks, address) for chunks in chunkings(data, rng)]
    _same_for_every_split(outcomes, "NYAN opener")
    outcome = outcomes[0]
    if outcome[0] == "accepted":
        assert data[:6] == HEADER + b"\x00" and outcome[1] == data[6:]
    elif outcome[0] == "refused":
        assert data[:5] == HEADER and data[5] == outcome[1] != 0
    elif outcome[1] is UnsupportedVersion:
        assert data[:4] == b"NYAN" and data[4] > 0
    else:
        assert not data.startswith(HEADER) or len(data) == len(HEADER)


# --- authentication ------------------------------------------------------------------

SECRET = b"correct-horse-battery-staple"
NAME = "alice"
NONCE = bytes(range(32))
#: In token-listener inputs, 64 of these stand for the correct MAC of the claimed
#: name (the fuzzer cannot compute an HMAC; the harness fills it in).
MAC_PLACEHOLDER = b"@" * 64
_NAME_IN_RESPONSE = re.compile(rb'"name"\s*:\s*"([^"\\]{1,128})"')


def _summary(event: AuthEvent) -> tuple[str, str]:
    if isinstance(event, Authenticated | SecretRequired):
        return type(event).__name__, event.name
    assert isinstance(event, Rejected)
    assert event.reason and event.reason.isprintable(), event.reason
    return "Rejected", event.reason


def _drive(
    authenticator: Authenticator,
    plan: Plan,
    eof: bool,
    decide: Callable[[Authenticator, str], None] | None = None,
) -> tuple[tuple[tuple[str, str], ...], bytes]:
    """Feed the peer's bytes; the events and every byte the authenticator wrote.

    A :class:`SecretRequired` is answered (by ``decide``) at the next decision
    point of the plan."""
    events: list[tuple[str, str]] = []
    output = bytearray(authenticator.data_to_send())
    pending: list[str] = []

    def drain() -> None:
        while (event := authenticator.next_event()) is not None:
            assert _terminal(tuple(events)) is None, "an event after the terminal one"
            events.append(_summary(event))
            if isinstance(event, SecretRequired):
                pending.append(event.name)
        output.extend(authenticator.data_to_send())

    for read in plan:
        if read is DECIDE:
            while pending:
                assert decide is not None
                decide(authenticator, pending.pop(0))
        else:
            authenticator.receive_data(read)
        drain()
    if eof:
        authenticator.receive_eof()
        drain()
    finished = authenticator.is_finished
    assert finished == (_terminal(tuple(events)) is not None)
    if finished:  # after the end, input is ignored
        authenticator.receive_data(b"more bytes")
        authenticator.receive_eof()
        assert authenticator.next_event() is None and authenticator.data_to_send() == b""
    return tuple(events), bytes(output)


def _terminal(events: tuple[tuple[str, str], ...]) -> str | None:
    kinds = [kind for kind, _ in events if kind in ("Authenticated", "Rejected")]
    return kinds[0] if kinds else None


def fuzz_simple_ack_listener(data: bytes) -> None:
    """Listen side of SimpleAck.  Oracle: authenticated exactly when the first 64 bytes
    start with ``HELO/HELO`` NUL; only the hello is ever written."""
    rng = rng_for(data)
    eof = rng.random() < 0.5
    outcomes = [_drive(SimpleAckListener("10.0.0.2:5000"), plan, eof) for plan in plans(data, rng)]
    _same_for_every_split(outcomes, "SimpleAck listener")
    events, output = outcomes[0]
    assert output == b"HELO".ljust(HELLO_SIZE, b"\0")
    good = len(data) >= HELLO_SIZE and data.startswith(b"HELO/HELO\0")
    assert (_terminal(events) == "Authenticated") == good
    if good:
        assert events == (("Authenticated", "10.0.0.2:5000"),)


def fuzz_simple_ack_connector(data: bytes) -> None:
    """Connect side of SimpleAck.  Oracle: answers ``HELO/HELO`` (and authenticates)
    exactly when the hello's text is ``HELO``, and writes nothing otherwise."""
    rng = rng_for(data)
    eof = rng.random() < 0.5
    outcomes = [_drive(SimpleAckConnector(), plan, eof) for plan in plans(data, rng)]
    _same_for_every_split(outcomes, "SimpleAck connector")
    events, output = outcomes[0]
    hello = data[:HELLO_SIZE]
    text = hello.split(b"\0", 1)[0] if b"\0" in hello else hello[:32]
    good = len(hello) == HELLO_SIZE and text == b"HELO"
    assert (_terminal(events) == "Authenticated") == good
    assert output == (SIMPLE_ACK_ANSWER if good else b"")


def _fill_in_mac(data: bytes) -> bytes:
    match = _NAME_IN_RESPONSE.search(data)
    name = match.group(1).decode("utf-8", errors="replace") if match else NAME
    try:
        mac = token_mac(SECRET, NONCE, name).hex().encode()
    except UnicodeEncodeError:
        return data
    return data.replace(MAC_PLACEHOLDER, mac)


def _parse_frames(data: bytes) -> list[bytes]:
    frames = []
    while len(data) >= 4:
        size = int.from_bytes(data[:4], "big")
        frames.append(data[4 : 4 + size])
        data = data[4 + size :]
    return frames


def fuzz_token_listener(data: bytes) -> None:
    """Listen side of the token scheme.  Oracles: authenticated only if the response
    names a name whose secret the application supplied and carries that name's
    correct MAC for our nonce; after the hello exactly one result frame is written,
    ``{"ok":true}`` exactly when authenticated; nothing ever raises."""
    rng = rng_for(data)
    data = _fill_in_mac(data)
    limits = _pick_limits(rng)
    eof = rng.random() < 0.5
    choice = rng.random()

    def decide(authenticator: Authenticator, name: str) -> None:
        assert isinstance(authenticator, TokenListener)
        if choice < 0.7:
            authenticator.supply_credential(SECRET if name == NAME else None)
        elif choice < 0.85:
            authenticator.supply_credential(SECRET)  # every name has this secret
        else:
            authenticator.reject("the aggregator is full")

    outcomes = [
        _drive(TokenListener(NONCE, limits=limits), plan, eof, decide) for plan in plans(data, rng)
    ]
    _same_for_every_split(outcomes, "token listener")
    events, output = outcomes[0]
    assert output[:64] == b"snocat-token-v1".ljust(32, b"\0") + NONCE
    results = _parse_frames(output[64:])
    terminal = _terminal(events)
    if terminal == "Authenticated":
        name = events[-1][1]
        response = json.loads(_parse_frames(data)[0])
        assert response["name"] == name
        expected = token_mac(SECRET, NONCE, name)
        assert hmac.compare_digest(bytes.fromhex(response["mac"]), expected)
        assert choice >= 0.7 or name == NAME
        # The agreed additions: those the response offered that this side speaks.
        agreed = sorted(parse_features(response.get("features")) & FEATURES)
        assert [json.loads(r) for r in results] == [
            {"ok": True, "features": agreed} if agreed else {"ok": True}
        ]
    elif results:
        assert len(results) == 1 and len(results[0]) <= limits.max_auth_message_size
        assert json.loads(results[0])["ok"] is False


def _token_hello(data: bytes) -> bytes | None:
    hello = data[:HELLO_SIZE]
    if len(hello) == HELLO_SIZE and hello[:32] == b"snocat-token-v1".ljust(32, b"\0"):
        return hello[32:]
    return None


def fuzz_token_connector(data: bytes) -> None:
    """Connect side of the token scheme.  Oracles: answers exactly a token hello, with
    one frame holding the correct MAC for that hello's nonce; authenticated only on a
    ``"ok": true`` result after it; the secret never appears in the output."""
    rng = rng_for(data)
    limits = _pick_limits(rng)
    eof = rng.random() < 0.5
    outcomes = [
        _drive(TokenConnector(NAME, SECRET, limits=limits), plan, eof) for plan in plans(data, rng)
    ]
    _same_for_every_split(outcomes, "token connector")
    events, output = outcomes[0]
    assert SECRET not in output
    nonce = _token_hello(data)
    if nonce is None:
        assert output == b"" and _terminal(events) != "Authenticated"
        return
    (frame,) = _parse_frames(output)
    response = json.loads(frame)
    assert response == {
        "name": NAME,
        "mac": token_mac(SECRET, nonce, NAME).hex(),
        "features": sorted(FEATURES),
    }
    if _terminal(events) == "Authenticated":
        (result,) = _parse_frames(data[HELLO_SIZE:])[:1]
        assert json.loads(result)["ok"] is True


# --- proxyme -------------------------------------------------------------------------


def _events(events: list[ProxymeEvent]) -> list[object]:
    return [
        (type(e).__name__, getattr(e, "addresses", None), getattr(e, "subject", None))
        for e in events
    ]


def _proxyme_server_outcome(
    plan: Plan, limits: Limits, grant: bool, withdraw: bool, eof: bool, options: bool
) -> tuple[object, ...]:
    machine = ProxymeServer(limits=limits, options=options)
    output = bytearray()
    seen: list[ProxymeEvent] = []
    pending: list[ProxymeEvent] = []

    def decide() -> None:
        while pending:
            event = pending.pop(0)
            if isinstance(event, SubjectReceived):
                assert isinstance(event.subject, str)
                event.subject.encode("utf-8")
                assert event.port is None or (options and 1 <= event.port <= 65535)
                if grant:
                    output.extend(machine.grant(["[::]:8080"]))
                else:
                    output.extend(machine.deny("no port for you", retry=False))
                if grant and withdraw:
                    output.extend(machine.release_ack())
            elif isinstance(event, ReleaseRequested) and machine.granted:
                output.extend(machine.release_ack())

    try:
        for read in plan:
            if read is DECIDE:
                decide()
                continue
            events = machine.receive_data(read)
            seen.extend(events)
            pending.extend(events)
        if eof:
            events = machine.receive_eof()
            seen.extend(events)
            pending.extend(events)
            decide()
    except RemoteProtocolError as error:
        # Events of the same read that failed are lost with it: only the failure counts.
        return ("failed", type(error))
    return ("ok", _events(seen), bytes(output), machine.granted)


def fuzz_proxyme_server(data: bytes) -> None:
    """The aggregator's side of ``proxyme``, with and without ``proxyme-options``.
    Oracle: a subject is reported only for a JSON string frame (or, with options, an
    object) within the limit; a port only with options; a reason never without them;
    the release is acknowledged at most once."""
    rng = rng_for(data)
    limits = _pick_limits(rng)
    grant, withdraw, eof = (rng.random() < 0.7), (rng.random() < 0.2), (rng.random() < 0.5)
    options = rng.random() < 0.5
    outcomes = [
        _proxyme_server_outcome(plan, limits, grant, withdraw, eof, options)
        for plan in plans(data, rng)
    ]
    _same_for_every_split(outcomes, "proxyme server")
    outcome = outcomes[0]
    if outcome[0] == "failed":
        return
    _, events, output, _ = outcome
    assert isinstance(events, list) and isinstance(output, bytes)
    if events and events[0][0] == "SubjectReceived":
        (subject,) = _parse_frames(data)[:1]
        assert len(subject) <= limits.max_proxyme_subject_size
        value = json.loads(subject)
        assert isinstance(value, str) or (options and isinstance(value, dict))
    if not options:
        assert b"denied" not in output
    assert output.count(bytes(8)) <= 1 + output.count(b"null") + output.count(b"denied")


def _proxyme_client_outcome(
    plan: Plan, limits: Limits, release: bool, eof: bool, options: bool
) -> tuple[object, ...]:
    asks = options and limits.max_proxyme_subject_size >= len(b'{"port":8085}')
    machine = ProxymeClient(limits=limits, options=options, public_port=8085 if asks else None)
    output = bytearray(machine.initial_data())
    seen: list[ProxymeEvent] = []
    asked = False

    try:
        for read in plan:
            if read is DECIDE:
                if release and machine.granted and not asked:
                    asked = True
                    output.extend(machine.release())
                continue
            seen.extend(machine.receive_data(read))
        if eof:
            seen.extend(machine.receive_eof())
    except RemoteProtocolError as error:
        # Events of the same read that failed are lost with it: only the failure counts.
        return ("failed", type(error))
    for event in seen:
        if isinstance(event, Granted):
            assert all(isinstance(a, str) for a in event.addresses)
        elif isinstance(event, Denied):
            assert options or (event.reason, event.retry) == ("", True)
            assert len(event.reason) <= limits.max_reason_length
            assert event.reason.isprintable() or not event.reason
        else:
            assert isinstance(event, Released)
    return ("ok", _events(seen), bytes(output), machine.granted)


def fuzz_proxyme_client(data: bytes) -> None:
    """The client's side of ``proxyme``, with and without ``proxyme-options``.  Oracle:
    granted only on a JSON list of strings within the frame limit; a denial's reason
    only with options, printable and bounded; released at most once."""
    rng = rng_for(data)
    limits = _pick_limits(rng)
    release, eof, options = (rng.random() < 0.5), (rng.random() < 0.5), (rng.random() < 0.5)
    outcomes = [
        _proxyme_client_outcome(plan, limits, release, eof, options) for plan in plans(data, rng)
    ]
    _same_for_every_split(outcomes, "proxyme client")
    outcome = outcomes[0]
    if outcome[0] == "failed":
        return
    events = outcome[1]
    assert isinstance(events, list)
    kinds = [kind for kind, _, _ in events]
    assert kinds.count("Released") <= 1 and kinds.count("Granted") <= 1
    if "Granted" in kinds:
        (response,) = _parse_frames(data)[:1]
        assert len(response) <= limits.max_frame_size
        value: Any = json.loads(response)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)


# --- shared listeners: the connection-start parsers -----------------------------------

#: Small bounds, so the fuzzer reaches every "too large" branch with short inputs.
PEEK_SMALL_LIMITS = Limits(
    max_sniff_bytes=300, max_http_header_bytes=200, max_proxy_header_bytes=MIN_PROXY_HEADER_BYTES
)
_PeekFactory = Callable[[Limits], PeekParser[Any]]


def _peek_outcome(
    make: _PeekFactory, limits: Limits, chunks: list[bytes], base: type[RemoteProtocolError]
) -> object:
    """The parser's answer (a result, or its error class) for the bytes in this split,
    checking the peek contract after every read."""
    parser = make(limits)
    try:
        for chunk in chunks:
            answer = parser.feed(chunk)
            assert parser.buffered <= parser.limit, "buffered past the limit"
            if not isinstance(answer, NeedMore):
                assert parser.done and parser.result == answer and parser.buffered == 0
                parser.receive_eof()  # after the answer the end adds nothing
                return answer
        parser.receive_eof()
    except ProtocolError as error:
        assert isinstance(error, base), f"{type(error).__name__} is not a {base.__name__}"
        assert parser.failed and parser.buffered == 0
        parser.receive_eof()
        return type(error)
    raise AssertionError("the end of the stream before an answer must be an error")


def _peek(
    data: bytes, make: _PeekFactory, base: type[RemoteProtocolError], what: str
) -> tuple[object, Limits]:
    """The one answer of every split of ``data``, and the limits it was found with;
    a result must also be the answer of exactly its own bytes."""
    rng = rng_for(data)
    limits = PEEK_SMALL_LIMITS if rng.random() < 0.3 else LIMITS
    outcomes = [_peek_outcome(make, limits, chunks, base) for chunks in chunkings(data, rng)]
    _same_for_every_split(outcomes, what)
    answer = outcomes[0]
    size = getattr(answer, "size", None)
    if size is not None:
        assert 0 < size <= len(data)
        assert _peek_outcome(make, limits, [data[:size]], base) == answer, "needs bytes after it"
        assert _peek_outcome(make, limits, [data[: size - 1]], base) != answer
    return answer, limits


def _client_hello_wire(data: bytes) -> bytes:
    """Mode byte, then the wire (bit 0 clear) or a ClientHello's extensions block
    that the harness frames correctly, in records of ``mode >> 1`` bytes (bit 0 set)."""
    if not data or not data[0] & 1:
        return data[1:]
    fragment = max(1, data[0] >> 1)
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(data[1:]).to_bytes(2, "big") + data[1:]
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"".join(
        b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (message[i : i + fragment] for i in range(0, len(message), fragment))
    )


def fuzz_sni(data: bytes) -> None:
    """TLS ClientHello peek (``sni.ClientHelloParser``).  Oracles: a name only from a
    handshake record, and it is a lower-case DNS host name; the framed mode (correct
    record and handshake lengths around arbitrary extensions) is never refused as
    not TLS or not a ClientHello; every split gives one answer; nothing past the limit
    is buffered."""
    wire = _client_hello_wire(data)
    answer, limits = _peek(
        wire, lambda limits: ClientHelloParser(limits=limits), ClientHelloError, "sni"
    )
    if isinstance(answer, ServerNameFound):
        assert wire[0] == 22 and answer.size <= limits.max_sniff_bytes
        name = answer.server_name
        assert name is None or (check_host_name(name) is None and name == name.lower())
        assert name is None or not name.endswith(".")
    elif data and data[0] & 1:
        assert answer not in (NotTLS, NotClientHello), answer


_HOST_LINE = re.compile(rb"^host:[ \t]*(.*?)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


def fuzz_http_host(data: bytes) -> None:
    """HTTP/1.x request head peek (``http_host.RequestHeadParser``).  Oracles: the
    head ends with an empty line and fits the limit; an independent reading of its
    ``Host`` lines agrees (at most one, the same host); the host to route by is
    lower-case ASCII without a port."""
    answer, limits = _peek(
        data, lambda limits: RequestHeadParser(limits=limits), RequestHeadError, "http_host"
    )
    if not isinstance(answer, RequestHead):
        return
    head = data[: answer.size]
    assert answer.size <= limits.max_http_header_bytes
    assert head.endswith((b"\n\n", b"\n\r\n"))
    hosts = _HOST_LINE.findall(head)
    assert len(hosts) <= 1
    route = answer.route_host
    assert route and route.isascii() and route == route.lower() and not route.endswith(".")
    if hosts and hosts[0] and not hosts[0].startswith(b"["):
        expected = hosts[0].decode("ascii").lower().partition(":")[0].removesuffix(".")
        assert answer.host == expected, (answer.host, hosts[0])
    elif not hosts:
        assert answer.host is None and answer.target_host is not None


def fuzz_proxy_protocol(data: bytes) -> None:
    """PROXY protocol peek (``proxy_protocol.ProxyHeaderParser``).  Oracles: v1 is
    ``PROXY `` ... CRLF within 107 bytes, v2 the signature and 16 + its length field;
    addresses read are written back by the encoder of the same version to a header
    that reads the same; every split gives one answer."""
    answer, limits = _peek(
        data, lambda limits: ProxyHeaderParser(limits=limits), ProxyHeaderError, "proxy_protocol"
    )
    if not isinstance(answer, ProxyHeader):
        return
    header = data[: answer.size]
    if answer.version == 1:
        assert header.startswith(V1_PREFIX) and header.endswith(b"\r\n")
        assert answer.size <= V1_MAX_LENGTH and header.count(b"\n") == 1
        encoded = encode_v1(answer.addresses)
    else:
        assert header.startswith(V2_SIGNATURE)
        assert answer.size == 16 + int.from_bytes(header[14:16], "big")
        assert answer.size <= limits.max_proxy_header_bytes
        encoded = encode_v2(answer.addresses, command=answer.command)
    again = ProxyHeaderParser(limits=LIMITS).feed(encoded)
    assert again == ProxyHeader(answer.version, answer.command, answer.addresses, len(encoded))
    if answer.addresses is None:
        return
    assert answer.command is ProxyCommand.PROXY


_REFERENCE_HOST = re.compile(
    r"(?=[^.]{1,63}(?:\.|$))(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)*"
    r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.?",
    re.IGNORECASE | re.ASCII,
)


def _reference_is_host_name(text: str) -> bool:
    """An independent reading of names.check_host_name, as an oracle."""
    name = text.removesuffix(".")
    if not _REFERENCE_HOST.fullmatch(text) or not 1 <= len(name) <= 253:
        return False
    labels = name.split(".")
    return all(1 <= len(label) <= 63 for label in labels) and not labels[-1].isdigit()


def fuzz_names(data: bytes) -> None:
    """The ``NAME.DOMAIN`` rule (``names.TunnelDomain``).  Input: domain NUL host.
    Oracles: an independent host name check agrees with ``check_host_name``; a name is
    exactly the one label before the domain; ``host_for`` and ``name_for`` are inverse."""
    domain_bytes, _, host_bytes = data.partition(b"\x00")
    domain_text = domain_bytes.decode("utf-8", errors="replace")
    host = host_bytes.decode("utf-8", errors="replace")
    for text in (domain_text, host):
        assert (check_host_name(text) is None) == _reference_is_host_name(text), text
    try:
        domain = TunnelDomain.parse(domain_text)
    except LocalProtocolError:
        assert check_host_name(domain_text) is not None or len(domain_text) > 250
        domain = TunnelDomain.parse("tunnels.example.com")
    name = domain.name_for(host)
    if name is None:
        label = host.lower().removesuffix(".").partition(".")[0]
        if is_label(label) and _reference_is_host_name(host):
            assert host.lower().removesuffix(".") != f"{label}.{domain.domain}"
        return
    assert is_label(name)
    assert host.lower().removesuffix(".") == f"{name}.{domain.domain}"
    assert domain.name_for(domain.host_for(name)) == name


# --- UDP flows (udp-datagrams) --------------------------------------------------------


def fuzz_udp_codecs(data: bytes) -> None:
    """Flow datagrams, flow-setup addresses and ``--udp-target`` text.  Oracles: a
    datagram's flow ID is the input's leading varint (any of its four lengths) and the
    payload the rest; an address or target that parses renders back to one that
    parses to the same value."""
    try:
        flow_id, rest = decode_flow_datagram(data)
    except RemoteProtocolError:
        assert not data or len(data) < 1 << (data[0] >> 6)
    else:
        length = 1 << (data[0] >> 6)
        assert rest == data[length:] and 0 <= flow_id <= MAX_FLOW_ID
        assert flow_id < 1 << (8 * length - 2)
        assert decode_flow_datagram(encode_flow_datagram(flow_id, rest)) == (flow_id, rest)
        assert len(encode_varint(flow_id)) <= length
    text = data.decode("utf-8", errors="replace")
    try:
        address = RouteAddress.decode(data)
    except RemoteProtocolError:
        address = RouteAddress(tuple(text.split("/")[1:]))
    # Also read the input as the segments after /proxy-udp, so the parser is reached.
    for candidate in (address, RouteAddress((PROXY_UDP, *address.segments))):
        try:
            request = FlowRequest.from_address(candidate)
        except RemoteProtocolError:
            continue
        if request is None:
            assert not candidate.startswith(PROXY_UDP)
            continue
        assert FlowRequest.from_address(request.to_address()) == request
        assert RouteAddress.decode(request.to_address().encode()) == request.to_address()
        assert request.visitor[0] == str(request.visitor[0]) and "%" not in request.visitor[0]
    # And as a fleet's relayed flow (its address after /fleet/udp, and its frames).
    try:
        relayed = UdpRelayRequest.from_address(RouteAddress((*UDP_RELAY, *address.segments)))
    except RemoteProtocolError:
        pass
    else:
        assert relayed is not None
        assert UdpRelayRequest.from_address(relayed.to_address()) == relayed
    outcomes = []
    for chunks in chunkings(data, rng_for(data)):
        reader = RelayedDatagrams()
        read = [frame for chunk in chunks for frame in reader.feed(chunk)]
        assert reader.pending <= 2 + MAX_RELAYED_DATAGRAM
        outcomes.append((tuple(read), reader.pending))
    _same_for_every_split(outcomes, "relayed datagrams")
    datagrams, pending = outcomes[0]
    encoded = b"".join(encode_relayed_datagram(datagram) for datagram in datagrams)
    assert encoded + data[len(data) - pending :] == data
    try:
        target = UdpTarget.parse_host_port(text)
    except LocalProtocolError:
        return
    assert UdpTarget.parse_host_port(str(target)) == target


#: Small bounds, so that a short script reaches every limit.
UDP_LIMITS = Limits(
    udp_max_flows=4,
    udp_flow_queue=3,
    udp_flow_idle_timeout=5.0,
    udp_datagrams_per_second=40.0,
    udp_bytes_per_second=20_000.0,
    udp_rate_burst=0.25,
)


class _FlowModel:
    """What the harness expects of a :class:`FlowTable`, kept independently."""

    def __init__(self, parity: int) -> None:
        self.parity = parity
        self.allocated: list[int] = []
        self.last_active: dict[int, float] = {}
        self.states: dict[int, FlowState] = {}
        self.queued: dict[int, int] = {}
        self.streams: dict[int, int] = {}
        self.drops: dict[DropReason, int] = {}
        #: Datagrams each bucket let through (outgoing, incoming), for the rate bound.
        self.passed = [0, 0]

    def drop(self, reason: DropReason, amount: int = 1) -> None:
        if amount:
            self.drops[reason] = self.drops.get(reason, 0) + amount

    def forget(self, flow_id: int) -> None:
        self.drop(DropReason.FLOW_ENDED, self.queued.pop(flow_id, 0))
        self.states.pop(flow_id)
        self.last_active.pop(flow_id)
        self.streams.pop(flow_id, None)


def fuzz_udp_flow_table(data: bytes) -> None:
    """A :class:`FlowTable` driven by a script on a fake clock: open, request, accept,
    open-acknowledge and end flows, send and receive datagrams, let time pass.
    Oracles (an independent model): flows and queues within their limits; our IDs of
    our parity, increasing, never reused; a datagram handed out decodes to its flow
    and payload; the timer is never later than the first real idle deadline, and only
    idle flows expire; each bucket lets through at most its burst plus its rate over
    the elapsed time; the drop counts are the model's."""
    if not data:
        return
    parity = data[0] & 1
    table = FlowTable(limits=UDP_LIMITS, local_parity=parity)
    model = _FlowModel(parity)
    rate, burst = UDP_LIMITS.udp_datagrams_per_second, UDP_LIMITS.udp_rate_burst
    timeout = UDP_LIMITS.udp_flow_idle_timeout
    now = start = 100.0
    streams = iter(range(0, 1 << 30, 4))
    reader = iter(data[1:])

    def pick(byte: int) -> int:
        """A live flow (most of the time) or any small ID."""
        live = sorted(model.states)
        return live[byte % len(live)] if live and byte < 200 else byte % 16

    for op in reader:
        arg = next(reader, 0)
        kind = op % 8
        if kind == 0:
            flow_id = table.open(now)
            if len(model.states) >= UDP_LIMITS.udp_max_flows:
                assert flow_id is None
                model.drop(DropReason.FLOW_LIMIT)
            else:
                assert flow_id is not None and flow_id & 1 == parity
                assert not model.allocated or flow_id > model.allocated[-1]
                model.allocated.append(flow_id)
                model.states[flow_id] = FlowState.OPENING
                model.last_active[flow_id] = now
                if arg & 1:
                    bound = next(streams)
                    table.bind(flow_id, bound)
                    model.streams[flow_id] = bound
        elif kind == 1:
            flow_id, requested_on = arg % 32, next(streams)
            problem = table.request(flow_id, requested_on, now)
            if flow_id & 1 == parity or flow_id in model.states:
                assert problem is not None
            elif len(model.states) >= UDP_LIMITS.udp_max_flows:
                assert problem is not None
                model.drop(DropReason.FLOW_LIMIT)
            else:
                assert problem is None
                model.states[flow_id] = FlowState.REQUESTED
                model.last_active[flow_id] = now
                model.streams[flow_id] = requested_on
        elif kind == 2:
            flow_id = pick(arg)
            state = model.states.get(flow_id)
            try:
                stream = table.accept(flow_id, now)
            except LocalProtocolError:
                assert state not in (None, FlowState.REQUESTED)
            else:
                assert state in (None, FlowState.REQUESTED)
                if state is not None:
                    assert stream == model.streams[flow_id]
                    model.states[flow_id] = FlowState.OPEN
                    model.last_active[flow_id] = now
        elif kind == 3:
            flow_id = pick(arg)
            state = model.states.get(flow_id)
            try:
                released = table.opened(flow_id, now)
            except LocalProtocolError:
                assert state is not FlowState.OPENING
            else:
                assert state is FlowState.OPENING
                assert len(released) == model.queued.pop(flow_id, 0)
                assert all(decode_flow_datagram(d)[0] == flow_id for d in released)
                model.states[flow_id] = FlowState.OPEN
                model.last_active[flow_id] = now
        elif kind == 4:
            flow_id = pick(arg)
            ended_stream = table.end(flow_id)
            if flow_id in model.states:
                assert ended_stream == model.streams.get(flow_id)
                model.forget(flow_id)
            else:
                assert ended_stream is None
        elif kind == 5:
            flow_id, payload = pick(arg), bytes((op >> 3) * 37)
            max_datagram, congested = (1200 if op & 0x80 else 40), bool(arg & 0x40)
            state = model.states.get(flow_id)
            result = table.outgoing(
                flow_id, payload, now, max_datagram=max_datagram, congested=congested
            )
            if isinstance(result, DropReason):
                model.drop(result)
                if state in (None, FlowState.REQUESTED):
                    assert result is DropReason.UNKNOWN_FLOW
                elif len(encode_varint(flow_id)) + len(payload) > max_datagram:
                    assert result is DropReason.TOO_BIG
                else:
                    assert result in (
                        DropReason.QUEUE_FULL,
                        DropReason.CONGESTED,
                        DropReason.OVER_RATE,
                    )
                    assert (result is DropReason.CONGESTED) == (
                        congested and state is FlowState.OPEN
                    )
            else:
                model.passed[0] += 1
                model.last_active[flow_id] = now
                if result is None:
                    assert state is FlowState.OPENING
                    model.queued[flow_id] = model.queued.get(flow_id, 0) + 1
                    assert model.queued[flow_id] <= UDP_LIMITS.udp_flow_queue
                else:
                    assert state is FlowState.OPEN
                    assert decode_flow_datagram(result) == (flow_id, payload)
        elif kind == 6:
            size = arg % 24
            datagram = bytes(next(reader, 0) for _ in range(size))
            result_in = table.incoming(datagram, now)
            if isinstance(result_in, DropReason):
                model.drop(result_in)
            else:
                assert decode_flow_datagram(datagram) == result_in
                assert model.states[result_in[0]] in (FlowState.OPEN, FlowState.OPENING)
                model.passed[1] += 1
                model.last_active[result_in[0]] = now
        else:
            now += arg * 0.05
            timer = table.get_timer()
            if model.states:
                assert timer is not None
                assert timer <= min(model.last_active.values()) + timeout + 1e-9
            expired = table.handle_timer(now) if timer is not None and timer <= now else []
            for flow_id, stream_id in expired:
                assert model.last_active[flow_id] + timeout <= now + 1e-9
                assert stream_id == model.streams.get(flow_id)
                model.forget(flow_id)
            # The timer is never late, so every flow idle for the timeout is gone now.
            assert all(at + timeout > now for at in model.last_active.values())
        assert len(table) == len(model.states) <= UDP_LIMITS.udp_max_flows
        for flow_id, state in model.states.items():
            assert table.state(flow_id) is state
        for passed in model.passed:
            assert passed <= rate * burst + rate * (now - start) + 1
        assert dict(table.drops) == model.drops, (table.drops, model.drops)
    assert len(set(model.allocated)) == len(model.allocated)


def _quic_harnesses() -> dict[str, Harness]:
    from . import client_harness, quic_harness

    return {**quic_harness.HARNESSES, **client_harness.HARNESSES}


#: Every harness by name; the corpus of ``name`` lives in ``fuzz/corpus/<name>/``.
HARNESSES: dict[str, Harness] = {
    "framing": fuzz_framing,
    "address": fuzz_address,
    "targets": fuzz_targets,
    "nyan_acceptor": fuzz_nyan_acceptor,
    "nyan_opener": fuzz_nyan_opener,
    "simple_ack_listener": fuzz_simple_ack_listener,
    "simple_ack_connector": fuzz_simple_ack_connector,
    "token_listener": fuzz_token_listener,
    "token_connector": fuzz_token_connector,
    "proxyme_server": fuzz_proxyme_server,
    "proxyme_client": fuzz_proxyme_client,
    "sni": fuzz_sni,
    "http_host": fuzz_http_host,
    "proxy_protocol": fuzz_proxy_protocol,
    "names": fuzz_names,
    "udp_codecs": fuzz_udp_codecs,
    "udp_flow_table": fuzz_udp_flow_table,
    **_quic_harnesses(),
}
