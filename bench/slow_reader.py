"""Memory under a fast sender and a slow receiver: one forwarded connection through real
``snocat server`` and ``snocat client`` processes, pushed as fast as it goes, read slowly.

    python -m bench.slow_reader [--bytes 1e9] [--read-rate 20e6] [--stall 5]
                                [--timeout 60] [--directions up,down] [--max-datagram-size N]

``up``: a sender at the aggregator's public port writes as fast as it can; the target
behind the client reads 64 KiB at a time and sleeps whenever it is ahead of
``--read-rate`` bytes/s.  ``down``: the target writes as fast as it can and the
connecting side reads the same way.  Halfway through, the reader stops reading for
``--stall`` seconds while the sender keeps writing.  Each direction gets a fresh server
and client, warmed up with a 1 MB transfer before the first sample.

Both snocat processes' RSS (VmRSS) is sampled every 100 ms.  With backpressure working
the growth is a few buffers (the ``Limits`` printed first, plus one relay read per
direction) whatever ``--bytes`` is, and during the stall the sender stops within a
second and RSS stays flat.  "in flight" is what the sender has written and the reader
not yet read: snocat's buffers plus the four TCP socket buffers (kernel memory, not RSS;
loopback autotuning lets a receive buffer reach ``tcp_rmem``'s maximum).

Every transfer is checked end to end: the exact byte count and SHA-256.  Exits non-zero,
saying why, on corruption, a short count, a snocat process that died, or a side that
made no progress for ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.common import (
    DOWNLOAD,
    HEADER,
    HOST,
    MB,
    PATTERN,
    UPLOAD,
    SnocatPair,
    Target,
    pattern_digest,
    rss_bytes,
    scratch_directory,
    snocat_pair,
    table,
)
from snocat_proto._wire.limits import Limits

#: Read and write size of both bench sides.
CHUNK = 64 * 1024
SAMPLE_INTERVAL = 0.1
#: The upload target's answer: how many bytes it read before EOF, and their SHA-256.
REPLY = struct.Struct("!Q32s")
#: Timeout of every blocking socket call: how often a waiting side checks for a stall.
POLL = 1.0
#: How far a reader that fell behind its rate may catch up in a burst.
CATCH_UP = 0.1
WARM_UP = 1_000_000

T = TypeVar("T")


class BenchFailure(Exception):
    """The run cannot be reported: corrupted or short data, a stall, a dead process."""


# The two sides of a transfer -----------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How the reader of one transfer reads."""

    size: int
    rate: float = math.inf
    stall_at: int | None = None
    stall_seconds: float = 0.0
    #: Seconds neither side may go without moving a byte before the run is failed.
    timeout: float = 60.0


@dataclass
class Progress:
    """Shared by the sender, the reader and the sampler (plain values: the GIL suffices)."""

    sent: int = 0
    read: int = 0
    #: Seconds the reader slept because it was ahead of its rate (the stall excluded).
    paced: float = 0.0
    #: ``(monotonic time, bytes sent)`` when the stall began, half-way, and ended.
    stall_marks: list[tuple[float, int]] = field(default_factory=list)
    #: When either side last moved a byte (or the reader ended its stall).
    moved_at: float = field(default_factory=time.monotonic)

    def check(self, plan: Plan, doing: str) -> None:
        """Fail the run once neither side has moved a byte for ``plan.timeout`` seconds."""
        if time.monotonic() - self.moved_at > plan.timeout:
            raise BenchFailure(
                f"stalled: no byte moved for {plan.timeout:.0f} s while {doing} "
                f"({self.sent} bytes sent, {self.read} read, of {plan.size})"
            )


def _patiently(progress: Progress, plan: Plan, doing: str, call: Callable[..., T], *args: Any) -> T:
    """``call(*args)``, a socket operation with a ``POLL`` timeout, retried while bytes
    move: one side waiting is fine as long as the other makes progress."""
    while True:
        try:
            return call(*args)
        except TimeoutError:
            progress.check(plan, doing)


def send_fast(sock: socket.socket, plan: Plan, progress: Progress) -> None:
    """Write ``plan.size`` pattern bytes as fast as the socket takes them."""
    sock.settimeout(POLL)
    view = memoryview(PATTERN)
    while progress.sent < plan.size:
        offset = progress.sent % len(PATTERN)
        chunk = view[offset : offset + min(CHUNK, plan.size - progress.sent)]
        progress.sent += _patiently(progress, plan, "sending", sock.send, chunk)
        progress.moved_at = time.monotonic()


