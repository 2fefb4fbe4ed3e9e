"""What the fleet tests share: nodes as real ``snocat server --registry`` processes.

Each node runs on its own loopback address (127.0.0.2, 127.0.0.3, ...), so all bind
the same QUIC and public port numbers; a real valkey-server (``store`` fixture) is
the registry.  Fetches go to a node's address and are checked by SHA-256.
"""

from __future__ import annotations

import contextlib
import http.client
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cli_harness import TOKEN, Lab, Snocat, fetch_digest, free_port_range
from store_harness import Store

from bench.common import free_udp_port_on

#: Short leases, so the fault tests see a lease run out in seconds.
LEASE = 3.0


def node_host(index: int) -> str:
    """The loopback address of node ``index`` (from 0): 127.0.0.2, 127.0.0.3, ..."""
    return f"127.0.0.{index + 2}"


@dataclass
class Fleet:
    """The shared parts of a fleet: its store, identity, tokens and port numbers."""

    lab: Lab
    store: Store
    quic_port: int
    ports: tuple[int, int]
    certificate: Path
    key: Path
    tokens: Path
    client_token: Path
    fleet_token: Path

    def start_node(
        self, index: int, *extra: str, lease: float = LEASE, registry: str | None = None
    ) -> Snocat:
        host = node_host(index)
        process = self.lab.start(
            "server",
            "--cert",
            str(self.certificate),
            "--key",
            str(self.key),
            "--quic",
            f"{host}:{self.quic_port}",
            "--tcp",
            host,
            "--ports",
            f"{self.ports[0]}:{self.ports[1]}",
            "--tokens",
            str(self.tokens),
            "--idle-timeout",
            "5",
            "--registry",
            registry or self.store.url,
            "--fleet-token-file",
            str(self.fleet_token),
            "--node",
            f"node-{index}",
            "--fleet-lease",
            str(lease),
            "--json",
            *extra,
        )
        process.wait_event("listening_on")
        return process

    def driver(self, index: int) -> str:
        return f"{node_host(index)}:{self.quic_port}"

    def start_client(
        self,
        target_port: int,
        *drivers: int,
        token: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> Snocat:
        args = ["client"]
        for index in drivers:
            args += ["--driver", self.driver(index)]
        return self.lab.start(
            *args,
            "--san",
            "localhost",
            "--authority",
            str(self.certificate),
            "--token-file",
            str(token or self.client_token),
            "--target",
            f"127.0.0.1:{target_port}",
            "--backoff-max",
            "1",
            "--idle-timeout",
            "5",
            *extra,
        )


def make_fleet(lab: Lab, store: Store) -> Fleet:
    certificate, key = lab.certificate("server", "localhost")
    tokens = lab.tokens("tokens", f"{TOKEN}\nbeta b3ta-b3ta-b3ta-b3ta-2\n")
    client_token = lab.tokens("alpha.token", TOKEN + "\n")
    fleet_token = lab.tokens("fleet.token", secrets.token_urlsafe(32) + "\n")
    fleet_token.chmod(0o600)
    hosts = [node_host(i) for i in range(4)]
    return Fleet(
        lab=lab,
        store=store,
        quic_port=free_udp_port_on(hosts),
        ports=free_port_range(4),
        certificate=certificate,
        key=key,
        tokens=tokens,
        client_token=client_token,
        fleet_token=fleet_token,
    )


def fetch(host: str, port: int, name: str, timeout: float = 30.0) -> str:
    """GET ``/name`` from ``host:port``; the SHA-256 of the body."""
    return fetch_digest(port, name, timeout, host=host)


def fetch_until(host: str, port: int, name: str, digest: str, timeout: float) -> float:
    """Fetch until a good copy arrives; returns the seconds it took."""
    start = time.monotonic()
    last: BaseException | None = None
    while time.monotonic() - start < timeout:
        try:
            if fetch(host, port, name, timeout=5) == digest:
                return time.monotonic() - start
        except (OSError, AssertionError, http.client.HTTPException) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"no good fetch of {name} from {host}:{port} in {timeout} s: {last!r}")


class StoreProxy:
    """A TCP relay in front of the store for one node, which a test can cut: every
    connection through it is dropped, and new ones refused, until it is restored."""

    def __init__(self, store_port: int) -> None:
        self.store_port = store_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self.cut_off = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                visitor, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_off:
                visitor.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.store_port))
            except OSError:
                visitor.close()
                continue
            with self._lock:
                self._open += [visitor, upstream]
            for source, sink in ((visitor, upstream), (upstream, visitor)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.cut_off = True
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def restore(self) -> None:
        self.cut_off = False

    def close(self) -> None:
        self.cut()
        self.listener.close()
