"""What every benchmark shares: credentials, processes, a checksumming TCP target.

Nothing here is part of the test suite.  Processes are started with :mod:`subprocess`
and stopped through their own handles; every socket is on loopback.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import random
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snocat_proto._wire.certificates import generate_self_signed

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
#: The bytes every source sends, repeated: random, so nothing compresses or dedups it.
PATTERN = random.Random(7).randbytes(1 << 20)
HEADER = struct.Struct("!cQ")
UPLOAD, DOWNLOAD = b"U", b"D"
MB = 1_000_000


def pattern_digest(size: int) -> bytes:
    """SHA-256 of the first ``size`` bytes of the repeated pattern."""
    digest = hashlib.sha256()
    full, rest = divmod(size, len(PATTERN))
    for _ in range(full):
        digest.update(PATTERN)
    digest.update(PATTERN[:rest])
    return digest.digest()


def send_pattern(sock: socket.socket, size: int) -> None:
    view = memoryview(PATTERN)
    while size > 0:
        chunk = view[: min(size, len(PATTERN))]
        sock.sendall(chunk)
        size -= len(chunk)


def receive_hashed(sock: socket.socket, size: int | None = None) -> tuple[int, bytes]:
    """Read until EOF (or ``size`` bytes): ``(count, sha256)``."""
    digest = hashlib.sha256()
    buffer = bytearray(1 << 18)
    view = memoryview(buffer)
    count = 0
    while size is None or count < size:
        want = len(buffer) if size is None else min(len(buffer), size - count)
        n = sock.recv_into(view, want)
        if n == 0:
            break
        digest.update(view[:n])
        count += n
    return count, digest.digest()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def free_port_range(count: int) -> tuple[int, int]:
    """``count`` consecutive TCP ports that are free now."""
    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(20000, 60000 - count)
        sockets: list[socket.socket] = []
        try:
            for port in range(start, start + count):
                probe = socket.socket()
                sockets.append(probe)
                probe.bind((HOST, port))
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
        return start, start + count - 1
    raise RuntimeError("no free port range")


def free_udp_port_on(hosts: Sequence[str]) -> int:
    """A UDP port free on every one of ``hosts`` (the nodes of a fleet on 127.0.0.2, ...)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no UDP port free on every address")


def wait_connectable(port: int, timeout: float = 20.0, *, host: str = HOST) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# Process accounting (Linux /proc) ------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, threads included."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# The checksumming target -----------------------------------------------------------


class Target:
    """A TCP service on loopback: each connection sends ``HEADER`` (mode, size).

    ``U``: the target reads ``size`` bytes and answers their SHA-256.
    ``D``: the target sends ``size`` pattern bytes and closes.
    With ``greet`` set it instead writes one byte at once on accept and reads to EOF
    (the stream-open latency benchmark).  One thread per connection: the target
    must cost as little CPU as possible, and blocking sockets do.
    """

    def __init__(self, *, greet: bool = False) -> None:
        self.greet = greet
        self.sock = socket.create_server((HOST, 0), backlog=1024)
        self.port = int(self.sock.getsockname()[1])
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.greet:
                    conn.sendall(b"!")
                    while conn.recv(65536):
                        pass
                    return
                header = _read_exactly(conn, HEADER.size)
                mode, size = HEADER.unpack(header)
                if mode == UPLOAD:
                    _, digest = receive_hashed(conn, size)
                    conn.sendall(digest)
                elif mode == DOWNLOAD:
                    send_pattern(conn, size)
        except OSError as exc:
            self.errors.append(exc)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed early")
        data += chunk
    return bytes(data)


def transfer(port: int, mode: bytes, size: int, *, host: str = HOST) -> float:
    """One checked transfer through ``host:port`` to a :class:`Target`; its seconds."""
    start = time.perf_counter()
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(HEADER.pack(mode, size))
        if mode == UPLOAD:
            send_pattern(sock, size)
            digest = _read_exactly(sock, 32)
        else:
            count, digest = receive_hashed(sock)
            if count != size:
                raise RuntimeError(f"received {count} of {size} bytes")
    if digest != pattern_digest(size):
        raise RuntimeError("checksum mismatch")
    return time.perf_counter() - start


