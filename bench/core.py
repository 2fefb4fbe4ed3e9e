"""The core alone: codec operations per second, and its share of a bulk transfer's CPU.

    python -m bench.core [--bytes 50e6] [--no-profile]

Part one times the pure parts of ``snocat_proto`` in a loop: route addresses, the
length-prefixed frames, a whole NYAN negotiation (both sides) and the UDP flow codec
and table; then both ends in one process on a fake clock: a stream transfer, and UDP
flow datagrams (datagrams a second, CPU per datagram) against bare aioquic.  Part two runs
both snocat processes under cProfile during one upload through a real tunnel and
splits their CPU time by where it was spent: snocat's core (``snocat_proto``), the
adapter (``snocat_anyio``), aioquic (Python, and its C crypto/buffer calls),
anyio/asyncio, and socket and other builtins.  cProfile inflates code that makes
many small Python calls, so read the shares as an upper bound for Python-heavy parts.
"""

from __future__ import annotations

import argparse
import contextlib
import pstats
import ssl
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from bench.common import UPLOAD, Target, scratch_directory, snocat_pair, table, transfer
from bench.memory_pair import (
    datagram_transfer,
    raw_datagram_transfer,
    raw_transfer,
    tunnel_transfer,
)
from snocat_proto._service.visitors import Forward, ListenerKind, VisitorStart
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.framing import FrameDecoder, encode_frame
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.names import TunnelDomain
from snocat_proto._wire.negotiation import AcceptorNegotiation, OpenerNegotiation
from snocat_proto._wire.proxy_protocol import ProxyAddresses, ProxyHeaderParser, encode_v2
from snocat_proto._wire.targets import ProxyTcpTarget
from snocat_proto._wire.udp_flows import FlowTable, decode_flow_datagram, encode_flow_datagram
from snocat_proto._wire.visitor import split_visitor, with_visitor

LIMITS = Limits()
ADDRESS = ProxyTcpTarget.parse_host_port("127.0.0.1:8080").to_address()
ENCODED = ADDRESS.encode()
FRAME = encode_frame(ENCODED)


def _route_encode() -> None:
    ADDRESS.encode()


def _route_parse() -> None:
    ProxyTcpTarget.from_address(RouteAddress.decode(ENCODED))


def _frame_round_trip() -> None:
    decoder = FrameDecoder(LIMITS.max_frame_size)
    decoder.feed(encode_frame(ENCODED))
    decoder.next_frame()


def _frame_bytewise() -> None:
    decoder = FrameDecoder(LIMITS.max_frame_size)
    for i in range(len(FRAME)):
        decoder.feed(FRAME[i : i + 1])
    decoder.next_frame()


def _negotiation() -> None:
    opener = OpenerNegotiation(ADDRESS, limits=LIMITS)
    acceptor = AcceptorNegotiation(limits=LIMITS)
    to_acceptor = opener.initial_data()
    to_opener = acceptor.initial_data()
    acceptor.receive_data(to_acceptor)
    opener.receive_data(to_opener + acceptor.accept())


_FLOWS = FlowTable(
    limits=Limits(udp_datagrams_per_second=1e12, udp_bytes_per_second=1e15), local_parity=1
)
_FLOWS.request(2, stream_id=0, now=0.0)
_FLOWS.accept(2, 0.0)
_DATAGRAM = encode_flow_datagram(2, bytes(1000))


def _flow_datagram_codec() -> None:
    decode_flow_datagram(encode_flow_datagram(300, _DATAGRAM))


def _flow_table_both_ways() -> None:
    _FLOWS.outgoing(2, _DATAGRAM, 1.0, max_datagram=1200, congested=False)
    _FLOWS.incoming(_DATAGRAM, 1.0)


# The shared listeners' work per visitor (docs/protocol.md 3.14, 3.18) ----------------