def read_slowly(sock: socket.socket, plan: Plan, progress: Progress) -> tuple[int, bytes]:
    """Read to EOF at ``plan.rate`` bytes/s, stopping once for the stall: ``(count, sha256)``."""
    sock.settimeout(POLL)
    digest = hashlib.sha256()
    view = memoryview(bytearray(CHUNK))
    # When reading at ``rate`` would have read nothing yet; moved on by the stall, and
    # by falling behind (so a reader the tunnel held back does not burst for long).
    origin = time.monotonic()
    while True:
        if (
            plan.stall_at is not None
            and not progress.stall_marks
            and progress.read >= plan.stall_at
        ):
            began = time.monotonic()
            progress.stall_marks.append((began, progress.sent))
            time.sleep(plan.stall_seconds / 2)
            progress.stall_marks.append((time.monotonic(), progress.sent))
            time.sleep(plan.stall_seconds / 2)
            ended = progress.moved_at = time.monotonic()
            progress.stall_marks.append((ended, progress.sent))
            origin += ended - began
        n = _patiently(progress, plan, "reading", sock.recv_into, view)
        if n == 0:
            return progress.read, digest.digest()
        digest.update(view[:n])
        progress.read += n
        now = progress.moved_at = time.monotonic()
        due = origin + progress.read / plan.rate
        if due > now:
            time.sleep(due - now)
            progress.paced += due - now
        else:
            origin = max(origin, now - progress.read / plan.rate - CATCH_UP)


def read_exactly(
    sock: socket.socket, size: int, progress: Progress, plan: Plan, doing: str
) -> bytes:
    sock.settimeout(POLL)
    data = bytearray()
    while len(data) < size:
        chunk = _patiently(progress, plan, doing, sock.recv, size - len(data))
        if not chunk:
            raise BenchFailure(f"connection closed after {len(data)} of {size} bytes {doing}")
        data += chunk
    return bytes(data)


class SlowTarget(Target):
    """The TCP service behind the client, one connection at a time.

    Each connection starts with ``HEADER`` (mode, size).  ``U``: read to EOF as
    :attr:`plan` says and answer ``REPLY``.  ``D``: send ``size`` pattern bytes as fast
    as they go, then close.  The bench sets :attr:`plan` and :attr:`progress` before it
    connects; what goes wrong is kept in :attr:`errors`."""

    def __init__(self) -> None:
        self.plan = Plan(size=0)
        self.progress = Progress()
        self.served = threading.Event()
        super().__init__()

    def expect(self, plan: Plan, progress: Progress) -> None:
        self.plan, self.progress = plan, progress
        self.errors.clear()
        self.served.clear()

    def _serve(self, conn: socket.socket) -> None:
        plan, progress = self.plan, self.progress
        try:
            with conn:
                header = read_exactly(conn, HEADER.size, progress, plan, "(target) header")
                mode, size = HEADER.unpack(header)
                if size != plan.size:
                    raise BenchFailure(f"target expected {plan.size} bytes, was asked {size}")
                if mode == UPLOAD:
                    reply = REPLY.pack(*read_slowly(conn, plan, progress))
                    _patiently(progress, plan, "replying", conn.sendall, reply)
                else:
                    send_fast(conn, plan, progress)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.served.set()


def transfer(
    port: int, direction: bytes, plan: Plan, target: SlowTarget, expected: bytes
) -> Progress:
    """One checked transfer through ``port``: this side sends (``U``) or reads (``D``)."""
    progress = Progress()
    target.expect(plan, progress)
    try:
        with socket.create_connection((HOST, port), timeout=plan.timeout) as sock:
            sock.sendall(HEADER.pack(direction, plan.size))
            if direction == UPLOAD:
                send_fast(sock, plan, progress)
                sock.shutdown(socket.SHUT_WR)
                reply = read_exactly(sock, REPLY.size, progress, plan, "waiting for the digest")
                count, digest = REPLY.unpack(reply)
            else:
                count, digest = read_slowly(sock, plan, progress)
        while not target.served.wait(POLL):
            progress.check(plan, "waiting for the target to finish")
    except (BenchFailure, OSError) as exc:
        problem = str(exc) if isinstance(exc, BenchFailure) else repr(exc)
        target.served.wait(POLL)
        if target.errors:
            problem += f"; the target: {target.errors[0]!r}"
        raise BenchFailure(problem) from exc
    if target.errors:
        raise BenchFailure(f"the target: {target.errors[0]!r}")
    if count != plan.size:
        raise BenchFailure(f"{count} bytes arrived of {plan.size}")
    if digest != expected:
        raise BenchFailure(f"corrupted: SHA-256 of the {count} bytes received does not match")
    return progress


