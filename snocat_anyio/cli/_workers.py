"""``snocat server --registry``: a node's fleet settings, and ``--workers N``.

With ``--workers N`` the command starts N node processes of one fleet on this machine
(``python -m snocat_anyio server`` with the same arguments, each its own ``--node``),
which share the QUIC port (``SO_REUSEPORT``: the kernel spreads the clients) and the
public address: only the worker that holds a port listens on it.  This process only
supervises them: it passes SIGTERM, SIGINT and SIGHUP on, restarts a worker that
died (after a pause that grows while it keeps dying), and exits once they all did.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import sys
import time
from pathlib import Path

import anyio
import anyio.abc

from snocat_proto._service.backoff import Backoff
from snocat_proto._service.config import FleetConfig
from snocat_proto._wire.network import format_host_port

from ._common import (
    EXIT_USAGE,
    UsageProblem,
    logger,
    parse_socket_address,
    read_file,
    warn_if_exposed,
)

#: A worker that ran this long before it died is restarted at once.
HEALTHY_RUN = 60.0
_NODE_UNSAFE = re.compile(r"[\s/:]+")


def default_node_name(quic_port: int) -> str:
    """The host name and the QUIC port: unique per machine and port."""
    try:
        host = socket.gethostname().split(".")[0] or "node"
    except OSError:
        host = "node"
    return f"{_NODE_UNSAFE.sub('-', host)}-{quic_port}"


def fleet_config(
    registry: str,
    password_file: Path | None,
    node: str | None,
    advertise: str | None,
    quic: tuple[str, int],
    token_file: Path | None,
    lease: float,
    *,
    group: str,
) -> FleetConfig:
    """The fleet settings from the flags, with a message for each mistake."""
    if token_file is None:
        raise UsageProblem(
            "--registry needs --fleet-token-file FILE: the secret every node of the fleet "
            "proves to the others (the same file on each; make one with "
            "`head -c 32 /dev/urandom | base64 > fleet.token; chmod 600 fleet.token`)"
        )
    secret = read_file(token_file, "fleet token file").strip()
    warn_if_exposed(token_file, "fleet token file")
    password = None
    if password_file is not None:
        password = read_file(password_file, "registry password file").decode().strip()
        warn_if_exposed(password_file, "registry password file")
    if advertise is not None:
        advertised = parse_socket_address(advertise, what="--advertise")
    else:
        host = quic[0]
        if host in ("0.0.0.0", "::", ""):
            raise UsageProblem(
                f"--quic {format_host_port(*quic)} listens on every address: give "
                "--advertise HOST:PORT, where the other nodes (and clients) reach this one"
            )
        advertised = quic
    try:
        return FleetConfig(
            registry_url=registry,
            registry_password=password,
            node=node or default_node_name(quic[1]),
            advertise=advertised,
            secret=secret,
            lease=lease,
            group=group,
        )
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None


def worker_arguments(index: int, node: str) -> list[str]:
    """The command line of worker ``index`` (from 1): this one's, as a worker."""
    return [
        sys.executable,
        "-m",
        "snocat_anyio",
        *sys.argv[1:],
        "--worker-group",
        node,
        "--worker-index",
        str(index),
        "--node",
        f"{node}-w{index}",
        "--plain",
    ]


async def supervise_workers(count: int, node: str) -> None:
    """Run ``count`` workers until a signal stops them; see the module docstring."""
    logger.info("starting %d workers of node %s", count, node)
    stopping = anyio.Event()
    processes: dict[int, anyio.abc.Process] = {}
    failures: list[int] = []

    async def keep(index: int) -> None:
        backoff = Backoff(1.0, 30.0)
        while not stopping.is_set():
            started = time.monotonic()
            process = await anyio.open_process(
                worker_arguments(index, node), stdin=None, stdout=None, stderr=None
            )
            processes[index] = process
            status = await process.wait()
            processes.pop(index, None)
            if stopping.is_set():
                return
            if status == EXIT_USAGE:
                failures.append(status)
                logger.error("worker %d cannot start (exit %d): stopping", index, status)
                stopping.set()
                return
            if time.monotonic() - started >= HEALTHY_RUN:
                backoff.reset()
            delay = backoff.next_delay()
            logger.warning(
                "worker %d (node %s-w%d) exited with status %s; restarting it in %.1f s",
                index,
                node,
                index,
                status,
                delay,
            )
            with anyio.move_on_after(delay):
                await stopping.wait()

    def signal_all(signum: signal.Signals) -> None:
        for process in list(processes.values()):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    async def relay_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for number in signals:
                signum = signal.Signals(number)
                if signum == signal.SIGHUP:
                    signal_all(signum)
                    continue
                logger.info("%s received: stopping the workers", signal.Signals(signum).name)
                stopping.set()
                signal_all(signal.SIGTERM)

    async with anyio.create_task_group() as tg:
        tg.start_soon(relay_signals)
        async with anyio.create_task_group() as workers:
            for index in range(1, count + 1):
                workers.start_soon(keep, index)
            await stopping.wait()
            signal_all(signal.SIGTERM)
        tg.cancel_scope.cancel()
    if failures:
        raise UsageProblem("a worker could not start; its message is above")
