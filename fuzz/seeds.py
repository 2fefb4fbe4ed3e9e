"""The committed seed corpus, as code: ``python -m fuzz seeds`` rewrites fuzz/corpus/.

Seeds are the wire traces of docs/protocol.md and /work/shared/wire-snocat-0.8.md
(the reference's ``proxyme`` and ``proxy-tcp`` exchanges, SimpleAck, the token
example), plus edge cases next to every limit and error branch.  Every file is small
and named for what it holds.  The QUIC seeds embed a real client's first Initial
(its ClientHello), so they differ from one generation to the next.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from pathlib import Path

from aioquic._buffer import Buffer
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import pull_quic_header

from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import SIMPLE_ACK_ANSWER, SIMPLE_ACK_HELLO, token_mac
from snocat_proto._wire.engine import QuicEngine, quic_configuration
from snocat_proto._wire.framing import encode_frame
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.negotiation import HEADER

from .harnesses import MAC_PLACEHOLDER, NAME, NONCE, SECRET

PROXYME = b"/proxyme/0.0.1/127.0.0.1/5000"
PROXY_TCP = b"/proxy-tcp/dns/127.0.0.1/tcp/5000"
TOKEN_HELLO = b"snocat-token-v1".ljust(32, b"\0") + NONCE
GRANT = b'["[::]:8080"]'
FLOW_SETUP = b"/proxy-udp/1/dns/dns.example/udp/53/from/ip4/203.0.113.7/udp/40000"


def _record(control: int, payload: bytes) -> bytes:
    return bytes([control]) + len(payload).to_bytes(2, "big") + payload


def _op(op: int, argument: int, payload: bytes = b"") -> bytes:
    return bytes([op, argument]) + len(payload).to_bytes(2, "big") + payload


def _varint(value: int) -> bytes:
    buf = Buffer(capacity=8)
    buf.push_uint_var(value)
    return buf.data


def _stream_frame(stream_id: int, data: bytes, *, offset: int = 0, fin: bool = False) -> bytes:
    frame_type = 0x08 | 0x04 | 0x02 | (0x01 if fin else 0)  # OFF, LEN (and FIN)
    return _varint(frame_type) + _varint(stream_id) + _varint(offset) + _varint(len(data)) + data


def _nyan(route: int, *, fin: bool = False) -> int:
    """The argument of a ``client_handshaken`` open: NYAN to ``ROUTES[route]`` (7: the
    payload is the address)."""
    return 0x02 | route << 2 | (0x01 if fin else 0)


def _client_handshaken() -> dict[str, bytes]:
    # Options byte: bit0 token, bit1 authenticate, bits2-3 policy (0 at once, 1 deferred,
    # 2 refuse all, 3 connecting), bit4 the application reads, bit5 the aggregator reads.
    # Ops: 0 open, 1 send, 2 reset, 3 stop, 4 frames, 5 wait, 6 app opens, 7 app decides,
    # 8 app reads, 9 app closes, 10 app sends (1 and 10: bits 4-6 repeat the payload 4**k).
    ok = encode_frame(b'{"ok":true}')
    stop_then_open = (
        _varint(0x05) + _varint(5) + _varint(0) + _stream_frame(5, HEADER + encode_frame(PROXY_TCP))
    )
    return {
        "token-accept-and-relay": b"\x33"
        + _op(0, _nyan(0), b"GET / HTTP/1.0\r\n\r\n")
        + _op(5, 3)
        + _op(10, 0, b"HTTP/1.0 200 OK\r\n\r\n")
        + _op(1, 1, b"bye")
        + _op(9, 0),
        "simple-routes": b"\x32"
        + _op(0, _nyan(1), b"x")
        + _op(0, _nyan(2))
        + _op(0, _nyan(3))
        + _op(0, _nyan(4), b"x")
        + _op(0, _nyan(5))
        + _op(0, _nyan(6))
        + _op(0, _nyan(7), b"/proxy-tcp/dns/Example.Com/tcp/443")
        + _op(5, 4),
        "deferred-then-decided": b"\x27"
        + _op(0, _nyan(1), b"early bytes")
        + _op(0, _nyan(2), b"x")
        + _op(5, 4)
        + _op(7, 0)
        + _op(7, 0x80)
        + _op(8, 0)
        + _op(5, 7),
        "deferred-over-pending-limit": b"\x27"
        + b"".join(_op(0, _nyan(n % 4), b"x") for n in range(5))
        + _op(5, 7),
        "connecting-undecided": b"\x2f" + _op(0, _nyan(3)) + _op(0, _nyan(5)) + _op(5, 7),
        "refuse-all": b"\x3b" + _op(0, _nyan(0), b"x") + _op(1, 1, b"late") + _op(5, 5),
        "unread-window-fill": b"\x23"
        + _op(0, _nyan(0), b"a" * 1000)
        + _op(1, 4 << 4, b"b" * 100)  # 256 times: past the stream window
        + _op(0, _nyan(1), b"a" * 1000)
        + _op(1, 1 << 1 | 4 << 4, b"c" * 100)
        + _op(5, 3)
        + _op(8, 0x80)
        + _op(5, 3)
        + _op(8, 0),
        "app-sends-until-full": b"\x13"
        + _op(0, _nyan(0))
        + _op(10, 4 << 4, b"z" * 100)  # 256 times, cut to what the buffer takes
        + _op(10, 4 << 4, b"z" * 100)
        + _op(5, 5),
        "client-opens-proxyme": b"\x33"
        + _op(6, 0)
        + _op(5, 1)
        + _op(1, 0, HEADER + b"\x00" + encode_frame(GRANT))
        + _op(10, 0, encode_frame(b'""'))
        + _op(5, 3)
        + _op(1, 1, bytes(8)),
        "client-opens-refused": b"\x33" + _op(6, 1) + _op(5, 1) + _op(1, 1, HEADER + b"\x01"),
        "client-opens-no-answer": b"\x33" + _op(6, 0) + _op(5, 6) + _op(5, 6),
        "silent-token-no-result": b"\x21"
        + _op(1, 0x80, TOKEN_HELLO)
        + _op(0, _nyan(0), b"x")
        + _op(5, 7),
        "silent-token-result-ok": b"\x31"
        + _op(1, 0x80, TOKEN_HELLO + ok)
        + _op(0, _nyan(0), b"hello")
        + _op(5, 3),
        "silent-token-result-refused": b"\x21"
        + _op(1, 0x80, TOKEN_HELLO + encode_frame(b'{"ok":false,"reason":"no"}')),
        "silent-held-then-ok": b"\x31"
        + _op(1, 0x80, TOKEN_HELLO)
        + b"".join(_op(0, _nyan(n), b"held" * 100) for n in range(5))
        + _op(5, 2)
        + _op(1, 0x80, ok)
        + _op(5, 3),
        "silent-simple-hello": b"\x30"
        + _op(1, 0x80, SIMPLE_ACK_HELLO)
        + _op(0, _nyan(3), b"x")
        + _op(6, 0)
        + _op(5, 3),
        "auth-channel-reset-and-stop": b"\x33" + _op(2, 0x80, b"\x01") + _op(3, 0x80, b"\x02"),
        "negotiation-timeout": b"\x33" + _op(0, 0, b"NY") + _op(5, 6),
        "reset-during-decision": b"\x27"
        + _op(0, _nyan(0))
        + _op(5, 1)
        + _op(2, 0, b"\x07")
        + _op(7, 0),
        "app-resets-open-stream": b"\x33" + _op(0, _nyan(0), b"x") + _op(9, 0x80, b"\x09"),
        "frames-stop-before-first-byte": b"\x33" + _op(4, 0, stop_then_open) + _op(5, 3),
        "frames-over-window": b"\x33"
        + _op(4, 0, _stream_frame(5, b"", offset=10_000_000, fin=True)),
        "frames-max-streams": b"\x33" + _op(4, 0, _stream_frame(4 * 40 + 1, b"NYAN")),
        "frames-uni-stream": b"\x33" + _op(4, 0, _stream_frame(3, b"uni")),
        "frames-other-address": b"\x33" + _op(4, 1, b"\x01") + _op(4, 2, b"\x01"),
        "frames-close": b"\x33" + _op(4, 0, b"\x1d\x10\x03bye"),
    }


def _client_initial_plaintexts() -> list[tuple[bytes, bytes]]:
    """``(dcid + scid, plaintext payload)`` of a real client's first Initial packets."""
    configuration = quic_configuration(is_client=True, limits=Limits(), server_name="localhost")
    configuration.verify_mode = ssl.CERT_NONE
    engine = QuicEngine(configuration=configuration, limits=Limits())
    engine.connect(("10.0.0.1", 4433), now=0.0)
    found = []
    for datagram, _ in engine.datagrams_to_send(0.0):
        header = pull_quic_header(Buffer(data=datagram), host_cid_length=8)
        crypto = CryptoPair()
        crypto.setup_initial(cid=header.destination_cid, is_client=False, version=1)
        buf = Buffer(data=datagram)
        pull_quic_header(buf, host_cid_length=8)
        packet = datagram[: header.packet_length]
        _, payload, _ = crypto.decrypt_packet(packet, buf.tell(), 0)
        found.append((header.destination_cid + header.source_cid, payload.rstrip(b"\0")))
    return found


