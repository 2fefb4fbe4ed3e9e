#!/usr/bin/env python3
"""Health check for ``snocat server`` (the container image's HEALTHCHECK).

Sends the aggregator's UDP port one datagram shaped like a QUIC Initial of a version
no one speaks (0x?a?a?a?a, reserved for exactly this by RFC 9000 section 15); a live
aggregator answers with a Version Negotiation packet.  That answer comes from the
server's own receive loop, so it proves more than a bound socket: the process reads
and answers datagrams.  It is stateless on the server's side: no tunnel is created,
nothing is logged, and no handshake-rate budget is spent.

Usage: ``healthcheck.py [HOST:PORT] [--timeout S]``; the address defaults to
``$SNOCAT_HEALTHCHECK_ADDRESS``, else ``127.0.0.1:9090`` (the image's ``--quic``).
Exit status 0 when the answer came, 1 otherwise, as HEALTHCHECK expects.  Standard
library only: the image has no other tools.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys

DEFAULT_ADDRESS = "127.0.0.1:9090"
#: A reserved version (RFC 9000 section 15): never supported, always negotiated.
PROBE_VERSION = 0x1A2A3A4A
#: The server answers only datagrams as large as the smallest QUIC Initial
#: (RFC 9000 section 14.1): no amplification.
PROBE_SIZE = 1200


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def probe_packet(dcid: bytes, scid: bytes) -> bytes:
    """A long-header packet of PROBE_SIZE bytes for PROBE_VERSION (junk payload)."""
    head = bytes([0xC0]) + PROBE_VERSION.to_bytes(4, "big")
    head += bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
    head += b"\x00"  # token length
    rest = PROBE_SIZE - len(head) - 2
    return head + (0x4000 | rest).to_bytes(2, "big") + bytes(rest)


def is_version_negotiation(reply: bytes, dcid: bytes, scid: bytes) -> bool:
    """A Version Negotiation packet (version 0) addressed back to this probe."""
    if len(reply) < 7 or not reply[0] & 0x80 or reply[1:5] != bytes(4):
        return False
    at = 5
    echoed_dcid = reply[at + 1 : at + 1 + reply[at]]
    at += 1 + reply[at]
    if at >= len(reply):
        return False
    echoed_scid = reply[at + 1 : at + 1 + reply[at]]
    return echoed_dcid == scid and echoed_scid == dcid


def check(address: tuple[str, int], timeout: float) -> str | None:
    """None when the aggregator answered, else why not."""
    dcid, scid = secrets.token_bytes(8), secrets.token_bytes(8)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            address[0], address[1], type=socket.SOCK_DGRAM
        )[0]
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            sock.send(probe_packet(dcid, scid))
            while True:
                if is_version_negotiation(sock.recv(65535), dcid, scid):
                    return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as exc:
        return exc.strerror or str(exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "address",
        nargs="?",
        default=os.environ.get("SNOCAT_HEALTHCHECK_ADDRESS") or DEFAULT_ADDRESS,
        help=f"the aggregator's QUIC address [default: {DEFAULT_ADDRESS}]",
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
    try:
        args = parser.parse_args(argv)
        address = parse_address(args.address)
    except SystemExit as exc:  # argparse's usage errors (2) and --help (0)
        # 2 is reserved by Docker's HEALTHCHECK: any failure here is 1.
        return 1 if exc.code else 0
    except ValueError as exc:
        print(f"healthcheck.py: {exc}", file=sys.stderr)
        return 1
    problem = check(address, args.timeout)
    if problem is not None:
        print(f"snocat server at {args.address} is not answering: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
