"""``snocat server`` on a terminal: the live table, drawn on a real pseudo-terminal
and read back through a terminal emulator (pyte), and its layout at a given width."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator

import pyte
import pytest
from cli_harness import (  # noqa: F401 (fixtures)
    HOST,
    LOG_LINE,
    STEP_TIMEOUT,
    Lab,
    Website,
    assert_one_line_error,
    free_port_range,
    free_udp_port,
    lab_fixture,
    website_fixture,
)
from rich.console import Console

from snocat_anyio import TunnelStatus
from snocat_anyio.cli._output import status_view

NOW = 1_700_000_000.0
COLUMNS, ROWS = 60, 24
TITLE = re.compile(r"^\s*snocat server: \d+ tunnel")
HEADER = re.compile(r"^name\s+(peer\s+)?port\s+age\s+conns\s+in\s+out\s*$")


def status(name: str = "office-1", **changes: object) -> TunnelStatus:
    fields: dict[str, object] = {
        "tunnel_id": "0123456789ab",
        "name": name,
        "peer": "203.0.113.77:61234",
        "scheme": "token",
        "ports": (8080,),
        "connected_at": NOW - 185,
        "open_streams": 3,  # the proxyme stream of port 8080, and two visitors
        "bytes_in": 1536,
        "bytes_out": 5 * 1024 * 1024,
    }
    fields.update(changes)
    return TunnelStatus(**fields)  # type: ignore[arg-type]


def rendered(
    statuses: list[TunnelStatus], width: int, now: float = NOW, fleet: str | None = None
) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, legacy_windows=False).print(
        status_view(statuses, now, width, fleet)
    )
    return out.getvalue().rstrip("\n").split("\n")


def body(lines: list[str]) -> list[str]:
    """The table's rows: the lines below its rule."""
    rule = next(n for n, line in enumerate(lines) if line.startswith("──"))
    assert HEADER.match(lines[rule - 1]), lines
    return lines[rule + 1 :]


def test_a_node_of_a_fleet_shows_the_fleet_under_the_title() -> None:
    line = "fleet: a (this), b; 3 tunnels in the fleet; registry reachable"
    lines = rendered([status()], 100, fleet=line)
    assert TITLE.match(lines[0]) and lines[1].strip() == line
    assert body(lines)[0].startswith("office-1")
    assert not any(text.startswith("fleet:") for text in rendered([status()], 100))


# The table at a given width and time -----------------------------------------------


@pytest.mark.parametrize("width", [120, 80, 60, 40])
def test_the_table_fits_and_never_cuts_a_name(width: int) -> None:
    statuses = [status(), status("gateway-berlin-7", ports=(8081, 8082), open_streams=2)]
    lines = rendered(statuses, width)
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    text = "\n".join(lines)
    assert "…" not in text and "..." not in text, text
    rows = [line.split() for line in body(lines)]
    shown = [cell for cell in rows[0] if cell in ("office-1", "8080", "3m", "2")]
    assert shown == ["office-1", "8080", "3m", "2"], text
    # Two ports hold two proxyme streams: nothing is forwarded on gateway-berlin-7.
    assert "gateway-berlin-7" in "".join(line.split()[0] for line in body(lines)), text
    assert "8081," in text and "8082" in text, text
    assert " ".join(lines[:2]).startswith("snocat server: 2 tunnels, 2 forwarded"), text
    assert ("203.0.113.77:61234" in text) == (width >= 80), text


def test_a_name_wider_than_the_terminal_folds_instead_of_being_cut() -> None:
    lines = rendered([status("a-very-long-tunnel-name-indeed")], 36)
    assert all(len(line) <= 36 for line in lines), "\n".join(lines)
    name_cells = "".join(line.split()[0] for line in body(lines))
    assert name_cells.startswith("a-very-long-tunnel-name-indeed"), lines


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0s"), (59, "59s"), (185, "3m"), (3 * 3600 + 120, "3h02m")]
)
def test_the_age_is_wall_clock_time_since_the_handshake(seconds: float, shown: str) -> None:
    lines = rendered([status(connected_at=NOW - seconds)], 80)
    assert body(lines)[0].split()[3] == shown, lines


def test_an_idle_tunnel_forwards_nothing() -> None:
    """Its one open stream is the proxyme stream that holds its port."""
    lines = rendered([status(open_streams=1, bytes_in=0, bytes_out=0)], 80)
    assert lines[0] == "snocat server: 1 tunnel, 0 forwarded connections"
    assert body(lines)[0].split()[4] == "0", lines


# A real server on a pseudo-terminal ------------------------------------------------