_DOMAIN = TunnelDomain.parse("tunnels.example.com")
_VISITOR = ProxyAddresses.from_sockaddrs(("203.0.113.7", 40000), ("198.51.100.1", 443))
#: A browser-like request head (curl's, plus the headers a browser adds).
_HEAD = (
    b"GET /index.html HTTP/1.1\r\nHost: office-1.tunnels.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
    b"Connection: keep-alive\r\nUpgrade-Insecure-Requests: 1\r\n\r\n"
)


def _client_hello() -> bytes:
    """A real ClientHello (Python's ssl, TLS 1.3 and 1.2 offered) for the SNI benchmark."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="office-1.tunnels.example.com")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


_HELLO = _client_hello()
_V2 = encode_v2(_VISITOR)
_SUFFIXED = with_visitor(ADDRESS, _VISITOR).encode()


def _sniff(kind: ListenerKind, data: bytes) -> None:
    start = VisitorStart(kind, limits=LIMITS, connection=_VISITOR, domain=_DOMAIN)
    assert isinstance(start.receive_data(data), Forward)


def _sniff_head() -> None:
    _sniff(ListenerKind.HTTP, _HEAD)


def _sniff_hello() -> None:
    _sniff(ListenerKind.TLS, _HELLO)


def _proxy_v2() -> None:
    ProxyHeaderParser(limits=LIMITS).feed(_V2)


def _visitor_suffix() -> None:
    split_visitor(RouteAddress.decode(with_visitor(ADDRESS, _VISITOR).encode()))


def ops_per_second(function: Callable[[], None], seconds: float = 1.0) -> float:
    count, batch = 0, 1000
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(batch):
            function()
        count += batch
    return count / elapsed


CODECS: list[tuple[str, Callable[[], None]]] = [
    (f"route address encode ({len(ENCODED)} B)", _route_encode),
    ("route address parse + proxy-tcp target", _route_parse),
    ("frame encode + decode", _frame_round_trip),
    (f"frame decode fed byte by byte ({len(FRAME)} B)", _frame_bytewise),
    ("NYAN negotiation, both sides, accept", _negotiation),
    ("flow datagram encode + decode (1000 B)", _flow_datagram_codec),
    ("flow table: one datagram out and one in", _flow_table_both_ways),
    (f"--http: request head ({len(_HEAD)} B) -> tunnel name", _sniff_head),
    (f"--tls: ClientHello ({len(_HELLO)} B) -> tunnel name", _sniff_hello),
    (f"PROXY v2 header parse ({len(_V2)} B)", _proxy_v2),
    (f"visitor suffix: add, encode, decode, read ({len(_SUFFIXED)} B)", _visitor_suffix),
]


# Profile shares ------------------------------------------------------------------------

BUCKETS = [
    ("snocat_proto/", "snocat core (snocat_proto)"),
    ("snocat_anyio/", "snocat adapter (snocat_anyio)"),
    ("aioquic/", "aioquic (Python)"),
    ("anyio/", "anyio"),
    ("asyncio/", "asyncio"),
]


IDLE = "waiting in epoll (idle, excluded)"


def bucket(filename: str, function: str) -> str:
    for needle, label in BUCKETS:
        if needle in filename:
            return label
    if filename == "~":
        if "aioquic" in function or "_crypto" in function or "_buffer" in function:
            return "aioquic C (crypto, buffers)"
        if "poll" in function or "select." in function:
            return IDLE
        if "socket" in function:
            return "socket calls (sendto, recvfrom, send, recv)"
        return "other builtins"
    return "other Python"


def shares(profile: Path) -> dict[str, float]:
    stats = pstats.Stats(str(profile))
    totals: dict[str, float] = defaultdict(float)
    for (filename, _, function), row in stats.stats.items():  # type: ignore[attr-defined]
        totals[bucket(filename, function)] += row[2]  # tottime
    return totals


def profile_transfer(size: int, keep: Path | None = None) -> list[list[object]]:
    target = Target()
    try:
        with scratch_directory() as directory:
            with snocat_pair(directory, target.port, profile=True) as pair:
                transfer(pair.public_port, UPLOAD, 1_000_000)
                seconds = transfer(pair.public_port, UPLOAD, size)
            server, client = shares(directory / "server.prof"), shares(directory / "client.prof")
            if keep is not None:
                for name in ("server.prof", "client.prof"):
                    (directory / name).replace(keep / name)
    finally:
        target.close()
    labels = sorted(set(server) | set(client), key=lambda k: -(server[k] + client[k]))
    labels.remove(IDLE)
    total_s = sum(server.values()) - server[IDLE]
    total_c = sum(client.values()) - client[IDLE]
    rows: list[list[object]] = [
        [label, f"{100 * server[label] / total_s:.1f}", f"{100 * client[label] / total_c:.1f}"]
        for label in labels
    ]
    rows.append(["(transfer under the profiler, MB/s)", f"{size / seconds / 1e6:.1f}", ""])
    return rows


def memory_pair_rows(size: int, repeat: int = 3) -> list[list[object]]:
    """CPU per MB of both ends in one process, no sockets: tunnel vs bare aioquic."""
    raw = sorted(raw_transfer(size) for _ in range(repeat))[repeat // 2]
    ours = sorted(tunnel_transfer(size) for _ in range(repeat))[repeat // 2]
    per_mb = 1000 / (size / 1e6)
    return [
        ["bare aioquic connections", f"{raw * per_mb:.1f}", "1.00"],
        [
            "snocat tunnel (endpoint + TunnelConnection)",
            f"{ours * per_mb:.1f}",
            f"{raw / ours:.2f}",
        ],
    ]


def datagram_rows(count: int, repeat: int = 3) -> list[list[object]]:
    """Datagrams a second through the core pair, and CPU per datagram (both ends),
    against bare aioquic connections moving the same DATAGRAM frames.

    Read the small-payload rows for the core's own cost (most datagrams share a packet,
    so the per-datagram work dominates).  With 1000 B payloads each datagram is a packet
    and the ACK pattern decides: the tunnel's receiver sends far fewer ACK packets than
    bare aioquic's in this loop, which can make the tunnel row the cheaper one."""
    rows: list[list[object]] = []
    for size in (100, 1000):
        for label, run in (
            (f"bare aioquic, {size} B DATAGRAM frames", raw_datagram_transfer),
            (f"snocat tunnel, one flow, {size} B payloads", datagram_transfer),
        ):
            cpu = sorted(run(count, size=size) for _ in range(repeat))[repeat // 2]
            rows.append(
                [
                    label,
                    f"{count / cpu:,.0f}",
                    f"{1e6 * cpu / count:.1f}",
                    f"{count * size / cpu / 1e6:.1f}",
                ]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bytes", type=float, default=50e6)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-codecs", action="store_true")
    parser.add_argument("--keep", type=Path, help="directory to keep the .prof files in")
    args = parser.parse_args()
    if not args.no_codecs:
        rows: list[list[object]] = [[label, f"{ops_per_second(fn):,.0f}"] for label, fn in CODECS]
        print("\n## Core codecs (one process, one core)\n")
        print(table(["operation", "ops/s"], rows))
        rows = memory_pair_rows(20_000_000)
        print("\n## One stream, both ends in memory on a fake clock (20 MB, 1200 B datagrams)\n")
        print(table(["pair", "CPU ms/MB (both ends)", "raw/tunnel CPU"], rows))
        rows = datagram_rows(20_000)
        print("\n## UDP flow datagrams, both ends in memory on a fake clock (20,000 each)\n")
        print(
            table(
                ["flow", "datagrams/s (one core)", "CPU µs/datagram (both ends)", "payload MB/s"],
                rows,
            )
        )
    if not args.no_profile:
        rows = profile_transfer(int(args.bytes), args.keep)
        print(
            f"\n## Where a bulk upload's CPU goes ({args.bytes / 1e6:.0f} MB, cProfile tottime)\n"
        )
        print(table(["part", "server %", "client %"], rows))


if __name__ == "__main__":
    main()