# Sampling ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    time: float
    server: int
    client: int
    in_flight: int


class Sampler:
    """Samples both snocat processes' RSS every ``SAMPLE_INTERVAL`` on its own thread."""

    def __init__(self, pair: SnocatPair, progress: Callable[[], Progress]) -> None:
        self.pair = pair
        self.progress = progress
        self.samples: list[Sample] = []
        self.dead: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        for name, proc in (("server", self.pair.server), ("client", self.pair.client)):
            if proc.poll() is not None and self.dead is None:
                self.dead = f"snocat {name} exited ({proc.returncode})"
        if self.dead:
            return
        progress = self.progress()
        self.samples.append(
            Sample(
                time.monotonic(),
                rss_bytes(self.pair.server.pid),
                rss_bytes(self.pair.client.pid),
                progress.sent - progress.read,
            )
        )

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()


# One run -------------------------------------------------------------------------------


@dataclass
class RunResult:
    label: str
    size: int
    seconds: float
    progress: Progress
    samples: list[Sample]
    stall_seconds: float


def run_direction(
    label: str, direction: bytes, plan: Plan, expected: bytes, max_datagram_size: int | None
) -> RunResult:
    """A fresh server and client, a warm-up, then the sampled transfer."""
    target = SlowTarget()
    try:
        with (
            scratch_directory() as directory,
            snocat_pair(directory, target.port, max_datagram_size=max_datagram_size) as pair,
        ):
            warm = Plan(size=WARM_UP, timeout=plan.timeout)
            transfer(pair.public_port, direction, warm, target, pattern_digest(WARM_UP))
            time.sleep(0.5)  # let the warm-up's garbage go before the first sample
            with Sampler(pair, lambda: target.progress) as sampler:
                start = time.perf_counter()
                try:
                    current = transfer(pair.public_port, direction, plan, target, expected)
                except BenchFailure as exc:
                    if sampler.dead:
                        raise BenchFailure(f"{sampler.dead}: {_log_tails(directory)}") from exc
                    raise
                seconds = time.perf_counter() - start
            if sampler.dead:
                raise BenchFailure(f"{sampler.dead}: {_log_tails(directory)}")
    finally:
        target.close()
    return RunResult(label, plan.size, seconds, current, sampler.samples, plan.stall_seconds)


def _log_tails(directory: Path) -> str:
    tails = []
    for name in ("server.log", "client.log"):
        lines = (directory / name).read_text(errors="replace").splitlines()[-3:]
        tails.append(f"\n--- {name} (last lines)\n" + "\n".join(lines))
    return "".join(tails)


# Reporting -----------------------------------------------------------------------------


def mb(value: float) -> str:
    return f"{value / MB:.1f}"


def rss_rows(result: RunResult) -> list[list[object]]:
    rows: list[list[object]] = []
    for name in ("server", "client"):
        rss = [getattr(s, name) for s in result.samples]
        start, peak, end = rss[0], max(rss), rss[-1]
        rows.append(
            [
                result.label,
                name,
                mb(result.size),
                f"{result.seconds:.1f}",
                f"{result.size / result.seconds / MB:.1f}",
                mb(start),
                mb(peak),
                mb(end),
                f"**{mb(peak - start)}**",
            ]
        )
    return rows


def flow_row(result: RunResult) -> list[object]:
    progress = result.progress
    reading = result.seconds - result.stall_seconds
    return [
        result.label,
        f"{100 * progress.paced / reading:.0f}",
        mb(max(s.in_flight for s in result.samples)),
    ]


def stall_rows(result: RunResult) -> list[list[object]]:
    marks = result.progress.stall_marks
    if len(marks) != 3:
        return []
    (began, sent_began), (middle, sent_middle), (ended, sent_ended) = marks
    during = [s for s in result.samples if began <= s.time <= ended]
    before = [s for s in result.samples if s.time <= began]
    if not during or not before:
        return []
    if sent_began >= result.size:
        pushed = pushed_late = "done before"  # everything was in flight already
    else:
        pushed, pushed_late = mb(sent_ended - sent_began), f"**{mb(sent_ended - sent_middle)}**"
    rows: list[list[object]] = []
    for name in ("server", "client"):
        at_start = getattr(before[-1], name)
        peak = max(getattr(s, name) for s in during)
        late = [getattr(s, name) for s in during if s.time >= middle]
        at_end = getattr(during[-1], name)
        rows.append(
            [
                result.label,
                name,
                mb(at_start),
                mb(peak),
                mb(at_end),
                f"**{mb(peak - at_start)}**",
                mb(max(late) - min(late)) if late else "",
                pushed,
                pushed_late,
                mb(during[-1].in_flight),
            ]
        )
    return rows


