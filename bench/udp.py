"""UDP datagrams through the tunnel (``udp-datagrams``) vs straight to the target.

    python -m bench.udp [--datagrams 20000] [--pings 2000] [--size 512] [--window 32]

A real ``snocat server --udp-ports`` and ``snocat client --udp-target`` (processes),
and a UDP echo target (a process of its own).  Two measurements, each direct to the
target and through the tunnel's public UDP port:

* round trip: ``--pings`` datagrams of 64 bytes, one at a time (p50, p99);
* rate: ``--datagrams`` datagrams of ``--size`` bytes with at most ``--window`` in
  flight, echoed back: datagrams per second that came back, and what was lost (the
  tunnel holds each direction to ``Limits.udp_datagrams_per_second``, 10,000).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    HOST,
    PYTHON,
    free_port,
    free_port_range,
    make_credentials,
    process,
    scratch_directory,
    snocat,
    table,
    wait_for_json_line,
)

ECHO = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
while True:
    data, addr = sock.recvfrom(65535)
    sock.sendto(data, addr)
"""


@contextlib.contextmanager
def echo_target() -> Iterator[int]:
    proc = subprocess.Popen([PYTHON, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(10)


def _udp_grant(log: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wait_for_json_line(log, "port_granted", proc, timeout)
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    record: dict[str, Any] = json.loads(line)
                    if record.get("event") == "port_granted" and record.get("protocol") == "udp":
                        return int(record["port"])
        time.sleep(0.05)
    raise TimeoutError(f"no UDP grant in {log}")


@contextlib.contextmanager
def udp_tunnel(directory: Path, target_port: int) -> Iterator[int]:
    """A real server and client publishing the UDP ``target_port``: its public port."""
    creds = make_credentials(directory)
    quic_port = free_port(socket.SOCK_DGRAM)
    tcp_first, tcp_last = free_port_range(2)
    udp_first, udp_last = free_port_range(2)
    server_args = snocat(
        "server",
        "--cert", str(creds.certificate),
        "--key", str(creds.private_key),
        "--tokens", str(creds.tokens),
        "--quic", f"{HOST}:{quic_port}",
        "--ports", f"{tcp_first}:{tcp_last}",
        "--udp-ports", f"{udp_first}:{udp_last}",
        "--log-level", "warning",
        "--json",
    )  # fmt: skip
    client_args = snocat(
        "client",
        "--driver", f"{HOST}:{quic_port}",
        "--san", "localhost",
        "--authority", str(creds.certificate),
        "--token-file", str(creds.client_token),
        "--udp-target", f"{HOST}:{target_port}",
        "--log-level", "warning",
        "--json",
    )  # fmt: skip
    with process(server_args, log=directory / "server.log") as server:
        wait_for_json_line(directory / "server.log", "listening_on", server)
        with process(client_args, log=directory / "client.log") as client:
            yield _udp_grant(directory / "client.log", client)


def _visitor(port: int, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect((HOST, port))
    sock.settimeout(timeout)
    return sock


def round_trips(port: int, count: int) -> tuple[list[float], int]:
    """``count`` pings one at a time: the round trips of those answered, and how many
    were lost (no answer within a second)."""
    samples: list[float] = []
    lost = 0
    with _visitor(port, 1.0) as sock:
        for seq in range(count + 50):
            data = seq.to_bytes(4, "big") * 16
            start = time.perf_counter()
            sock.send(data)
            try:
                while sock.recv(65535) != data:
                    pass
            except TimeoutError:
                lost += seq >= 50
                continue
            if seq >= 50:  # the first ones warm up (and open the flow)
                samples.append(time.perf_counter() - start)
    return samples, lost


def rate(port: int, count: int, size: int, window: int) -> tuple[float, int]:
    """Datagrams per second that came back with at most ``window`` in flight (one lost
    frees its place after 0.2 s), and how many were lost."""
    payload = b"\x5a" * max(0, size - 4)
    received = 0
    with _visitor(port, 0.2) as sock:
        sock.send(b"warm" + payload)  # opens the flow
        with contextlib.suppress(TimeoutError):
            sock.recv(65535)
        start = time.perf_counter()
        sent = 0
        in_flight = 0
        while sent < count or in_flight:
            while sent < count and in_flight < window:
                sock.send(sent.to_bytes(4, "big") + payload)
                sent += 1
                in_flight += 1
            try:
                sock.recv(65535)
                received += 1
                in_flight -= 1
            except TimeoutError:
                in_flight = 0  # the rest of the window was lost
        elapsed = time.perf_counter() - start
    return received / elapsed, count - received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datagrams", type=int, default=20_000)
    parser.add_argument("--pings", type=int, default=2_000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--window", type=int, default=32)
    args = parser.parse_args()
    results: dict[str, tuple[list[float], int, float, int]] = {}
    with echo_target() as target_port:
        direct = round_trips(target_port, args.pings)
        results["direct to the target"] = (
            *direct,
            *rate(target_port, args.datagrams, args.size, args.window),
        )
        with scratch_directory() as directory, udp_tunnel(directory, target_port) as port:
            tunnel = round_trips(port, args.pings)
            results["snocat tunnel"] = (
                *tunnel,
                *rate(port, args.datagrams, args.size, args.window),
            )
    rows = []
    base_p50 = statistics.median(results["direct to the target"][0])
    base_rate = results["direct to the target"][2]
    for label, (samples, ping_lost, per_second, lost) in results.items():
        ordered = sorted(samples)
        p50 = statistics.median(ordered)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        rows.append(
            [
                label,
                f"{p50 * 1e3:.3f}",
                f"{p99 * 1e3:.3f}",
                f"{p50 / base_p50:.1f}x",
                ping_lost,
                f"{per_second:,.0f}",
                f"{per_second / base_rate:.2f}",
                lost,
            ]
        )
    print(
        f"\n## UDP datagrams: {args.pings} pings of 64 B; {args.datagrams} datagrams of "
        f"{args.size} B, {args.window} in flight, echoed (python {sys.version.split()[0]})\n"
    )
    print(
        table(
            [
                "path",
                "RTT p50 (ms)",
                "RTT p99 (ms)",
                "RTT vs direct",
                "pings lost",
                "echoed datagrams/s",
                "rate vs direct",
                "lost",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
