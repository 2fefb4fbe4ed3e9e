"""The ``snocat`` command group, its console script, and options several commands share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import rich_click as click

from snocat_proto._service.config import (
    DEFAULT_DATAGRAM_CEILING,
    DEFAULT_MAX_DATAGRAM_SIZE,
    MAX_DATAGRAM_SIZE_LIMIT,
)
from snocat_proto._wire.limits import MAX_UDP_SEGMENTS, Limits

from ._common import LOOP_ENVIRONMENT, fail

click.rich_click.USE_MARKDOWN = True


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="snocat", prog_name="snocat")
def cli() -> None:
    """Forward TCP over authenticated, encrypted QUIC tunnels (wire-compatible with snocat 0.8).

    Try it in one command: `snocat demo --target 127.0.0.1:8000`.
    """


def main() -> None:
    """The console script: click's own usage errors also end in one line, not a box."""
    try:
        status = cli.main(standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        fail(exc.format_message() + hint, exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        fail("aborted", 130)
    raise SystemExit(status if isinstance(status, int) else 0)


def backend_option(function: Callable[..., Any]) -> Callable[..., Any]:
    function = click.option(
        "--loop",
        type=click.Choice(["auto", "asyncio", "uvloop"]),
        default="auto",
        show_default=True,
        envvar=LOOP_ENVIRONMENT,
        help="Event loop: asyncio's own, or uvloop (pip install 'snocat[fast]'). auto is "
        f"asyncio's, which measured faster here [env: ${LOOP_ENVIRONMENT}].",
    )(function)
    return click.option(
        "--backend",
        type=click.Choice(["asyncio", "trio"]),
        default="asyncio",
        show_default=True,
        hidden=True,
    )(function)


def datagram_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--max-datagram-size``, ``--path-mtu-discovery/--no-...`` and ``--udp-batch``."""
    function = click.option(
        "--udp-batch",
        default=Limits().udp_segments_per_call,
        show_default=True,
        type=click.IntRange(1, MAX_UDP_SEGMENTS),
        help="Datagrams moved per system call, with UDP GSO and GRO where the kernel has "
        "them; 1 sends and receives one at a time.",
    )(function)
    function = click.option(
        "--path-mtu-discovery/--no-path-mtu-discovery",
        default=True,
        show_default=True,
        help="Grow datagrams from 1200 B as far as the path carries (padded PING probes, "
        "RFC 8899), up to --max-datagram-size. Off, every datagram is that size.",
    )(function)
    return click.option(
        "--max-datagram-size",
        default=None,
        type=click.IntRange(DEFAULT_MAX_DATAGRAM_SIZE, MAX_DATAGRAM_SIZE_LIMIT),
        help=f"Largest UDP payload to send: the ceiling of path MTU discovery [default: "
        f"{DEFAULT_DATAGRAM_CEILING}]; with --no-path-mtu-discovery, the one size sent "
        f"[default: {DEFAULT_MAX_DATAGRAM_SIZE}, which fits every path; 1452 suits an "
        "Ethernet LAN, 8952 jumbo frames] (see docs/performance.md).",
    )(function)


def liveness_options(*, keepalive: float, who: str) -> Callable[..., Any]:
    """``--idle-timeout`` and ``--keepalive``; ``who`` names the peer in the help."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        function = click.option(
            "--keepalive",
            default=keepalive,
            show_default=True,
            type=click.FloatRange(min=0),
            help=f"Seconds without a packet from the {who} before pinging it (0: never). "
            "At most a share of the idle timeout both ends agreed on.",
        )(function)
        return click.option(
            "--idle-timeout",
            default=30.0,
            show_default=True,
            type=click.FloatRange(min=1),
            help="Seconds of silence before a tunnel is dropped.",
        )(function)

    return decorate