def limits_rows() -> list[list[object]]:
    limits = Limits()
    rows: list[list[object]] = [
        [f"`Limits.{name}`", f"{getattr(limits, name) // 1024} KiB", why]
        for name, why in (
            ("stream_send_buffer", "unacknowledged bytes one stream's sender holds"),
            ("tunnel_send_buffer", "the same, all streams of a tunnel"),
            ("stream_receive_window", "bytes the peer may send one stream before it is read"),
            ("tunnel_receive_window", "the same, all streams of a tunnel"),
        )
    ]
    rows.append(
        [
            "`Limits.relay_chunk_size`",
            f"{Limits().relay_chunk_size // 1024} KiB",
            "one read per relay direction",
        ]
    )
    for name in ("tcp_wmem", "tcp_rmem"):
        try:
            maximum = int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        except (OSError, IndexError, ValueError):
            continue
        rows.append([f"`{name}` max", f"{maximum // 1024} KiB", "per TCP socket, kernel memory"])
    return rows


# Main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bytes", type=float, default=1e9)
    parser.add_argument("--read-rate", type=float, default=20e6, help="reader's bytes/s")
    parser.add_argument("--stall", type=float, default=5.0, help="seconds not reading, halfway")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without progress")
    parser.add_argument("--directions", default="up,down")
    parser.add_argument("--max-datagram-size", type=int, default=None)
    args = parser.parse_args()
    size = int(args.bytes)
    directions = {"up": UPLOAD, "down": DOWNLOAD}
    wanted = [d for d in args.directions.split(",") if d]
    if size <= 0 or args.read_rate <= 0 or not wanted or set(wanted) - set(directions):
        parser.error("--bytes and --read-rate must be positive; --directions of up,down")
    plan = Plan(
        size=size,
        rate=args.read_rate,
        stall_at=size // 2 if args.stall > 0 else None,
        stall_seconds=max(args.stall, 0.0),
        timeout=args.timeout,
    )
    expected = pattern_digest(size)
    results: list[RunResult] = []
    failure = None
    try:
        for name in wanted:
            results.append(
                run_direction(name, directions[name], plan, expected, args.max_datagram_size)
            )
    except BenchFailure as exc:
        failure = exc
    if results:
        report(results, plan)
    if failure is not None:
        sys.exit(f"bench.slow_reader: FAILED: {failure}")


def report(results: list[RunResult], plan: Plan) -> None:
    print("\n## What bounds buffering (defaults in force)\n")
    print(table(["bound", "value", "what it bounds"], limits_rows()))
    print(
        f"\n## Fast sender, slow reader: {plan.size / MB:.0f} MB each way, read at "
        f"{plan.rate / MB:.0f} MB/s, stalled {plan.stall_seconds:.0f} s halfway (MB)\n"
    )
    headers = ["run", "process", "bytes", "seconds", "MB/s", "RSS start", "peak", "end"]
    rows = [row for result in results for row in rss_rows(result)]
    print(table([*headers, "peak - start"], rows))
    print("\n## Flow\n")
    flow = [flow_row(result) for result in results]
    print(table(["run", "reader paced %", "peak in flight MB"], flow))
    stalls = [row for result in results for row in stall_rows(result)]
    if stalls:
        print(f"\n## While the reader stalled ({plan.stall_seconds:.0f} s, MB)\n")
        headers = ["run", "process", "RSS at stall start", "peak", "at end", "growth"]
        headers += ["RSS range, 2nd half", "sender pushed", "pushed in 2nd half", "in flight"]
        print(table(headers, stalls))
    print(
        "\n`reader paced %`: the share of its reading time the reader slept because data "
        "came faster than its rate (near 0: the tunnel, not the reader, was the bottleneck). "
        "`in flight`: written by the sender and not yet read: snocat's buffers plus the "
        "TCP socket buffers at both ends (kernel memory)."
    )


if __name__ == "__main__":
    main()