def _real_client_hello(server_hostname: str | None, version: ssl.TLSVersion | None) -> bytes:
    """The first bytes Python's ssl module writes as a client (no socket)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if version is not None:
        context.minimum_version = context.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def _refragment(wire: bytes, fragment: int) -> bytes:
    message = wire[5 : 5 + int.from_bytes(wire[3:5], "big")]
    return b"".join(
        b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (message[i : i + fragment] for i in range(0, len(message), fragment))
    )


def _sni_extension(name: bytes) -> bytes:
    entry = b"\x00" + len(name).to_bytes(2, "big") + name
    data = len(entry).to_bytes(2, "big") + entry
    return b"\x00\x00" + len(data).to_bytes(2, "big") + data


def _sni_seeds() -> dict[str, bytes]:
    """Mode byte 0x00 then the wire, or an odd mode byte (fragment size << 1 | 1) then
    the extensions block of a ClientHello the harness frames."""
    tls13 = _real_client_hello("office-1.tunnels.example.com", ssl.TLSVersion.TLSv1_3)
    tls12 = _real_client_hello("office-1.tunnels.example.com", ssl.TLSVersion.TLSv1_2)
    return {
        "real-tls13": b"\x00" + tls13,
        "real-tls12": b"\x00" + tls12,
        "real-default": b"\x00" + _real_client_hello("example.com", None),
        "real-no-sni": b"\x00" + _real_client_hello(None, ssl.TLSVersion.TLSv1_3),
        "real-fragments-7": b"\x00" + _refragment(tls12, 7),
        "real-fragments-1": b"\x00" + _refragment(tls12, 1)[:900],
        "real-with-ccs": b"\x00" + tls13 + b"\x14\x03\x03\x00\x01\x01",
        "truncated": b"\x00" + tls13[:100],
        "plain-http": b"\x00GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        "alert": b"\x00\x15\x03\x03\x00\x02\x02\x70",
        "sslv2": b"\x00\x80\x2e\x01\x03\x01\x00\x15",
        "empty-record": b"\x00\x16\x03\x01\x00\x00",
        "server-hello": b"\x00\x16\x03\x03\x00\x04\x02\x00\x00\x00",
        "framed-sni": b"\x0b" + _sni_extension(b"office-1.tunnels.example.com"),
        "framed-sni-bytewise": b"\x03" + _sni_extension(b"a.example"),
        "framed-two-sni": b"\x21" + _sni_extension(b"a.example") + _sni_extension(b"b.example"),
        "framed-bad-name": b"\xff" + _sni_extension(b"a_b.example"),
        "framed-ip-name": b"\xff" + _sni_extension(b"192.0.2.1"),
        "framed-padding": b"\xff" + b"\x00\x15\x01\x00" + bytes(256) + _sni_extension(b"p.example"),
        "framed-empty": b"\x01",
    }


def _proxy_protocol_seeds() -> dict[str, bytes]:
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    v4 = bytes.fromhex("C0A80001 C0A8000B DC04 01BB")
    v6 = bytes(15) + b"\x01" + bytes(15) + b"\x02" + bytes.fromhex("04D2 01BB")
    return {
        "spec-v1": b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n\r\n",
        "v1-tcp6": b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 443\r\nSSH-2.0-x\r\n",
        "v1-unknown": b"PROXY UNKNOWN\r\n",
        "v1-unknown-long": b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n",
        "v1-lf-only": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        "v1-leading-zero": b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        "v1-no-crlf": b"PROXY UNKNOWN " + b"x" * 120,
        "v2-tcp4": sig + b"\x21\x11\x00\x0c" + v4 + b"data",
        "v2-tcp6": sig + b"\x21\x21\x00\x24" + v6,
        "v2-local": sig + b"\x20\x00\x00\x00",
        "v2-local-with-block": sig + b"\x20\x11\x00\x0c" + v4,
        "v2-unspec": sig + b"\x21\x00\x00\x00",
        "v2-udp": sig + b"\x21\x12\x00\x0c" + v4,
        "v2-unix": sig + b"\x21\x31\x00\xd8" + bytes(216),
        "v2-tlvs": sig + b"\x21\x11\x00\x19" + v4 + b"\x02\x00\x09a.example\x04\x00\x01\x00",
        "v2-bad-tlv": sig + b"\x21\x11\x00\x10" + v4 + b"\x04\x00\x05x",
        "v2-version-1": sig + b"\x11\x11\x00\x0c" + v4,
        "v2-command-2": sig + b"\x22\x11\x00\x0c" + v4,
        "v2-short-block": sig + b"\x21\x11\x00\x08" + v4[:8],
        "v2-too-large": sig + b"\x21\x11\xff\xff",
        "neither": b"GET / HTTP/1.1\r\n\r\n",
    }


def seeds() -> dict[str, dict[str, bytes]]:
    """Every seed, by harness and file name."""
    address = RouteAddress.of("proxy-tcp", "tcp", "22")
    token_response = json.dumps({"name": NAME, "mac": MAC_PLACEHOLDER.decode()}).encode()
    real_response = json.dumps(
        {"name": NAME, "mac": token_mac(SECRET, NONCE, NAME).hex()}, separators=(",", ":")
    ).encode()
    initials = _client_initial_plaintexts()
    dcid, hello = initials[0]

    return {
        "framing": {
            # max_size byte first (x7), then frames.
            "proxyme-request": b"\x05" + encode_frame(PROXYME),
            "proxyme-subject-and-grant": b"\x03" + encode_frame(b'""') + encode_frame(GRANT),
            "empty-frame": b"\x01" + encode_frame(b""),
            "too-large": b"\x01" + (1 << 31).to_bytes(4, "big") + b"x",
            "partial-header": b"\x10\x00\x00",
            "with-remainder": b"\x10" + encode_frame(b"abc") + b"\x00\x00\x00\x05ab",
        },
        "address": {
            "empty": b"",
            "root": b"/",
            "two-empty": b"//",
            "escaped-slash": b"/a\\/b",
            "escaped-backslash": b"/a\\\\b",
            "mixed": b"/a\\/b/c\\\\d/",
            "utf8": "/é".encode(),
            "proxy-tcp": address.encode(),
            "proxyme": PROXYME,
            "no-leading-slash": b"a",
            "lone-backslash": b"/a\\",
            "bad-escape": b"/a\\x",
            "bad-utf8": b"/\xff\xfe",
            "surrogate-bytes": b"/\xed\xa0\x80",
        },
        "targets": {
            "local": b"/proxy-tcp/tcp/22",
            "ip4": b"/proxy-tcp/ip4/127.0.0.1/tcp/5000",
            "ip6": b"/proxy-tcp/ip6/::1/tcp/5000",
            "ip6-zone": b"/proxy-tcp/ip6/fe80::1%eth0/tcp/5000",
            "dns": PROXY_TCP,
            "dns4": b"/proxy-tcp/dns4/example.com/tcp/443",
            "dns6": b"/proxy-tcp/dns6/example.com/tcp/0443",
            "port-zero": b"/proxy-tcp/tcp/0",
            "port-sign": b"/proxy-tcp/tcp/+80",
            "extra-segment": b"/proxy-tcp/dns/a/tcp/1/x",
            "proxyme-long": PROXYME,
            "proxyme-short": b"/proxyme/0.0.1/5000",
            "proxyme-version": b"/proxyme/0.0.2/5000",
            "host-port": b"127.0.0.1:5000",
            "host-port-v6": b"[::1]:5000",
            "host-port-name": b"localhost:80",
        },
        "nyan_acceptor": {
            "reference-proxyme": HEADER + encode_frame(PROXYME),
            "reference-proxy-tcp": HEADER + encode_frame(PROXY_TCP) + b"GET / HTTP/1.0\r\n",
            "refused-nope": HEADER + encode_frame(b"/nope"),
            "bad-magic": b"NYAX\x00" + encode_frame(b"/a"),
            "version-1": b"NYAN\x01" + encode_frame(b"/a"),
            "huge-length": HEADER + (1 << 31).to_bytes(4, "big"),
            "bad-address": HEADER + encode_frame(b"/bad\\escape"),
            "fin-in-length": HEADER + b"\x00\x00",
        },
        "nyan_opener": {
            "accepted": HEADER + b"\x00",
            "accepted-with-bytes": HEADER + b"\x00HTTP/1.0 200 OK\r\n",
            "refused": HEADER + b"\x01",
            "refused-other": HEADER + b"\x7f",
            "bad-magic": b"NYAM\x00\x00",
            "version-2": b"NYAN\x02\x00",
            "header-only": HEADER,
        },
        "simple_ack_listener": {
            "answer": SIMPLE_ACK_ANSWER,
            "answer-split": SIMPLE_ACK_ANSWER[:10],
            "token-client": b"",
            "compat-to-token": b"snocat-token-v1/snocat-token-v1".ljust(64, b"\0"),
            "garbage": b"HELO/HELX".ljust(64, b"\0"),
        },
        "simple_ack_connector": {
            "hello": SIMPLE_ACK_HELLO,
            "token-hello": TOKEN_HELLO,
            "unknown": b"HOLA".ljust(64, b"\0"),
            "no-nul": b"H" * 64,
            "short": SIMPLE_ACK_HELLO[:20],
        },
        "token_listener": {
            "response-placeholder": encode_frame(token_response),
            "response-example": encode_frame(real_response),
            "compat-answer": b"snocat-token-v1/snocat-token-v1".ljust(64, b"\0"),
            "too-large": (5000).to_bytes(4, "big") + b"{",
            "not-json": encode_frame(b"{nope"),
            "bad-name": encode_frame(b'{"name":"a b","mac":"' + b"0" * 64 + b'"}'),
            "trailing": encode_frame(token_response) + b"x",
        },
        "token_connector": {
            "hello-ok": TOKEN_HELLO + encode_frame(b'{"ok":true}'),
            "hello-ok-features": TOKEN_HELLO
            + encode_frame(b'{"ok":true,"features":["proxyme-options","later"]}'),
            "hello-refused": TOKEN_HELLO
            + encode_frame(b'{"ok":false,"reason":"unknown tunnel name or wrong token"}'),
            "hello-bad-result": TOKEN_HELLO + encode_frame(b"[1]"),
            "simple-hello": SIMPLE_ACK_HELLO,
            "malformed-hello": b"snocat-token-v1\0x".ljust(64, b"\0"),
            "result-too-large": TOKEN_HELLO + (99999).to_bytes(4, "big"),
        },
        "proxyme_server": {
            "reference-subject": encode_frame(b'""'),
            "subject-then-release": encode_frame(b'""') + bytes(8),
            "subject-not-string": encode_frame(b"[]"),
            "subject-too-large": encode_frame(b'"' + b"a" * 300 + b'"'),
            "surrogate": encode_frame(b'"\\ud800"'),
            "release-too-long": encode_frame(b'""') + bytes(9),
            "options-port": encode_frame(b'{"port":8085}'),
            "options-bad-port": encode_frame(b'{"port":70000}'),
            "options-port-then-release": encode_frame(b'{"port":8081,"x":1}') + bytes(8),
        },
        "proxyme_client": {
            "reference-grant": encode_frame(GRANT),
            "grant-then-ack": encode_frame(GRANT) + bytes(8),
            "denied": encode_frame(b"null"),
            "bad-response": encode_frame(b'{"a":1}'),
            "nan": encode_frame(b"[NaN]"),
            "ack-plus-extra": encode_frame(GRANT) + bytes(9),
            "deep": encode_frame(b"[" * 5000),
            "options-denied": encode_frame(b'{"denied":"port 8085 is in use","retry":false}'),
            "options-bad-denial": encode_frame(b'{"denied":7}'),
            "options-control-reason": encode_frame(b'{"denied":"a\\u001bb"}'),
        },
        "udp_codecs": {
            "datagram-flow-0": b"\x00hello",
            "datagram-long-form": b"\x40\x01x",
            "datagram-8-byte-id": b"\xc0\x00\x00\x00\x00\x00\x00\x07payload",
            "datagram-truncated": b"\x80\x01",
            "empty": b"",
            "setup": FLOW_SETUP,
            "setup-local-ip6": b"/proxy-udp/2/udp/5353/from/ip6/2001:db8::1/udp/9",
            "setup-bad-id": b"/proxy-udp/007/udp/53/from/ip4/1.2.3.4/udp/5",
            "setup-zone": b"/proxy-udp/1/udp/53/from/ip6/fe80::1%eth0/udp/5",
            "segments-only": b"/7/dns4/a.example/udp/53/from/ip4/10.0.0.1/udp/1",
            "udp-target": b"[::1]:53",
        },
        "udp_flow_table": {
            # parity byte, then (op, arg) pairs: op % 8 picks open, request, accept,
            # opened, end, outgoing, incoming, time (see fuzz_udp_flow_table).
            "open-queue-opened": b"\x01" + bytes([0, 1, 0x85, 0, 0x85, 0, 3, 0, 0x85, 0]),
            "request-accept-receive": b"\x00" + bytes([1, 3, 2, 0, 6, 2, 3, 0x41]),
            "flood": b"\x01" + bytes([0, 1, 3, 0]) + bytes([0xFD, 0]) * 40,
            "idle": b"\x00" + bytes([1, 5, 2, 0, 7, 60, 7, 60, 5, 0]),
            "limits": b"\x01" + bytes([0, 0]) * 6 + bytes([1, 2, 4, 0, 0, 0]),
        },
        "endpoint_datagrams": {
            # options byte, then records: control(1) length(2) payload.
            "retry-sealed-hello": b"\x00" + _record(0x20, dcid + hello),
            "retry-sealed-hello-token": b"\x00" + _record(0x60, dcid + hello),
            "no-retry-sealed-hello": b"\x01" + _record(0x20, dcid + hello),
            "token-auth-no-retry": b"\x03" + _record(0x20, dcid + hello),
            "junk": b"\x00" + _record(0x00, b"\x40" + b"\x00" * 40),
            "unknown-version": b"\x00"
            + _record(
                0x01,
                bytes([0xC0])
                + (0x1A2A3A4A).to_bytes(4, "big")
                + b"\x08dcid0000\x08scid0000"
                + bytes(1200),
            ),
            "two-clients-max-1": b"\x05"
            + _record(0x20, dcid + hello)
            + _record(0x21, b"other-01other-02" + hello),
        },
        "endpoint_handshaken": {
            # options byte (bit0 token, bit1 authenticate, bits2-3 routing), then ops.
            "auth-open-proxyme": b"\x03"
            + _op(0, 0, HEADER + encode_frame(PROXYME) + encode_frame(b'""')),
            "auth-open-and-reset": b"\x03" + _op(0, 0, HEADER) + _op(2, 0, b"\x02"),
            "unauth-held-stream": b"\x01" + _op(0, 0, HEADER + encode_frame(b"/a") + b"x" * 500),
            "unauth-write-auth-channel": b"\x01" + _op(1, 0x80, encode_frame(b'{"name":"x"}')),
            "simple-answer-late": b"\x00" + _op(1, 0x80, SIMPLE_ACK_ANSWER) + _op(0, 0, HEADER),
            "frames-stream": b"\x03"
            + _op(4, 0, _stream_frame(0, HEADER + encode_frame(b"/svc"), fin=True)),
            "frames-over-window": b"\x03"
            + _op(4, 0, _stream_frame(0, b"", offset=10_000_000, fin=True)),
            "frames-uni-stream": b"\x03" + _op(4, 0, _stream_frame(2, b"uni")),
            "frames-migrate": b"\x03" + _op(4, 1, b"\x01") + _op(4, 1, b"\x01"),
            "frames-max-streams": b"\x03" + _op(4, 0, _stream_frame(4 * 40, b"NYAN")),
            "wait-timeouts": b"\x01" + _op(0, 0, b"NY") + _op(5, 6) + _op(5, 7),
            "server-opens": b"\x03" + _op(6, 0, b"host") + _op(5, 3) + _op(7, 0),
        },
        "client_handshaken": _client_handshaken(),
        "sni": _sni_seeds(),
        "http_host": {
            "simple": b"GET / HTTP/1.1\r\nHost: office-1.tunnels.example.com\r\n\r\n",
            "with-body": b"POST /x HTTP/1.1\r\nHost: A.Example:8080\r\nContent-Length: 2\r\n\r\nhi",
            "absolute-form": b"GET http://a.example:80/p HTTP/1.1\r\nHost: b.example\r\n\r\n",
            "http10-absolute": b"GET http://a.example/ HTTP/1.0\r\n\r\n",
            "lf-only": b"GET / HTTP/1.1\nHost: a.example\n\n",
            "leading-empty-lines": b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "ipv6-host": b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n",
            "ipv4-host": b"GET / HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n",
            "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n",
            "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            "no-host": b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
            "space-before-colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "bare-cr": b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
            "non-ascii-host": "GET / HTTP/1.1\r\nHost: é.example\r\n\r\n".encode(),
            "obs-text-cookie": "GET / HTTP/1.1\r\nCookie: é\r\nHost: a\r\n\r\n".encode(),
            "userinfo": b"GET http://u@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
            "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "http2-version": b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            "tls-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            "proxy-v1": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET / HTTP/1.1\r\n\r\n",
            "near-small-limit": b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 170 + b"\r\n\r\n",
            "bad-port": b"GET / HTTP/1.1\r\nHost: a.example:70000\r\n\r\n",
        },
        "proxy_protocol": _proxy_protocol_seeds(),
        "names": {
            "name": b"tunnels.example.com\x00office-1.tunnels.example.com",
            "upper-dot": b"Tunnels.Example.COM.\x00OFFICE-1.tunnels.example.com.",
            "two-labels": b"tunnels.example.com\x00a.b.tunnels.example.com",
            "bare-domain": b"tunnels.example.com\x00tunnels.example.com",
            "other-domain": b"tunnels.example.com\x00a.tunnels.example.org",
            "bad-domain": b"*.example.com\x00a.example.com",
            "ip-domain": b"192.0.2.1\x00a.192.0.2.1",
            "localhost": b"localhost\x00app.localhost",
            "long-label": b"example.com\x00" + b"a" * 64 + b".example.com",
            "underscore": b"example.com\x00a_b.example.com",
        },
    }


def write_corpus(directory: Path, names: list[str] | None = None) -> None:
    """Write the seeds of ``names`` (default: every harness) under ``directory``."""
    for harness, files in seeds().items():
        if names and harness not in names:
            continue
        target = directory / harness
        target.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (target / name).write_bytes(data)
        print(f"{harness}: {len(files)} seeds")
