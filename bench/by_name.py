"""By name against by port: stream-open latency and throughput, one run.

    python -m bench.by_name [--connections 500] [--bytes 50e6]

One ``snocat server`` with ``--domain bench.example --http ...`` and one ``snocat
client`` publishing the same target twice: on a port of its own (``--target``) and by
name (``--http``).  Every visitor, both ways, sends the same HTTP request head first
(the shared listener routes by its ``Host``), so the two paths differ only in what
the aggregator does before the stream opens: read the head and parse it (the peek of
docs/protocol.md 3.14), pick the tunnel, forward the head ahead of the rest.

Latency: TCP connect, the head, and the first byte back (the target writes one on
accept), connections one after another.  Throughput: one upload and one download of
``--bytes``, checksummed, after a 10 MB warm-up upload on the same path.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import socket
import statistics
import threading
import time

from bench.common import (
    DOWNLOAD,
    HEADER,
    HOST,
    UPLOAD,
    free_port,
    mb_per_s,
    pattern_digest,
    receive_hashed,
    scratch_directory,
    send_pattern,
    snocat_pair,
    table,
    wait_for_json_line,
)

DOMAIN = "bench.example"
NAME = "bench"  # the token bench/common.py makes
HEAD = f"GET / HTTP/1.1\r\nHost: {NAME}.{DOMAIN}\r\n\r\n".encode()


class HeadTarget:
    """The benchmark target behind a request head: it reads the head, then acts as
    bench/common.py's ``Target`` (``U``/``D`` transfers), or, with ``greet``, writes
    one byte on accept and reads to the end."""

    def __init__(self, *, greet: bool) -> None:
        self.greet = greet
        self.sock = socket.create_server((HOST, 0), backlog=1024)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.greet:
                conn.sendall(b"!")
                while conn.recv(65536):
                    pass
                return
            data = b""
            while not _head_and_header(data):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            rest = data[data.index(b"\r\n\r\n") + 4 :]
            mode, size = HEADER.unpack(rest[: HEADER.size])
            early = rest[HEADER.size :]
            if mode == UPLOAD:
                digest = hashlib.sha256(early)
                count = len(early)
                while count < size:
                    chunk = conn.recv(min(1 << 18, size - count))
                    if not chunk:
                        return
                    digest.update(chunk)
                    count += len(chunk)
                conn.sendall(digest.digest())
            elif mode == DOWNLOAD:
                send_pattern(conn, size)


def _head_and_header(data: bytes) -> bool:
    end = data.find(b"\r\n\r\n")
    return end >= 0 and len(data) >= end + 4 + HEADER.size


def first_byte(port: int) -> float:
    start = time.perf_counter()
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(HEAD)
        if sock.recv(1) != b"!":
            raise RuntimeError("no greeting from the target")
        return time.perf_counter() - start


def transfer(port: int, mode: bytes, size: int) -> float:
    start = time.perf_counter()
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(HEAD + HEADER.pack(mode, size))
        if mode == UPLOAD:
            send_pattern(sock, size)
            digest = b""
            while len(digest) < 32:
                chunk = sock.recv(32 - len(digest))
                if not chunk:
                    break
                digest += chunk
        else:
            count, digest = receive_hashed(sock)
            if count != size:
                raise RuntimeError(f"received {count} of {size} bytes")
    if digest != pattern_digest(size):
        raise RuntimeError("checksum mismatch")
    return time.perf_counter() - start


def latency_row(label: str, samples: list[float]) -> list[object]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return [label, f"{statistics.median(ordered) * 1e3:.2f}", f"{p99 * 1e3:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--bytes", type=float, default=50e6)
    args = parser.parse_args()
    size = int(args.bytes)
    latencies: dict[str, list[float]] = {}
    rates: dict[str, dict[str, float]] = {}
    for greet in (True, False):
        target = HeadTarget(greet=greet)
        http_port = free_port()
        try:
            with (
                scratch_directory() as directory,
                snocat_pair(
                    directory,
                    target.port,
                    extra_server=("--domain", DOMAIN, "--http", f"{HOST}:{http_port}"),
                    extra_client=("--http", f"{HOST}:{target.port}"),
                ) as pair,
            ):
                wait_for_json_line(directory / "client.log", "port_granted", pair.client)
                for label, port in (("by port", pair.public_port), ("by name", http_port)):
                    if greet:
                        for _ in range(20):  # warm-up
                            first_byte(port)
                        latencies[label] = [first_byte(port) for _ in range(args.connections)]
                    else:
                        # Warm up the tunnel's congestion window first: whichever path
                        # went first would otherwise pay for QUIC's slow start.
                        transfer(port, UPLOAD, min(size, 10_000_000))
                        rates[label] = {
                            "upload": mb_per_s(size, transfer(port, UPLOAD, size)),
                            "download": mb_per_s(size, transfer(port, DOWNLOAD, size)),
                        }
        finally:
            target.close()
    rows: list[list[object]] = []
    for label in ("by port", "by name"):
        rows.append(
            [
                *latency_row(label, latencies[label]),
                f"{rates[label]['upload']:.0f}",
                f"{rates[label]['download']:.0f}",
            ]
        )
    medians = {label: statistics.median(samples) for label, samples in latencies.items()}
    rows.append(
        [
            "by name / by port",
            f"{medians['by name'] / medians['by port']:.2f}",
            "",
            f"{rates['by name']['upload'] / rates['by port']['upload']:.2f}",
            f"{rates['by name']['download'] / rates['by port']['download']:.2f}",
        ]
    )
    print(
        f"\n## By name against by port ({args.connections} sequential opens; "
        f"{size / 1e6:.0f} MB each way, one stream)\n"
    )
    print(table(["path", "open p50 ms", "open p99 ms", "upload MB/s", "download MB/s"], rows))


if __name__ == "__main__":
    main()