class Terminal:
    """A pseudo-terminal of COLUMNS x ROWS whose output a terminal emulator draws."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self._stream = pyte.ByteStream(self.screen)
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            with self._changed:
                self._stream.feed(data)
                self._changed.notify_all()

    def lines(self) -> list[str]:
        with self._changed:
            return [line.rstrip() for line in self.screen.display]

    def wait(self, condition: Callable[[list[str]], bool], what: str) -> list[str]:
        deadline = time.monotonic() + STEP_TIMEOUT
        with self._changed:
            while True:
                lines = [line.rstrip() for line in self.screen.display]
                if condition(lines):
                    return lines
                if time.monotonic() > deadline:
                    raise AssertionError(f"not on the screen: {what}\n" + "\n".join(lines))
                self._changed.wait(0.2)

    def close(self) -> None:
        for fd in (self.slave, self.master):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    term = Terminal()
    try:
        yield term
    finally:
        term.close()


def server_on_terminal(
    lab: Lab, terminal: Terminal, *extra: str
) -> tuple[subprocess.Popen[bytes], int]:
    certificate, key = lab.certificate("server", "localhost")
    tokens = lab.tokens("tokens", "office-1 s3cret-s3cret-s3cret-1\n")
    tokens.chmod(0o600)
    quic_port = free_udp_port()
    env = {**lab.env, "TERM": "xterm"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "snocat_anyio",
            "server",
            "--cert",
            str(certificate),
            "--key",
            str(key),
            "--tokens",
            str(tokens),
            "--quic",
            f"{HOST}:{quic_port}",
            "--ports",
            "{}:{}".format(*free_port_range()),
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        stdout=terminal.slave,
        stderr=terminal.slave,
        env=env,
        cwd=lab.tmp_path,
        start_new_session=True,
    )
    return process, quic_port


def client_args(lab: Lab, quic_port: int, website: Website, token: str) -> list[str]:
    token_file = lab.tokens(f"{token.split()[0]}-{len(token)}.token", token + "\n")
    token_file.chmod(0o600)
    return [
        "client",
        "--driver",
        f"{HOST}:{quic_port}",
        "--san",
        "localhost",
        "--authority",
        str(lab.tmp_path / "certs" / "server.pub.pem"),
        "--token-file",
        str(token_file),
        "--target",
        f"{HOST}:{website.port}",
        "--backoff-max",
        "1",
    ]


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0


def test_the_live_table_stays_put_under_the_logs(
    lab: Lab, website: Website, terminal: Terminal
) -> None:
    server, quic_port = server_on_terminal(lab, terminal)
    try:
        terminal.wait(lambda lines: any(TITLE.match(line) for line in lines), "the table")
        client = lab.start(*client_args(lab, quic_port, website, "office-1 s3cret-s3cret-s3cret-1"))
        client.wait_line("public address")
        refused = lab.run(*client_args(lab, quic_port, website, "office-1 wrong-wrong-wrong-wrong"))
        assert_one_line_error(refused, 3)

        def settled(lines: list[str]) -> bool:
            """A whole frame (not one caught halfway through a redraw) whose row is 2 s
            old or more."""
            rows = [line.split() for line in lines if line.startswith("office-1 ")]
            return (
                len(rows) == 1
                and rows[0][3] in {f"{n}s" for n in range(2, 60)}
                and sum(1 for line in lines if HEADER.match(line)) == 1
            )

        lines = terminal.wait(settled, "office-1's row, 2 s old or more")
        text = "\n".join(lines)
        titles = [n for n, line in enumerate(lines) if TITLE.match(line)]
        assert len(titles) == 1, text
        title = titles[0]
        assert lines[title] == "snocat server: 1 tunnel, 0 forwarded connections", text
        # The table is the bottom of the screen; the logs, the refusal among them, above.
        assert HEADER.match(lines[title + 1]) and lines[title + 2].startswith("──"), text
        assert [line for line in lines[title + 3 :] if line] == [
            line for line in lines if line.startswith("office-1 ")
        ], text
        above = re.sub(r"\s+", " ", " ".join(lines[:title]))
        assert "a wrong token" in above, text
        assert not any("──" in line for line in lines[:title]), text
        assert all(len(line) <= COLUMNS for line in lines)
    finally:
        stop(server)


def test_plain_turns_the_table_off(lab: Lab, website: Website, terminal: Terminal) -> None:
    server, quic_port = server_on_terminal(lab, terminal, "--plain")
    try:
        terminal.wait(lambda lines: any("listening on" in line for line in lines), "the banner")
        client = lab.start(*client_args(lab, quic_port, website, "office-1 s3cret-s3cret-s3cret-1"))
        client.wait_line("public address")
        terminal.wait(
            lambda lines: "authenticated as 'office-1'" in "".join(lines),
            "the log line of the tunnel",
        )
        time.sleep(1.5)  # a table would have been drawn by now
        lines = terminal.lines()
        assert not any(TITLE.match(line) or "──" in line for line in lines), "\n".join(lines)
        # Plain records: each starts with its timestamp (long ones wrap at 60 columns).
        records = [line for line in lines if LOG_LINE.match(line)]
        assert len(records) >= 2, "\n".join(lines)
    finally:
        stop(server)
