"""What every command shares: exit statuses, the one-line error, consoles, and the
parsing of addresses, files and targets (each mistake a :class:`UsageProblem`)."""

from __future__ import annotations

import datetime
import functools
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn, TextIO

import rich_click as click
from rich.console import Console
from rich.markup import escape

from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.network import parse_host_port
from snocat_proto._wire.targets import ProxyTcpTarget
from snocat_proto._wire.udp_flows import UdpTarget

logger = logging.getLogger("snocat")

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_AUTHENTICATION = 3
EXIT_CONNECT = 4

TOKEN_ENVIRONMENT = "SNOCAT_TOKEN"
ADMIN_ENVIRONMENT = "SNOCAT_ADMIN"
#: What ``--metrics PORT`` binds, and ``snocat status`` asks without ``--admin``.
DEFAULT_ADMIN_HOST = "127.0.0.1"
DEFAULT_ADMIN_PORT = 9100
#: The shortest admin bearer token (as for tunnel secrets).
MIN_ADMIN_TOKEN_LENGTH = 16
STATE_ENVIRONMENT = "SNOCAT_STATE_DIR"
LOOP_ENVIRONMENT = "SNOCAT_LOOP"


class UsageProblem(click.ClickException):
    """A one-line configuration error (exit status 2)."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        print_error(self.format_message())


def print_error(message: str) -> None:
    """The one ``error:`` line on stderr (also in the ``--log-file``, if there is one)."""
    if logs_to_file():
        logger.error("%s", message)
    stderr_console().print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def fail(message: str, code: int) -> NoReturn:
    print_error(message)
    raise SystemExit(code)


def logs_to_file() -> bool:
    return any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers)


def console(*, stderr: bool) -> Console:
    """A console for messages: stderr's is shared (logs and the live table use it too,
    so one knows where the other is on the screen)."""
    return stderr_console() if stderr else _stdout_console()


def _make_console(*, stderr: bool) -> Console:
    # soft_wrap: a line is never broken at the terminal width (or at 80 columns when
    # piped), so messages stay one line and printed commands stay copy-pasteable.
    # emoji=False: rich would turn the ":AB:" / ":CD:" inside a fingerprint into emoji.
    return Console(stderr=stderr, soft_wrap=True, emoji=False)


@functools.cache
def stderr_console() -> Console:
    return _make_console(stderr=True)


@functools.cache
def _stdout_console() -> Console:
    return _make_console(stderr=False)


# Parsing ---------------------------------------------------------------------


def parse_socket_address(text: str, *, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; every address flag goes through here."""
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise UsageProblem(f"{what} {exc}") from None


def parse_target(text: str, *, what: str = "--target") -> ProxyTcpTarget:
    parse_socket_address(text, what=what)  # its messages (a URL, brackets) for every flag
    try:
        return ProxyTcpTarget.parse_host_port(text)
    except LocalProtocolError as exc:
        raise UsageProblem(f"{what} {text!r}: {exc.reason}") from None


def parse_publication(text: str) -> tuple[ProxyTcpTarget, int | None]:
    """``--target``: ``HOST:PORT``, or ``PUBLIC=HOST:PORT`` asking for a public port."""
    target_text, public = _split_public(text, "--target")
    return parse_target(target_text), public


def parse_udp_publication(text: str) -> tuple[UdpTarget, int | None]:
    """``--udp-target``: ``HOST:PORT``, or ``PUBLIC=HOST:PORT`` asking for a public
    UDP port."""
    target_text, public = _split_public(text, "--udp-target")
    parse_socket_address(target_text, what="--udp-target")
    try:
        return UdpTarget.parse_host_port(target_text), public
    except LocalProtocolError as exc:
        raise UsageProblem(f"--udp-target {target_text!r}: {exc.reason}") from None


def _split_public(text: str, what: str) -> tuple[str, int | None]:
    public_text, sep, target_text = text.partition("=")
    if not sep:
        return text, None
    if not public_text.isdigit() or not 1 <= int(public_text) <= 65535:
        raise UsageProblem(
            f"{what} {text!r}: the public port before '=' must be a number in 1..65535"
        )
    return target_text, int(public_text)


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageProblem(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


def read_admin_token(path: Path) -> bytes:
    """The bearer token of ``--admin-token-file`` (one line; surrounding blanks ignored)."""
    raw = read_file(path, "--admin-token-file")
    token = raw.strip()
    if len(token) < MIN_ADMIN_TOKEN_LENGTH or any(byte < 0x21 or byte > 0x7E for byte in token):
        raise UsageProblem(
            f"--admin-token-file {str(path)!r} must hold one token of at least "
            f"{MIN_ADMIN_TOKEN_LENGTH} visible ASCII characters, no spaces "
            f"(e.g. openssl rand -hex 32 > {shlex.quote(str(path))})"
        )
    warn_if_exposed(path, "admin token file")
    return token


def warn_if_exposed(path: Path, what: str) -> None:
    """A file holding secrets that other users may read (or change) gets a warning."""
    if sys.platform == "win32":
        return
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        quoted = shlex.quote(str(path))
        logger.warning(
            "%s %s is readable by other users (mode %04o): it holds secrets; chmod 600 %s",
            what,
            quoted,
            mode,
            quoted,
        )


def open_key_log() -> TextIO | None:
    """``SSLKEYLOGFILE``, as browsers and curl honour it (for Wireshark)."""
    path = os.environ.get("SSLKEYLOGFILE")
    if not path:
        return None
    try:
        return open(path, "a", encoding="ascii")
    except OSError as exc:
        raise UsageProblem(f"cannot open SSLKEYLOGFILE {path!r}: {exc.strerror}") from None


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only (0600); never overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def default_state_dir() -> Path:
    explicit = os.environ.get(STATE_ENVIRONMENT)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "snocat"