class UploadSink:
    """A TCP service on loopback for many uploads at once: each connection sends
    ``HEADER`` (``U``, size) and ``size`` bytes, and gets their SHA-256 back.

    One thread serves every connection through a selector: with 64 connections,
    :class:`Target` 's thread per connection (and a thread per sender, as this
    harness had) spent about three times one connection's harness CPU per MB on
    switching threads, on the same two cores the tunnel runs on."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0), backlog=1024)
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self.errors: list[BaseException] = []
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.sock, selectors.EVENT_READ, None)
        self._waker, self._wake = socket.socketpair()
        self._selector.register(self._waker, selectors.EVENT_READ, False)
        self._buffer = memoryview(bytearray(1 << 18))
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._wake.send(b"x")
        self._thread.join(5)
        self._selector.close()
        for sock in (self.sock, self._waker, self._wake):
            sock.close()

    def _loop(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.data is False:
                    return
                if key.data is None:
                    self._accept()
                else:
                    self._read(key.fileobj, key.data)  # type: ignore[arg-type]

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                conn, _ = self.sock.accept()
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._selector.register(conn, selectors.EVENT_READ, _Upload())

    def _read(self, conn: socket.socket, upload: _Upload) -> None:
        try:
            n = conn.recv_into(self._buffer)
        except BlockingIOError:
            return
        except OSError as exc:
            n, upload.failed = 0, exc
        data = self._buffer[:n]
        if upload.size is None and n:
            upload.head += data
            if len(upload.head) < HEADER.size:
                return
            mode, upload.size = HEADER.unpack(upload.head[: HEADER.size])
            data = memoryview(bytes(upload.head[HEADER.size :]))
            if mode != UPLOAD:
                upload.failed = ValueError(f"UploadSink takes uploads only, not {mode!r}")
        upload.digest.update(data)
        upload.count += len(data)
        if n and upload.failed is None and upload.count < (upload.size or 1):
            return
        self._selector.unregister(conn)
        with conn:
            if upload.failed is not None or upload.count != upload.size:
                self.errors.append(upload.failed or ConnectionError("closed early"))
                return
            conn.setblocking(True)  # 32 bytes into an empty send buffer: never waits
            conn.sendall(upload.digest.digest())


@dataclass
class _Upload:
    head: bytearray = field(default_factory=bytearray)
    size: int | None = None
    count: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    failed: BaseException | None = None


def parallel_uploads(port: int, size: int, connections: int) -> float:
    """``connections`` uploads of ``size`` bytes each at once, to an
    :class:`UploadSink` through ``port``, all from this thread; wall seconds.
    Every digest the sink answers is checked."""
    expected = pattern_digest(size)
    pattern = memoryview(PATTERN)
    selector = selectors.DefaultSelector()
    socks = []
    try:
        for _ in range(connections):
            sock = socket.create_connection((HOST, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
        start = time.perf_counter()
        for sock in socks:
            sock.sendall(HEADER.pack(UPLOAD, size))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_WRITE, [size, b""])
        pending = connections
        while pending:
            events = selector.select(60)
            if not events:
                raise RuntimeError(f"no progress for 60 s, {pending} uploads unfinished")
            for key, _ in events:
                conn, state = key.fileobj, key.data
                assert isinstance(conn, socket.socket)
                if state[0]:
                    offset = (size - state[0]) % len(PATTERN)
                    with contextlib.suppress(BlockingIOError):
                        state[0] -= conn.send(pattern[offset : offset + state[0]])
                    if not state[0]:
                        selector.modify(conn, selectors.EVENT_READ, state)
                    continue
                chunk = conn.recv(32 - len(state[1]))
                if not chunk:
                    raise RuntimeError("the target closed before answering")
                state[1] += chunk
                if len(state[1]) == 32:
                    if state[1] != expected:
                        raise RuntimeError("checksum mismatch")
                    selector.unregister(conn)
                    pending -= 1
        return time.perf_counter() - start
    finally:
        selector.close()
        for sock in socks:
            sock.close()


# Credentials -----------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    directory: Path
    certificate: Path
    private_key: Path
    tokens: Path
    client_token: Path


def make_credentials(directory: Path, names: Sequence[str] = ("bench",)) -> Credentials:
    certificate_pem, key_pem = generate_self_signed(
        ["localhost", HOST], now=datetime.datetime.now(datetime.UTC)
    )
    creds = Credentials(
        directory=directory,
        certificate=directory / "server.pub.pem",
        private_key=directory / "server.priv.pem",
        tokens=directory / "tokens",
        client_token=directory / "client.token",
    )
    creds.certificate.write_bytes(certificate_pem)
    creds.private_key.write_bytes(key_pem)
    lines = "".join(f"{name} bench-secret-{name}-0123456789\n" for name in names)
    creds.tokens.write_text(lines)
    creds.client_token.write_text(lines.splitlines()[0] + "\n")
    return creds


@contextlib.contextmanager
def scratch_directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="snocat-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Processes -------------------------------------------------------------------------


@contextlib.contextmanager
def process(args: Sequence[str], *, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process writing to ``log``; terminated (then killed) on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def snocat(*args: str) -> list[str]:
    """The ``snocat`` command line; a leading ``--profile OUT`` runs it under cProfile."""
    if args and args[0] == "--profile":
        return [PYTHON, "-m", "bench.profiled", args[1], *args[2:]]
    return [PYTHON, "-m", "snocat_anyio", *args]


def wait_for_json_line(
    log: Path, event: str, proc: subprocess.Popen[bytes], timeout: float = 30
) -> dict[str, Any]:
    """The first JSON line of ``log`` whose ``event`` is ``event``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}): {log.read_text()[-2000:]}")
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    record: dict[str, Any] = json.loads(line)
                    if record.get("event") == event:
                        return record
        time.sleep(0.05)
    raise TimeoutError(f"no {event} in {log}: {log.read_text()[-2000:]}")


