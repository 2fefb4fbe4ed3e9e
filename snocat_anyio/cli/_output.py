"""Where output goes: log records (stderr, or ``--log-file``), ``--json`` lines, and the
server's live table of tunnels.

On a terminal the log handler and the live table print through one
:class:`~rich.console.Console`: rich then moves the table down each time a log
line is printed above it, so logs scroll and the table stays put at the bottom.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import rich_click as click
from rich import box
from rich.console import Group, RenderableType
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from snocat_proto._service import activity
from snocat_proto._service.aggregator import TunnelStatus

from .._feed import Subscription
from .._server import TunnelServer, forwarded_connections
from ._common import UsageProblem, stderr_console

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str, *, log_file: Path | None = None, plain: bool = False) -> None:
    """Log records go to ``log_file`` (appended, with timestamps), else to stderr: through
    rich on a terminal (unless ``plain``), as timestamped lines otherwise."""
    handler: logging.Handler
    if log_file is not None:
        try:
            handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        except OSError as exc:
            raise UsageProblem(
                f"cannot open --log-file {str(log_file)!r}: {exc.strerror or exc}"
            ) from None
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    elif sys.stderr.isatty() and not plain:
        handler = RichHandler(console=stderr_console(), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level.upper() != "DEBUG":
        # aioquic logs each connection's details at INFO and the errors snocat already
        # reports in its own words (an untrusted certificate...) at WARNING: noise
        # unless debugging, with or without --json.
        logging.getLogger("quic").setLevel(logging.ERROR)


def output_options(function: Callable[..., object]) -> Callable[..., object]:
    """``--json``, ``--log-level`` and ``--log-file``."""
    function = click.option(
        "--log-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Append log records (with timestamps) to this file instead of stderr; an "
        "error still prints its one line on stderr.",
    )(function)
    function = click.option(
        "--json",
        "json_mode",
        is_flag=True,
        help="Print one JSON event per line on stdout (for scripts); logs stay on stderr.",
    )(function)
    return click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        default="info",
        show_default=True,
        help="How much to log.",
    )(function)


async def report(
    subscription: Subscription,
    *,
    json_mode: bool,
    on_record: Callable[[activity.Activity], None] | None = None,
) -> None:
    """Print every activity record: JSON lines on stdout, or through ``on_record``.

    The caller subscribes before starting the server or client: a task started
    with ``start_soon`` may run after the first records (trio picks the order)."""
    with subscription:
        async for record in subscription:
            if json_mode:
                sys.stdout.write(json.dumps(record.to_dict(), default=list) + "\n")
                sys.stdout.flush()
            elif on_record is not None:
                on_record(record)
            # Otherwise the library's own log lines tell the story.


# The live table ----------------------------------------------------------------

_HEADERS = ("name", "peer", "port", "age", "conns", "in", "out")
_NAME, _PEER, _PORT = 0, 1, 2
#: Narrowest the peer and name columns get (folded, never cut) before the next step.
_MIN_PEER = 9
_MIN_NAME = 6
#: Blank columns between two table columns (padding 1, collapsed, plus the rule's gap).
_GAP = 2


def status_view(
    statuses: Sequence[TunnelStatus], now: float, width: int, fleet: str | None = None
) -> RenderableType:
    """The live view at ``width`` columns: a title line, the ``fleet`` line of a node
    of a fleet, and a table of ``statuses`` (this node's tunnels).

    ``now`` is wall-clock time (``time.time()``), as ``TunnelStatus.connected_at`` is.
    When the table is too wide, the peer column folds, then goes; then the ports and
    the names fold, then sizes get shorter units: nothing is cut with an ellipsis."""
    connections = sum(forwarded_connections(status) for status in statuses)
    title = Text(
        f"snocat server: {_count(len(statuses), 'tunnel')}, "
        f"{_count(connections, 'forwarded connection')}",
        style="bold",
    )
    for compact in (False, True):
        rows = [_row(status, now, compact) for status in statuses]
        widths, columns = _fit(rows, width)
        if _total(widths, columns) <= width:
            break
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        expand=False,
    )
    for index in columns:
        table.add_column(
            _HEADERS[index],
            justify="left" if index in (_NAME, _PEER, _PORT) else "right",
            width=widths[index],
            no_wrap=index not in (_NAME, _PEER, _PORT),
            overflow="fold",
        )
    for row in rows:
        table.add_row(*(row[index] for index in columns))
    if fleet is not None:
        degraded = "unreachable" in fleet
        return Group(title, Text(fleet, style="bold red" if degraded else ""), table)
    return Group(title, table)


def _row(status: TunnelStatus, now: float, compact: bool) -> tuple[str, ...]:
    return (
        status.name,
        status.peer,
        ", ".join([*map(str, status.ports), *(f"{p}/udp" for p in status.udp_ports)]) or "-",
        duration(now - status.connected_at),
        str(forwarded_connections(status)),
        size(status.bytes_in, compact=compact),
        size(status.bytes_out, compact=compact),
    )


def _total(widths: list[int], columns: list[int]) -> int:
    return sum(widths[index] for index in columns) + _GAP * (len(columns) - 1)


def _fit(rows: list[tuple[str, ...]], width: int) -> tuple[list[int], list[int]]:
    """Column widths and which columns to show, the least useful giving way first."""
    widths = [
        max([len(header)] + [len(row[index]) for row in rows])
        for index, header in enumerate(_HEADERS)
    ]
    columns = list(range(len(_HEADERS)))

    def excess() -> int:
        return _total(widths, columns) - width

    if excess() > 0:
        widths[_PEER] = max(_MIN_PEER, widths[_PEER] - excess())
    if excess() > 0:
        columns.remove(_PEER)
    if excess() > 0:  # several ports fold at their commas
        single = max([len(_HEADERS[_PORT])] + [len(p) for row in rows for p in row[_PORT].split()])
        widths[_PORT] = max(single, widths[_PORT] - excess())
    if excess() > 0:
        widths[_NAME] = max(_MIN_NAME, widths[_NAME] - excess())
    return widths, columns


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def size(count: int, *, compact: bool = False) -> str:
    """``1.5 KiB``; ``compact``: ``1.5K``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            number = f"{value:.0f}" if unit == "B" else f"{value:.1f}"
            return f"{number}{unit[0]}" if compact else f"{number} {unit}"
        value /= 1024
    return str(count)


async def live_status(server: TunnelServer, interval: float = 1.0) -> None:
    """The live table at the bottom of the terminal, redrawn every ``interval`` s.

    It shares its console with the log handler (rich draws log lines above it), and
    stray writes to stderr (or to stdout on the same terminal) are sent above it too.
    The snapshot is taken here, in the event loop: no refresh thread reads the books."""
    console = stderr_console()
    fleet_line: Callable[[], str] | None = None
    if server.config.fleet is not None:
        from .._fleet import FleetServer  # imports the store's client

        assert isinstance(server, FleetServer)
        fleet_line = server.fleet_summary

    def view() -> RenderableType:
        fleet = fleet_line() if fleet_line is not None else None
        return status_view(server.tunnels(), time.time(), console.width, fleet)

    with Live(
        view(),
        console=console,
        auto_refresh=False,
        redirect_stdout=sys.stdout.isatty(),
        redirect_stderr=True,
    ) as live:
        while True:
            await anyio.sleep(interval)
            live.update(view(), refresh=True)
