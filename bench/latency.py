"""Stream-open latency: TCP connect at the public port -> first byte back from the target.

    python -m bench.latency [--connections 1000]

The target writes one byte as soon as it accepts.  Through snocat that costs the
accept, a new QUIC stream with its NYAN exchange, the client's connect to the target
and the byte's way back; connections are made one after another.  Direct TCP and the
other forwarders are measured the same way for reference.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import time

from bench.common import HOST, Target, scratch_directory, snocat_pair, table
from bench.throughput import SBIN, asyncssh_forward, has_module, socat_forward, ssh_forward


def first_byte_latency(port: int) -> float:
    start = time.perf_counter()
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock.recv(1) != b"!":
            raise RuntimeError("no greeting from the target")
        elapsed = time.perf_counter() - start
    return elapsed


def measure(port: int, count: int) -> list[float]:
    for _ in range(min(20, count)):  # warm-up
        first_byte_latency(port)
    return [first_byte_latency(port) for _ in range(count)]


def row(label: str, samples: list[float]) -> list[object]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return [
        label,
        f"{statistics.median(ordered) * 1e3:.2f}",
        f"{p99 * 1e3:.2f}",
        f"{ordered[-1] * 1e3:.2f}",
        f"{len(ordered) / sum(ordered):.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--skip-others", action="store_true")
    args = parser.parse_args()
    target = Target(greet=True)
    rows = []
    try:
        rows.append(row("direct TCP to the target", measure(target.port, args.connections)))
        with scratch_directory() as directory, snocat_pair(directory, target.port) as pair:
            rows.append(row("snocat tunnel", measure(pair.public_port, args.connections)))
        if not args.skip_others:
            tools = [
                ("socat", shutil.which("socat"), socat_forward),
                ("ssh -L", shutil.which("sshd", path=SBIN), ssh_forward),
                ("asyncssh", has_module("asyncssh"), asyncssh_forward),
            ]
            for label, available, forward in tools:
                if available:
                    with scratch_directory() as directory, forward(directory, target.port) as port:
                        rows.append(row(label, measure(port, args.connections)))
    finally:
        target.close()
    print(f"\n## Stream-open latency, {args.connections} sequential connections (ms)\n")
    print(table(["path", "p50", "p99", "max", "connections/s"], rows))


if __name__ == "__main__":
    main()