@dataclass
class SnocatPair:
    server: subprocess.Popen[bytes]
    client: subprocess.Popen[bytes]
    public_port: int


@contextlib.contextmanager
def snocat_pair(
    directory: Path,
    target_port: int,
    *,
    max_datagram_size: int | None = None,
    extra_server: Sequence[str] = (),
    extra_client: Sequence[str] = (),
    profile: bool = False,
) -> Iterator[SnocatPair]:
    """A real ``snocat server`` and ``snocat client`` publishing ``target_port``.

    With ``profile`` both run under cProfile, writing ``server.prof`` and
    ``client.prof`` into ``directory`` when they stop."""
    creds = make_credentials(directory)
    quic_port = free_port(socket.SOCK_DGRAM)
    first, last = free_port_range(4)
    size = [] if max_datagram_size is None else ["--max-datagram-size", str(max_datagram_size)]
    server_args = snocat(
        *(("--profile", str(directory / "server.prof")) if profile else ()),
        "server",
        "--cert", str(creds.certificate),
        "--key", str(creds.private_key),
        "--tokens", str(creds.tokens),
        "--quic", f"{HOST}:{quic_port}",
        "--ports", f"{first}:{last}",
        "--log-level", "warning",
        "--json",
        *size,
        *extra_server,
    )  # fmt: skip
    client_args = snocat(
        *(("--profile", str(directory / "client.prof")) if profile else ()),
        "client",
        "--driver", f"{HOST}:{quic_port}",
        "--san", "localhost",
        "--authority", str(creds.certificate),
        "--token-file", str(creds.client_token),
        "--target", f"{HOST}:{target_port}",
        "--log-level", "warning",
        "--json",
        *size,
        *extra_client,
    )  # fmt: skip
    with process(server_args, log=directory / "server.log") as server:
        wait_for_json_line(directory / "server.log", "listening_on", server)
        with process(client_args, log=directory / "client.log") as client:
            granted = wait_for_json_line(directory / "client.log", "port_granted", client)
            yield SnocatPair(server, client, int(granted["port"]))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (pastes into docs/performance.md as it is)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def mb_per_s(size: int, seconds: float) -> float:
    return size / seconds / MB
