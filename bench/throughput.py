"""Bulk throughput: one forwarded TCP connection through real ``snocat server`` and
``snocat client`` processes, next to raw QUIC between two processes and the tools a
user would otherwise pick (socat, ``ssh -L``, asyncssh), then 1/8/64 connections at once.

    python -m bench.throughput [--bytes 50e6] [--sizes 1200,9000] [--repeat 3]
        [--concurrent 1,8,64] [--compare-batching] [--no-batching] [--no-pmtud]
        [--skip-raw] [--skip-others]

Every transfer is checked end to end (SHA-256).  ``up`` sends to the target through
the public port (aggregator -> client over QUIC); ``down`` is the other way.  The
figure is the median of ``--repeat`` transfers.  ``CPU ms/MB`` is the CPU time both
ends (snocat server + client, or raw sender + receiver) spent per MB moved: unlike
MB/s it barely changes when other work shares the machine, so ``raw/tunnel CPU``
(the tunnel's efficiency relative to raw aioquic) is comparable across runs.

The many-connection table (``--concurrent``, first ``--sizes`` value) splits
``--bytes`` over N connections of one tunnel at once; ``vs 1 connection`` is each
aggregate over the one-connection figure of the same run (issue 16 asks for 0.9 or
more), ``CPU ms/MB`` is both snocat processes' CPU per MB moved, and ``harness CPU
ms/MB`` this process's (the senders in one thread, the target in another, each
serving all connections through a selector): on a two-core machine it competes with
the tunnel for the same cores.

Each ``--sizes`` row is a fixed datagram size (``--no-path-mtu-discovery``); the
``pmtud (default)`` row runs the default configuration, where path MTU discovery
grows datagrams from 1200 B up to the default ceiling, and compares it with the best
fixed row.  ``--compare-batching`` adds a row per size with UDP GSO/GRO off
(``--udp-batch 1``); ``--no-batching`` turns them off everywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    DOWNLOAD,
    HOST,
    MB,
    PYTHON,
    UPLOAD,
    Target,
    UploadSink,
    cpu_seconds,
    free_port,
    make_credentials,
    mb_per_s,
    parallel_uploads,
    process,
    scratch_directory,
    snocat_pair,
    table,
    transfer,
    wait_connectable,
)


def median_rate(port: int, mode: bytes, size: int, repeat: int) -> float:
    transfer(port, mode, 1_000_000)  # warm-up: connection setup, congestion window
    return statistics.median(mb_per_s(size, transfer(port, mode, size)) for _ in range(repeat))


# Raw QUIC ----------------------------------------------------------------------------


def raw_quic(
    engine: str, datagram: int, size: int, repeat: int, directory: Path
) -> tuple[float, float]:
    """Median ``(MB/s, CPU ms per MB of both ends)`` of raw QUIC stream transfers."""
    creds = make_credentials(directory)
    port = free_port(socket.SOCK_DGRAM)
    common = ["--engine", engine, "--port", str(port), "--max-datagram-size", str(datagram)]
    receiver = [
        PYTHON, "-m", "bench.raw_quic", "receive", *common,
        "--cert", str(creds.certificate), "--key", str(creds.private_key),
    ]  # fmt: skip
    results = []
    with process(receiver, log=directory / f"raw-{engine}.log") as proc:
        _wait_ready(directory / f"raw-{engine}.log", proc)
        for _ in range(repeat):
            before = cpu_seconds(proc.pid)
            out = subprocess.run(
                [PYTHON, "-m", "bench.raw_quic", "send", *common, "--bytes", str(size)],
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
            ).stdout
            receiver_cpu = cpu_seconds(proc.pid) - before
            result = json.loads(out.strip().splitlines()[-1])
            results.append(
                (
                    mb_per_s(result["bytes"], result["seconds"]),
                    cpu_ms_per_mb(result["cpu"] + receiver_cpu, result["bytes"]),
                )
            )
    return results[sorted(range(repeat), key=lambda i: results[i][0])[repeat // 2]]


def cpu_ms_per_mb(cpu_seconds: float, size: int) -> float:
    return 1000 * cpu_seconds / (size / MB)


def _wait_ready(log: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while "ready" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{log.name}: {log.read_text()[-2000:]}")
        time.sleep(0.05)


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# The tunnel --------------------------------------------------------------------------


def tunnel_options(datagram: int | None, *, batching: bool) -> list[str]:
    """``snocat`` options for one row: a fixed ``datagram`` size, or (None) the default
    path MTU discovery; UDP GSO/GRO on or off."""
    options = [] if datagram is None else ["--no-path-mtu-discovery"]
    return options if batching else [*options, "--udp-batch", "1"]


def tunnel(
    datagram: int | None,
    size: int,
    repeat: int,
    directory: Path,
    target: Target,
    *,
    batching: bool = True,
) -> dict[str, Any]:
    extra = tunnel_options(datagram, batching=batching)
    with snocat_pair(
        directory,
        target.port,
        max_datagram_size=datagram,
        extra_server=extra,
        extra_client=extra,
    ) as pair:
        port = pair.public_port
        result: dict[str, Any] = {}
        for name, mode in (("up", UPLOAD), ("down", DOWNLOAD)):
            transfer(port, mode, 1_000_000)
            rates, cpus = [], []
            for _ in range(repeat):
                before = cpu_seconds(pair.server.pid), cpu_seconds(pair.client.pid)
                seconds = transfer(port, mode, size)
                after = cpu_seconds(pair.server.pid), cpu_seconds(pair.client.pid)
                rates.append(mb_per_s(size, seconds))
                cpus.append([a - b for a, b in zip(after, before, strict=True)])
            middle = sorted(range(repeat), key=rates.__getitem__)[repeat // 2]
            result[name] = rates[middle]
            result[f"{name}_cpu"] = cpu_ms_per_mb(sum(cpus[middle]), size)
        return result


def concurrency(
    datagram: int,
    total: int,
    counts: list[int],
    directory: Path,
    *,
    repeat: int = 1,
    batching: bool = True,
) -> list[tuple[int, float, float, float]]:
    """``(connections, aggregate MB/s, CPU ms/MB of both snocat processes, CPU ms/MB
    of this process: the senders and the target, one thread each)`` for each
    count, ``total`` bytes split over the connections of one tunnel; the median of
    ``repeat`` rounds, each round running every count once (so a change of load
    during the run touches every count alike)."""
    extra = tunnel_options(datagram, batching=batching)
    samples: dict[int, list[tuple[float, float, float]]] = {count: [] for count in counts}
    sink = UploadSink()
    with (
        contextlib.closing(sink),
        snocat_pair(
            directory,
            sink.port,
            max_datagram_size=datagram,
            extra_server=extra,
            extra_client=extra,
        ) as pair,
    ):
        parallel_uploads(pair.public_port, 1_000_000, 1)
        for _ in range(repeat):
            for count in counts:
                each = max(1, total // count)
                before = cpu_seconds(pair.server.pid) + cpu_seconds(pair.client.pid)
                harness = time.process_time()
                seconds = parallel_uploads(pair.public_port, each, count)
                harness = time.process_time() - harness
                cpu = cpu_seconds(pair.server.pid) + cpu_seconds(pair.client.pid) - before
                moved = each * count
                samples[count].append(
                    (
                        mb_per_s(moved, seconds),
                        cpu_ms_per_mb(cpu, moved),
                        cpu_ms_per_mb(harness, moved),
                    )
                )
    rows = []
    for count in counts:
        ordered = sorted(samples[count])
        rows.append((count, *ordered[len(ordered) // 2]))
    return rows


def concurrency_rows(results: list[tuple[int, float, float, float]]) -> list[list[str]]:
    """Table rows; the ratio is against the one-connection row (when measured)."""
    single = next((rate for count, rate, _, _ in results if count == 1), 0.0)
    return [
        [
            str(count),
            f"{rate:.1f}",
            f"{rate / single:.2f}" if single else "",
            f"{cpu:.0f}",
            f"{harness:.0f}",
        ]
        for count, rate, cpu, harness in results
    ]


SBIN = "/usr/sbin:/usr/local/sbin:/usr/bin:/bin"


def tunnel_row(label: str, ours: dict[str, Any], raw: float, raw_cpu: float) -> list[str]:
    return [
        label,
        f"{ours['up']:.1f}",
        f"{ours['down']:.1f}",
        f"{ours['up'] / raw:.2f}" if raw else "",
        f"{ours['up_cpu']:.0f} / {ours['down_cpu']:.0f}",
        f"{raw_cpu / ours['up_cpu']:.2f}" if raw_cpu else "",
    ]


# Other tools -------------------------------------------------------------------------


@contextlib.contextmanager
def socat_forward(directory: Path, target_port: int) -> Iterator[int]:
    listen = free_port()
    args = ["socat", f"TCP-LISTEN:{listen},bind={HOST},fork,reuseaddr", f"TCP:{HOST}:{target_port}"]
    with process(args, log=directory / "socat.log"):
        wait_connectable(listen)
        yield listen


@contextlib.contextmanager
def ssh_forward(directory: Path, target_port: int) -> Iterator[int]:
    """``ssh -L`` through a private ``sshd`` on loopback (keys made for the run)."""
    Path("/run/sshd").mkdir(exist_ok=True)
    for name in ("host", "user"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name)],
            check=True,
        )
    shutil.copy(directory / "user.pub", directory / "authorized_keys")
    sshd_port, listen = free_port(), free_port()
    config = directory / "sshd_config"
    config.write_text(
        f"Port {sshd_port}\nListenAddress {HOST}\nHostKey {directory / 'host'}\n"
        f"AuthorizedKeysFile {directory / 'authorized_keys'}\nPermitRootLogin yes\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nPidFile none\n"
        "AllowTcpForwarding yes\n"
    )
    sshd = shutil.which("sshd", path=SBIN) or "sshd"
    with process([sshd, "-D", "-e", "-f", str(config)], log=directory / "sshd.log"):
        wait_connectable(sshd_port)
        ssh = [
            "ssh", "-N", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes",
            "-i", str(directory / "user"), "-p", str(sshd_port),
            "-L", f"{listen}:{HOST}:{target_port}", f"root@{HOST}",
        ]  # fmt: skip
        with process(ssh, log=directory / "ssh.log"):
            wait_connectable(listen)
            yield listen


@contextlib.contextmanager
def asyncssh_forward(directory: Path, target_port: int) -> Iterator[int]:
    port, listen = free_port(), free_port()
    module = [PYTHON, "-m", "bench.asyncssh_forward"]
    with process([*module, "server", "--port", str(port)], log=directory / "assh.log") as srv:
        _wait_ready(directory / "assh.log", srv)
        client = [*module, "client", "--port", str(port), "--listen", str(listen)]
        client += ["--target", str(target_port)]
        with process(client, log=directory / "asshc.log") as cli:
            _wait_ready(directory / "asshc.log", cli)
            yield listen


# Main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bytes", type=float, default=50e6)
    parser.add_argument("--sizes", default="1200,9000", help="datagram sizes to compare")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrent", default="1,8,64")
    parser.add_argument("--skip-others", action="store_true", help="no socat / ssh / asyncssh")
    parser.add_argument("--skip-raw", action="store_true", help="no raw aioquic / qh3 rows")
    parser.add_argument(
        "--compare-batching", action="store_true", help="a row per size with GSO/GRO off too"
    )
    parser.add_argument("--no-batching", action="store_true", help="GSO/GRO off everywhere")
    parser.add_argument("--no-pmtud", action="store_true", help='no "pmtud (default)" row')
    args = parser.parse_args()
    batching = not args.no_batching
    size = int(args.bytes)
    sizes = [int(s) for s in args.sizes.split(",")]
    target = Target()
    rows: list[list[str]] = []
    try:
        best = 0.0
        for datagram in sizes:
            raw = raw_cpu = 0.0
            if not args.skip_raw:
                with scratch_directory() as directory:
                    raw, raw_cpu = raw_quic("aioquic", datagram, size, args.repeat, directory)
                rows.append(
                    [f"raw aioquic stream, {datagram} B", f"{raw:.1f}", "", "1.00",
                     f"{raw_cpu:.0f}", ""]
                )  # fmt: skip
            variants = [batching, False] if args.compare_batching and batching else [batching]
            for batched in variants:
                with scratch_directory() as directory:
                    ours = tunnel(datagram, size, args.repeat, directory, target, batching=batched)
                best = max(best, ours["up"])
                label = f"snocat tunnel, {datagram} B" + ("" if batched else ", no batching")
                rows.append(tunnel_row(label, ours, raw, raw_cpu))
            if has_module("qh3") and not args.skip_raw:
                with scratch_directory() as directory:
                    qh3, qh3_cpu = raw_quic("qh3", datagram, size, args.repeat, directory)
                rows.append(
                    [f"raw qh3 stream, {datagram} B", f"{qh3:.1f}", "", "", f"{qh3_cpu:.0f}", ""]
                )
        if not args.no_pmtud:
            with scratch_directory() as directory:
                ours = tunnel(None, size, args.repeat, directory, target, batching=batching)
            row = tunnel_row("snocat tunnel, pmtud (default)", ours, 0.0, 0.0)
            row[3] = f"{ours['up'] / best:.2f} of best fixed" if best else ""
            rows.append(row)
        if not args.skip_others:
            tools = [
                ("socat (plain TCP relay)", shutil.which("socat"), socat_forward),
                ("ssh -L (OpenSSH)", shutil.which("sshd", path=SBIN), ssh_forward),
                ("asyncssh port forward", has_module("asyncssh"), asyncssh_forward),
            ]
            for label, available, forward in tools:
                if not available:
                    print(f"(skipped {label}: not installed)")
                    continue
                with scratch_directory() as directory, forward(directory, target.port) as port:
                    up = median_rate(port, UPLOAD, size, args.repeat)
                    down = median_rate(port, DOWNLOAD, size, args.repeat)
                rows.append([label, f"{up:.1f}", f"{down:.1f}", "", "", ""])
        print(f"\n## Bulk throughput, one connection, {size / 1e6:.0f} MB (median of "
              f"{args.repeat})\n")  # fmt: skip
        headers = ["path", "up MB/s", "down MB/s", "tunnel/raw (up)", "CPU ms/MB", "raw/tunnel CPU"]
        print(table(headers, rows))
        counts = [int(c) for c in args.concurrent.split(",") if c]
        if counts:
            with scratch_directory() as directory:
                conc = concurrency(
                    sizes[0], size, counts, directory,
                    repeat=args.repeat, batching=batching,
                )  # fmt: skip
            print(f"\n## Aggregate throughput, {size / 1e6:.0f} MB split over N connections "
                  f"(up, {sizes[0]} B datagrams, median of {args.repeat})\n")  # fmt: skip
            headers = ["connections", "MB/s", "vs 1 connection", "CPU ms/MB", "harness CPU ms/MB"]
            print(table(headers, concurrency_rows(conc)))
    finally:
        target.close()


if __name__ == "__main__":
    main()
