"""What the tests of reaching tunnels by name share: targets and visitors on real sockets.

Every helper here is blocking and thread-based, so the same ones serve the asyncio,
trio and blocking bindings' tests (an anyio test runs them in a worker thread) and the
CLI's.  The targets behind a client: an HTTP/1.1 server (keep-alive) with a 4 MiB
file, a TLS server that holds the certificate of ``office-1.tunnels.example.com``, and
a raw TCP server that reads a PROXY protocol header with the core's parser and says
whom it saw.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import http.server
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from snocat_proto._wire.certificates import generate_self_signed
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.peek import NeedMore
from snocat_proto._wire.proxy_protocol import ProxyHeaderParser

HOST = "127.0.0.1"
DOMAIN = "tunnels.example.com"
NAME = "office-1"
FQDN = f"{NAME}.{DOMAIN}"
BIG = 4 * 1024 * 1024
#: Bound on any one blocking step of a visitor.
TIMEOUT = 20.0


# An HTTP/1.1 target ------------------------------------------------------------------


@dataclass
class Website:
    """A threaded HTTP/1.1 server: ``/big`` (4 MiB, ``digest``), ``/who`` (which server
    answered: ``label``), anything else ``hello``; it counts its connections."""

    port: int
    label: str
    digest: str
    connections: list[tuple[str, int]] = field(default_factory=list)


def start_website(label: str = "web") -> tuple[Website, http.server.ThreadingHTTPServer]:
    big = os.urandom(BIG)
    website = Website(0, label, hashlib.sha256(big).hexdigest())

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def setup(self) -> None:
            super().setup()
            website.connections.append(self.client_address[:2])

        def do_GET(self) -> None:
            body = {"/big": big, "/who": label.encode()}.get(self.path, b"hello\n")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    server = Server((HOST, 0), Handler)
    website.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return website, server


@contextlib.contextmanager
def website(label: str = "web") -> Iterator[Website]:
    site, server = start_website(label)
    try:
        yield site
    finally:
        server.shutdown()
        server.server_close()


def get(port: int, path: str = "/", host: str = FQDN) -> tuple[int, bytes]:
    """One GET through ``port`` with ``Host: host``: status and body."""
    connection = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        connection.request("GET", path, headers={"Host": f"{host}:{port}"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def raw_exchange(port: int, *chunks: bytes, pause: float = 0.05) -> bytes:
    """Send ``chunks`` as separate packets (a pause between them), then read to the end."""
    import time

    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for chunk in chunks:
            sock.sendall(chunk)
            time.sleep(pause)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


# A TLS target ---------------------------------------------------------------------------


@dataclass
class TlsTarget:
    """A TLS server with a certificate for ``FQDN`` (``certificate`` is its PEM, which
    a visitor trusts): it reads until the visitor half-closes, answers the SHA-256."""

    port: int
    certificate: Path


def start_tls_target(directory: Path) -> tuple[TlsTarget, socket.socket]:
    now = datetime.datetime.now(datetime.UTC)
    certificate_pem, key_pem = generate_self_signed([FQDN], now=now)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "target.pub.pem", directory / "target.priv.pem"
    cert.write_bytes(certificate_pem)
    key.write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server((HOST, 0))

    def serve(conn: socket.socket) -> None:
        with (
            contextlib.suppress(OSError, ssl.SSLError),
            context.wrap_socket(conn, server_side=True) as tls,
        ):
            digest = hashlib.sha256()
            while chunk := tls.recv(65536):
                if chunk.endswith(b"END"):
                    digest.update(chunk[:-3])
                    break
                digest.update(chunk)
            tls.sendall(digest.hexdigest().encode())

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return TlsTarget(listener.getsockname()[1], cert), listener


def tls_digest(
    port: int, trust: Path, data: bytes, *, server_name: str | None = FQDN, split: int = 0
) -> str:
    """A TLS client (verifying the target's certificate for ``server_name``) through
    ``port``: sends ``data`` then ``END``, returns the digest the target answered.
    ``split``: the ClientHello leaves in pieces of that many bytes, a pause between."""
    import time

    context = ssl.create_default_context(cafile=str(trust))
    if server_name is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = True
        while True:
            try:
                tls.do_handshake()
                handshaken = True
            except ssl.SSLWantReadError:
                handshaken = False
            pending = outgoing.read()
            if first and split:
                for offset in range(0, len(pending), split):
                    sock.sendall(pending[offset : offset + split])
                    time.sleep(0.05)
            elif pending:
                sock.sendall(pending)
            first = False
            if handshaken:
                break
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the connection ended during the handshake")
            incoming.write(chunk)
        for offset in range(0, len(data), 65536):
            tls.write(data[offset : offset + 65536])
            sock.sendall(outgoing.read())
        tls.write(b"END")
        sock.sendall(outgoing.read())
        answer = b""
        while len(answer) < 64:
            try:
                answer += tls.read(64 - len(answer))
            except ssl.SSLWantReadError:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                incoming.write(chunk)
        return answer.decode()


# A target that reads the PROXY protocol header --------------------------------------------


@dataclass
class ProxyTarget:
    """A TCP server that reads a PROXY protocol header (the core's parser) and, once
    the visitor half-closed, answers ``SOURCE SOURCE_PORT DESTINATION DESTINATION_PORT``
    (``UNKNOWN`` without addresses) and a newline, then everything after the header."""

    port: int
    seen: list[str] = field(default_factory=list)


def start_proxy_target() -> tuple[ProxyTarget, socket.socket]:
    listener = socket.create_server((HOST, 0))
    target = ProxyTarget(listener.getsockname()[1])

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            parser = ProxyHeaderParser(limits=Limits())
            data = b""
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    target.seen.append("no header")
                    return
                data += chunk
                result = parser.feed(chunk)
                if not isinstance(result, NeedMore):
                    break
            addresses = result.addresses
            if addresses is None:
                line = "UNKNOWN"
            else:
                line = (
                    f"{addresses.source} {addresses.source_port} "
                    f"{addresses.destination} {addresses.destination_port}"
                )
            target.seen.append(line)
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(line.encode() + b"\n" + data[result.size :])
            conn.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return target, listener
