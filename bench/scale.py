"""Scale: N idle authenticated tunnels on one ``snocat server`` process.

    python -m bench.scale [--tunnels 100,1000,10000] [--window 64] [--idle 30]
                          [--keepalive 15] [--idle-timeout 30]

A driver in this process plays N clients with the sans-IO core (one UDP socket,
datagrams routed to tunnels by connection ID, ``--window`` handshakes in flight),
each with its own token.  Reported: tunnels established per second, the server's
CPU time per handshake (Retry, TLS, token authentication), its RSS growth per
tunnel, and its CPU and datagrams while the N tunnels sit idle (keep-alives only) for
``--idle`` s.  The clients ping after ``--keepalive`` s without hearing from the server
(the client default); ``--idle-timeout`` is given to both ends.
The driver shares the machine's two cores with the server, so the rate is a floor.

While idle, a probe asks the server for a version negotiation every 20 ms (a datagram
of an unknown QUIC version, answered at once and statelessly): its round trips show
how long the server's event loop leaves every tunnel waiting (p99 and the longest),
for instance through a full garbage collection.  ``--no-heap-freeze`` runs the server
without its heap policy (``snocat server --no-heap-freeze``) for comparison; the driver,
which holds the client ends of all the tunnels, always freezes its own heap, so its
collections do not delay the probe.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import os
import select
import socket
import subprocess
import time
from pathlib import Path

from bench.common import (
    HOST,
    cpu_seconds,
    free_port,
    free_port_range,
    make_credentials,
    process,
    rss_bytes,
    scratch_directory,
    snocat,
    table,
    wait_for_json_line,
)
from snocat_proto._service.heap import LongLivedHeap
from snocat_proto._service.tokens import parse_tokens
from snocat_proto._wire.auth import ClientCredentials, connect_authenticator
from snocat_proto._wire.certificates import install_trust
from snocat_proto._wire.engine import parse_packet_header, quic_configuration
from snocat_proto._wire.events import AuthenticationCompleted, ConnectionTerminated
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.tunnel import CONNECT_KEEPALIVE_INTERVAL, TunnelConnection

#: A QUIC version no server supports (RFC 9000 section 15: 0x?a?a?a?a is reserved).
UNKNOWN_VERSION = b"\x1a\x2a\x3a\x4a"


class StallProbe:
    """Version negotiation round trips to the server, one every ``interval`` s."""

    def __init__(self, server: tuple[str, int], interval: float = 0.02) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.connect(server)
        self.sock.setblocking(False)
        self.interval = interval
        self.next_at = 0.0
        #: Round trips in flight, by the source connection ID the answer carries back.
        self.sent: dict[bytes, float] = {}
        self.round_trips: list[float] = []

    def wait(self, now: float) -> float:
        return max(0.0, self.next_at - now)

    def send_due(self, now: float) -> None:
        if now < self.next_at:
            return
        self.next_at = now + self.interval
        key = os.urandom(8)
        header = b"\xc0" + UNKNOWN_VERSION + b"\x08" + os.urandom(8) + b"\x08" + key
        with contextlib.suppress(BlockingIOError):
            self.sock.send(header.ljust(1200, b"\x00"))  # an Initial's size gets an answer
            self.sent[key] = now

    def receive(self, now: float) -> None:
        while True:
            try:
                data = self.sock.recv(2048)
            except (BlockingIOError, ConnectionRefusedError):
                return
            # Version negotiation: flags, version 0, then DCID (our key) length and bytes.
            if len(data) >= 14 and data[1:5] == b"\x00\x00\x00\x00" and data[5] == 8:
                sent_at = self.sent.pop(data[6:14], None)
                if sent_at is not None:
                    self.round_trips.append(now - sent_at)

    def take(self, now: float) -> list[float]:
        """Round trips since the last call; one unanswered for 1 s counts as 1 s."""
        lost = [key for key, sent_at in self.sent.items() if now - sent_at > 1.0]
        for key in lost:
            del self.sent[key]
        taken, self.round_trips = self.round_trips + [1.0] * len(lost), []
        return taken


class Driver:
    """Many Connect-side tunnels over one UDP socket."""

    def __init__(
        self,
        server: tuple[str, int],
        authority: bytes,
        tokens: dict[str, bytes],
        *,
        keepalive: float,
        idle_timeout: float,
    ):
        self.server = server
        self.limits = Limits()
        self.keepalive = keepalive
        self.configuration = quic_configuration(
            is_client=True, limits=self.limits, server_name="localhost", idle_timeout=idle_timeout
        )
        install_trust(self.configuration, authority_pem=authority, pinned=None)
        self.tokens = list(tokens.items())
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        self.sock.bind((HOST, 0))
        self.sock.setblocking(False)
        self.by_cid: dict[bytes, TunnelConnection] = {}
        self.timers: list[tuple[float, int, TunnelConnection]] = []
        #: Each tunnel's deadline as last armed; heap entries that differ are stale.
        self.deadlines: dict[TunnelConnection, float | None] = {}
        self.counter = itertools.count()
        self.pending: dict[TunnelConnection, int] = {}
        #: Token indexes whose tunnel closed before authenticating: opened again.
        self.retry: list[int] = []
        self.opened = 0
        self.authenticated: list[TunnelConnection] = []
        self.failed = 0
        #: Datagrams the server received from / sent to the driver.
        self.to_server = 0
        self.from_server = 0
        #: Probing the server's responsiveness, while :meth:`run_for` runs.
        self.probe: StallProbe | None = None

    def open(self, index: int) -> None:
        name, secret = self.tokens[index]
        now = time.monotonic()
        tunnel = TunnelConnection.connect(
            self.configuration,
            address=self.server,
            authenticator=connect_authenticator(
                ClientCredentials.token(name, secret), limits=self.limits
            ),
            limits=self.limits,
            now=now,
            keepalive_interval=self.keepalive,
        )
        self.by_cid[tunnel.host_connection_id] = tunnel
        self.pending[tunnel] = index
        self.after_input(tunnel, now)

    def after_input(self, tunnel: TunnelConnection, now: float) -> None:
        for issued, cid in tunnel.pop_connection_id_changes():
            if issued:
                self.by_cid[cid] = tunnel
            else:
                self.by_cid.pop(cid, None)
        while (event := tunnel.next_event()) is not None:
            if isinstance(event, AuthenticationCompleted):
                self.pending.pop(tunnel, None)
                self.authenticated.append(tunnel)
            elif isinstance(event, ConnectionTerminated):
                index = self.pending.pop(tunnel, None)
                if index is not None:
                    self.failed += 1
                    self.retry.append(index)
        for data, addr in tunnel.datagrams_to_send(now):
            with contextlib.suppress(BlockingIOError):  # lost: QUIC retransmits
                self.sock.sendto(data, addr)
                self.to_server += 1
        timer = tunnel.get_timer()
        if timer != self.deadlines.get(tunnel):
            self.deadlines[tunnel] = timer
            if timer is not None:
                heapq.heappush(self.timers, (timer, next(self.counter), tunnel))

    def step(self, max_wait: float) -> None:
        now = time.monotonic()
        wait = max_wait
        if self.timers:
            wait = max(0.0, min(wait, self.timers[0][0] - now))
        probe = self.probe
        sockets = [self.sock]
        if probe is not None:
            probe.send_due(now)
            wait = min(wait, probe.wait(now))
            sockets.append(probe.sock)
        readable, _, _ = select.select(sockets, [], [], wait)
        now = time.monotonic()
        if probe is not None and probe.sock in readable:
            probe.receive(now)
        touched: dict[TunnelConnection, None] = {}
        if self.sock in readable:
            for _ in range(256):
                try:
                    data, addr = self.sock.recvfrom(65535)
                    self.from_server += 1
                except BlockingIOError:
                    break
                header = parse_packet_header(data, cid_length=8)
                tunnel = None if header is None else self.by_cid.get(header.destination_cid)
                if tunnel is not None:
                    tunnel.receive_datagram(data, addr, now)
                    touched[tunnel] = None
        while self.timers and self.timers[0][0] <= now:
            deadline, _, tunnel = heapq.heappop(self.timers)
            if self.deadlines.get(tunnel) != deadline:
                continue  # stale
            self.deadlines[tunnel] = None  # re-armed by after_input
            current = tunnel.get_timer()
            if current is not None and current <= now:
                tunnel.handle_timer(now)
            touched[tunnel] = None
        for tunnel in touched:
            self.after_input(tunnel, now)

    def establish(self, count: int, window: int, timeout: float) -> float:
        start = time.monotonic()
        target = len(self.authenticated) + count
        while len(self.authenticated) < target:
            while len(self.pending) < window and (
                len(self.authenticated) + len(self.pending) < target
            ):
                if self.retry:
                    self.open(self.retry.pop())
                else:
                    self.open(self.opened)
                    self.opened += 1
            self.step(0.05)
            if time.monotonic() - start > timeout:
                raise TimeoutError(
                    f"{len(self.authenticated)} of {target} tunnels after {timeout} s"
                )
        return time.monotonic() - start

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.step(min(0.05, max(0.0, end - time.monotonic())))


def run(
    directory: Path,
    steps: list[int],
    window: int,
    idle: float,
    *,
    keepalive: float,
    idle_timeout: float,
    heap_freeze: bool,
) -> list[list[object]]:
    creds = make_credentials(directory, [f"t{i}" for i in range(max(steps))])
    quic_port = free_port(socket.SOCK_DGRAM)
    first, last = free_port_range(2)
    args = snocat(
        "server",
        "--cert", str(creds.certificate),
        "--key", str(creds.private_key),
        "--tokens", str(creds.tokens),
        "--quic", f"{HOST}:{quic_port}",
        "--ports", f"{first}:{last}",
        "--max-tunnels", str(max(steps) + 10),
        "--handshake-rate", "0",  # every driver tunnel comes from one address
        "--idle-timeout", str(idle_timeout),
        "--log-level", "warning",
        "--json",
        *(() if heap_freeze else ("--no-heap-freeze",)),
    )  # fmt: skip
    rows: list[list[object]] = []
    log = directory / "server.log"
    with process(args, log=log) as server:
        wait_for_json_line(log, "listening_on", server)
        driver = Driver(
            (HOST, quic_port),
            creds.certificate.read_bytes(),
            parse_tokens(creds.tokens.read_text()),
            keepalive=keepalive,
            idle_timeout=idle_timeout,
        )
        time.sleep(0.5)
        base_rss = rss_bytes(server.pid)
        previous = 0
        for step in steps:
            cpu_before = cpu_seconds(server.pid)
            seconds = driver.establish(step - previous, window, timeout=max(120, step / 10))
            handshake_cpu = (cpu_seconds(server.pid) - cpu_before) / (step - previous)
            driver.run_for(1.0)  # let the last tunnels settle
            rss = rss_bytes(server.pid)
            cpu_before = cpu_seconds(server.pid)
            datagrams_before = driver.to_server + driver.from_server
            driver.probe = StallProbe((HOST, quic_port))
            driver.run_for(idle)
            idle_cpu = (cpu_seconds(server.pid) - cpu_before) / idle
            datagrams = driver.to_server + driver.from_server - datagrams_before
            stalls = sorted(driver.probe.take(time.monotonic()))
            driver.probe.sock.close()
            driver.probe = None
            _check_alive(server)
            rows.append([
                step,
                f"{(step - previous) / seconds:.0f}",
                driver.failed,
                f"{handshake_cpu * 1e3:.1f}",
                f"{rss / 1e6:.0f}",
                f"{(rss - base_rss) / step / 1e3:.1f}",
                f"{datagrams / idle:.0f}",
                f"{idle_cpu * 100:.1f}",
                f"{stalls[int(len(stalls) * 0.99)] * 1e3:.1f}",
                f"{stalls[-1] * 1e3:.0f}",
            ])  # fmt: skip
            previous = step
            print(rows[-1], flush=True)
    return rows


def _check_alive(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"server exited with {proc.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tunnels", default="100,1000,10000")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds idle per step")
    parser.add_argument("--keepalive", type=float, default=CONNECT_KEEPALIVE_INTERVAL)
    parser.add_argument("--idle-timeout", type=float, default=30.0)
    parser.add_argument(
        "--no-heap-freeze",
        dest="heap_freeze",
        action="store_false",
        help="run the server with --no-heap-freeze",
    )
    args = parser.parse_args()
    steps = sorted(int(n) for n in args.tunnels.split(","))
    LongLivedHeap().install()  # the driver's own collections would delay the probe
    with scratch_directory() as directory:
        rows = run(
            directory,
            steps,
            args.window,
            args.idle,
            keepalive=args.keepalive,
            idle_timeout=args.idle_timeout,
            heap_freeze=args.heap_freeze,
        )
    print(
        f"\n## Idle authenticated tunnels on one server process "
        f"(client keep-alive {args.keepalive:g} s, idle timeout {args.idle_timeout:g} s"
        f"{'' if args.heap_freeze else ', --no-heap-freeze'})\n"
    )
    print(
        table(
            [
                "tunnels",
                "new tunnels/s",
                "retried",
                "server CPU ms/handshake",
                "server RSS MB",
                "RSS kB/tunnel",
                "idle datagrams/s",
                "idle server CPU %",
                "idle stall p99 ms",
                "idle stall max ms",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
