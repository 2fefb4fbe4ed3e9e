"""The ``snocat`` command: ``cert``, ``server``, ``client`` and ``demo``.

The reference's flags (``snocat-cli`` 0.8) keep their names and meaning; everything
else is an addition.  Every mistake a user can make ends in one line that says what
to do and a non-zero exit status, never a traceback:

====  ==============================================================
code  meaning
====  ==============================================================
0     finished (including a graceful stop on Ctrl-C / SIGTERM)
1     a runtime failure (a socket error, an unexpected exception)
2     a usage or configuration error (flags, files, port range)
3     authentication failed (wrong token, scheme mismatch)
4     the aggregator could not be reached or its certificate is not trusted
====  ==============================================================
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import importlib.util
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

import anyio
import anyio.abc
import rich_click as click
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from snocat_proto._service import activity
from snocat_proto._service.config import (
    DEFAULT_MAX_DATAGRAM_SIZE,
    MAX_DATAGRAM_SIZE_LIMIT,
    ClientConfig,
    ServerConfig,
)
from snocat_proto._service.ports import PortRange
from snocat_proto._service.tokens import format_tokens, parse_single_token, parse_tokens
from snocat_proto._wire.auth import SCHEME_SIMPLE_ACK, SCHEME_TOKEN, ClientCredentials
from snocat_proto._wire.certificates import (
    fingerprint,
    generate_self_signed,
    is_certificate_authority,
    load_certificate_chain,
    load_identity,
    parse_fingerprint,
    reissue_as_end_entity,
)
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.handshake_rate import DEFAULT_HANDSHAKE_RATE, HandshakeRate
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.network import format_host_port, parse_host_port
from snocat_proto._wire.targets import ProxyTcpTarget
from snocat_proto._wire.tunnel import CONNECT_KEEPALIVE_INTERVAL, LISTEN_KEEPALIVE_INTERVAL

from ._client import TunnelClient
from ._errors import AuthenticationError, ConnectError, SnocatError
from ._feed import Subscription
from ._server import TunnelServer

logger = logging.getLogger("snocat")

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_AUTHENTICATION = 3
EXIT_CONNECT = 4

TOKEN_ENVIRONMENT = "SNOCAT_TOKEN"
STATE_ENVIRONMENT = "SNOCAT_STATE_DIR"
LOOP_ENVIRONMENT = "SNOCAT_LOOP"
DEMO_TUNNEL_NAME = "demo"

click.rich_click.USE_MARKDOWN = True


class UsageProblem(click.ClickException):
    """A one-line configuration error (exit status 2)."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        _print_error(self.format_message())


def _print_error(message: str) -> None:
    _err_console().print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def _fail(message: str, code: int) -> NoReturn:
    _print_error(message)
    raise SystemExit(code)


def _console(*, stderr: bool) -> Console:
    # soft_wrap: a line is never broken at the terminal width (or at 80 columns when
    # piped), so messages stay one line and printed commands stay copy-pasteable.
    # emoji=False: rich would turn the ":AB:" / ":CD:" inside a fingerprint into emoji.
    return Console(stderr=stderr, soft_wrap=True, emoji=False)


def _err_console() -> Console:
    return _console(stderr=True)


# Parsing ---------------------------------------------------------------------


def parse_socket_address(text: str, *, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise UsageProblem(f"{what} {exc}") from None


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageProblem(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


def _parse_target(text: str) -> ProxyTcpTarget:
    try:
        return ProxyTcpTarget.parse_host_port(text)
    except LocalProtocolError as exc:
        raise UsageProblem(f"--target {text!r}: {exc.reason}") from None


def _open_key_log() -> TextIO | None:
    """``SSLKEYLOGFILE``, as browsers and curl honour it (for Wireshark)."""
    path = os.environ.get("SSLKEYLOGFILE")
    if not path:
        return None
    try:
        return open(path, "a", encoding="ascii")
    except OSError as exc:
        raise UsageProblem(f"cannot open SSLKEYLOGFILE {path!r}: {exc.strerror}") from None


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only (0600); never overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# Output ------------------------------------------------------------------------


def _setup_logging(level: str) -> None:
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(console=_err_console(), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level.upper() != "DEBUG":
        # aioquic logs each connection's details at INFO and the errors snocat already
        # reports in its own words (an untrusted certificate...) at WARNING: noise
        # unless debugging, with or without --json.
        logging.getLogger("quic").setLevel(logging.ERROR)


async def _report(
    subscription: Subscription,
    *,
    json_mode: bool,
    on_record: Callable[[activity.Activity], None] | None = None,
) -> None:
    """Print every activity record: JSON lines on stdout, or log lines on stderr.

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


def _status_table(server: TunnelServer, now: float) -> Table:
    table = Table(title=f"snocat server: {len(server.tunnels())} tunnel(s)", expand=False)
    for column in ("name", "peer", "port", "age", "streams", "in", "out"):
        table.add_column(
            column, justify="right" if column in ("age", "streams", "in", "out") else "left"
        )
    for status in server.tunnels():
        table.add_row(
            status.name,
            status.peer,
            ", ".join(map(str, status.ports)) or "-",
            _duration(now - status.connected_at),
            str(status.open_streams),
            _size(status.bytes_in),
            _size(status.bytes_out),
        )
    return table


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(count)


async def _live_status(server: TunnelServer) -> None:
    """A live table of tunnels while attached to a terminal."""
    console = Console(stderr=True)
    with Live(
        _status_table(server, anyio.current_time()), console=console, refresh_per_second=2
    ) as live:
        while True:
            await anyio.sleep(1)
            live.update(_status_table(server, anyio.current_time()))


# Running -----------------------------------------------------------------------


async def _until_signalled(
    scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Ctrl-C / SIGTERM cancel ``scope`` (a graceful stop); a second one exits at once.

    Start it with ``tg.start`` before announcing anything: a signal sent as soon as the
    process says it is ready must find the handler installed (else SIGTERM kills it).
    """
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if scope.cancel_called:
                os._exit(130)
            logger.info("%s received: shutting down (again to force)", signal.Signals(signum).name)
            scope.cancel()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


#: Which error decides the message and exit status, most specific first.
_EXIT_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (AuthenticationError, EXIT_AUTHENTICATION),
    (ConnectError, EXIT_CONNECT),
    (UsageProblem, EXIT_USAGE),
    (LocalProtocolError, EXIT_USAGE),
    (OSError, EXIT_RUNTIME),
    (SnocatError, EXIT_RUNTIME),
)


def _run(main: Callable[[], Awaitable[None]], backend: str, loop: str) -> None:
    """Run ``main``, mapping an error to one line and an exit status (no traceback)."""
    options = run_options(backend, loop, uvloop_installed=_uvloop_installed())
    try:
        anyio.run(main, backend=backend, backend_options=options)
    except Exception as exc:
        leaves = _leaves(exc)
        for kind, status in _EXIT_STATUS:
            for leaf in leaves:
                if isinstance(leaf, kind):
                    if isinstance(leaf, UsageProblem):
                        _fail(leaf.format_message(), status)
                    _fail(
                        leaf.reason if isinstance(leaf, LocalProtocolError) else str(leaf), status
                    )
        logger.debug("unexpected error", exc_info=exc)
        _fail(f"unexpected error: {leaves[0]!r} (details with --log-level debug)", EXIT_RUNTIME)


#: Whether ``--loop auto`` takes uvloop when it is installed.  Not now: measured on
#: the tunnel (docs/performance.md, table (g)), uvloop cost 1.1-2x the CPU per MB of
#: asyncio's own loop, moved fewer MB/s and opened streams no faster.
AUTO_PREFERS_UVLOOP = False


def run_options(backend: str, loop: str, *, uvloop_installed: bool) -> dict[str, Any]:
    """``anyio.run``'s ``backend_options`` for ``--backend`` and ``--loop``.

    ``auto`` is uvloop if it is installed and :data:`AUTO_PREFERS_UVLOOP` (it was
    measured faster), else asyncio's own loop; ``uvloop`` insists on it.  Trio has
    one loop of its own: ``--loop`` does not apply."""
    if backend != "asyncio":
        return {}
    if loop == "uvloop" and not uvloop_installed:
        raise UsageProblem("--loop uvloop: uvloop is not installed (pip install 'snocat[fast]')")
    use_uvloop = loop == "uvloop" or (loop == "auto" and AUTO_PREFERS_UVLOOP and uvloop_installed)
    return {"use_uvloop": use_uvloop}


def _uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def _backend_option(function: Callable[..., Any]) -> Callable[..., Any]:
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


def _datagram_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--max-datagram-size",
        default=DEFAULT_MAX_DATAGRAM_SIZE,
        show_default=True,
        type=click.IntRange(DEFAULT_MAX_DATAGRAM_SIZE, MAX_DATAGRAM_SIZE_LIMIT),
        help="Largest UDP payload to send. The default fits every internet path; "
        "1452 suits an Ethernet LAN, 8952 jumbo frames, larger values loopback "
        "(see docs/performance.md).",
    )(function)


def _liveness_options(*, keepalive: float, who: str) -> Callable[..., Any]:
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


def _output_options(function: Callable[..., Any]) -> Callable[..., Any]:
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
        help="How much to log on stderr.",
    )(function)


# The command group -------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="snocat")
def cli() -> None:
    """Forward TCP over authenticated, encrypted QUIC tunnels (wire-compatible with snocat 0.8).

    Try it in one command: `snocat demo --target 127.0.0.1:8000`.
    """


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--san",
    "sans",
    multiple=True,
    default=("localhost",),
    show_default=True,
    help="A name (DNS name or IP address) the certificate is valid for; repeat for more.",
)
def cert(path: Path, sans: tuple[str, ...]) -> None:
    """Write a self-signed certificate `PATH.pub.pem` and its key `PATH.priv.pem` (mode 0600)."""
    public = path.with_name(path.name + ".pub.pem")
    private = path.with_name(path.name + ".priv.pem")
    for existing in (public, private):
        if existing.exists():
            raise UsageProblem(f"{existing} already exists; remove it or choose another PATH")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        certificate_pem, key_pem = generate_self_signed(list(sans), now=_now())
        _write_private(private, key_pem)
        public.write_bytes(certificate_pem)
    except OSError as exc:
        raise UsageProblem(
            f"cannot write the certificate at {path}: {exc.strerror or exc}"
        ) from None
    except LocalProtocolError as exc:
        raise UsageProblem(exc.reason) from None
    digest = fingerprint(load_certificate_chain(certificate_pem)[0])
    click.echo(f"certificate: {public}")
    click.echo(f"private key: {private} (mode 0600)")
    click.echo(f"SHA-256 fingerprint: {digest}")


# server ------------------------------------------------------------------------


def default_state_dir() -> Path:
    explicit = os.environ.get(STATE_ENVIRONMENT)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "snocat"


@dataclass(frozen=True)
class ServerState:
    """What ``snocat server`` creates once in its state directory when not given files."""

    certificate: Path
    private_key: Path
    tokens: Path
    client_token: Path


def ensure_server_state(
    directory: Path, names: list[str], *, token_auth: bool
) -> tuple[ServerState, bool]:
    """Create the certificate (and a token) on first use; returns (paths, created_now).

    A CA certificate left by an older snocat is re-issued as an end entity
    (:func:`_reissue_old_certificate`)."""
    state = ServerState(
        certificate=directory / "server.pub.pem",
        private_key=directory / "server.priv.pem",
        tokens=directory / "tokens",
        client_token=directory / "client.token",
    )
    created = False
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not state.certificate.exists() or not state.private_key.exists():
            certificate_pem, key_pem = generate_self_signed(names, now=_now())
            state.private_key.unlink(missing_ok=True)
            _write_private(state.private_key, key_pem)
            state.certificate.write_bytes(certificate_pem)
            created = True
        else:
            _reissue_old_certificate(state)
        if token_auth and not state.tokens.exists():
            line = {"client-1": secrets.token_urlsafe(24).encode()}
            _write_private(state.tokens, format_tokens(line).encode())
            state.client_token.unlink(missing_ok=True)
            _write_private(state.client_token, format_tokens(line).encode())
            created = True
    except OSError as exc:
        raise UsageProblem(
            f"cannot prepare the state directory {directory}: {exc.strerror or exc}"
        ) from None
    return state, created


#: Where :func:`_reissue_old_certificate` keeps the certificate it replaced.
OLD_CERTIFICATE_SUFFIX = ".ca-old"


def _reissue_old_certificate(state: ServerState) -> None:
    """Replace a state directory's CA certificate (snocat before the end-entity fix)
    with an end-entity one, same key and names: snocat-cli 0.8 refuses the old one
    (webpki: CaUsedAsEndEntity).  The old file stays beside it; docs/security.md."""
    certificate_pem = state.certificate.read_bytes()
    try:
        chain = load_certificate_chain(certificate_pem, source=str(state.certificate))
        if not is_certificate_authority(chain[0]):
            return
        new_pem = reissue_as_end_entity(certificate_pem, state.private_key.read_bytes(), now=_now())
    except LocalProtocolError as exc:
        # Leave it be: the server's own checks report a broken identity.
        logger.warning("cannot re-issue the certificate in %s: %s", state.certificate, exc.reason)
        return
    backup = state.certificate.with_name(state.certificate.name + OLD_CERTIFICATE_SUFFIX)
    backup.write_bytes(certificate_pem)
    staged = state.certificate.with_name(state.certificate.name + ".new")
    staged.write_bytes(new_pem)
    staged.replace(state.certificate)
    logger.warning(
        "re-issued %s as an end-entity certificate (same key and names): it was a CA "
        "certificate, which snocat-cli 0.8 clients refuse (CaUsedAsEndEntity); the old one "
        "is kept as %s. Its SHA-256 fingerprint changed from %s to %s: give snocat clients "
        "the new --fingerprint, or the new file with --authority",
        state.certificate,
        backup.name,
        fingerprint(chain[0]),
        fingerprint(load_certificate_chain(new_pem)[0]),
    )


def _certificate_names(host: str) -> list[str]:
    names = ["localhost"]
    with contextlib.suppress(OSError):
        names.append(socket.gethostname())
    if host not in ("0.0.0.0", "::", "") and host not in names:
        names.append(host)
    names.append("127.0.0.1")
    return list(dict.fromkeys(names))


def check_port_range(port_range: PortRange, bind: str) -> None:
    """Fail early when not one port of the range can be bound on ``bind``."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    last_error: OSError | None = None
    for port in port_range:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            if sys.platform != "win32":
                # As the real listener binds (anyio sets it): connections of a previous
                # run in TIME_WAIT must not make the port look taken.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((bind, port))
            except OSError as exc:
                last_error = exc
                if exc.errno not in (98, 48, 13):  # EADDRINUSE (Linux, BSD), EACCES
                    break
                continue
            return
    reason = last_error.strerror if last_error is not None else "no port"
    raise UsageProblem(
        f"no port of --ports {port_range} can be bound on --tcp {bind} ({reason}); "
        "choose a free range or another address"
    )


def _limits(max_streams: int) -> Limits:
    try:
        return Limits(max_streams_per_tunnel=max_streams)
    except LocalProtocolError as exc:
        raise UsageProblem(exc.reason) from None


@cli.command()
@click.option(
    "--cert",
    "cert_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Certificate PEM (`PATH.pub.pem`). "
    "Without --cert/--key one is created in the state directory.",
)
@click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Private key PEM (`PATH.priv.pem`).",
)
@click.option(
    "--quic",
    default="127.0.0.1:9090",
    show_default=True,
    help="UDP address the aggregator listens on for tunnels.",
)
@click.option(
    "--ports",
    "ports_text",
    default="8080:8090",
    show_default=True,
    help="Range of public TCP ports handed to clients, START:END.",
)
@click.option(
    "--tcp",
    "tcp_bind",
    default="127.0.0.1",
    show_default=True,
    help="Address the public ports bind to (0.0.0.0 for all interfaces).",
)
@click.option(
    "--auth",
    type=click.Choice([SCHEME_TOKEN, SCHEME_SIMPLE_ACK]),
    default=SCHEME_TOKEN,
    show_default=True,
    help="Authentication: per-tunnel tokens, or snocat 0.8's credential-free SimpleAck.",
)
@click.option(
    "--tokens",
    "tokens_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Tokens file: one `NAME SECRET` line per tunnel name.",
)
@click.option(
    "--max-tunnels",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most tunnels at once.",
)
@click.option(
    "--max-streams",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most concurrent streams per tunnel.",
)
@click.option(
    "--handshake-rate",
    default=DEFAULT_HANDSHAKE_RATE.per_second,
    show_default=True,
    type=click.FloatRange(min=0, max=1e6),
    help="New tunnels per second one client address (IPv6: /64) may start, in bursts "
    "of 5 s worth; over it, attempts are refused until it slows down (0: no limit).",
)
@_liveness_options(
    keepalive=LISTEN_KEEPALIVE_INTERVAL, who="client (a fallback: clients ping first)"
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where a created certificate and token live "
    f"[default: ${STATE_ENVIRONMENT} or ~/.local/state/snocat].",
)
@_datagram_option
@_output_options
@_backend_option
def server(
    cert_path: Path | None,
    key_path: Path | None,
    quic: str,
    ports_text: str,
    tcp_bind: str,
    auth: str,
    tokens_path: Path | None,
    max_tunnels: int,
    max_streams: int,
    handshake_rate: float,
    idle_timeout: float,
    keepalive: float,
    state_dir: Path | None,
    max_datagram_size: int,
    log_level: str,
    json_mode: bool,
    backend: str,
    loop: str,
) -> None:
    """Run the aggregator: accept tunnels over QUIC and give each client a public TCP port."""
    _setup_logging(log_level)
    quic_host, quic_port = parse_socket_address(quic, what="--quic")
    try:
        port_range = PortRange.parse(ports_text)
        ipaddress.ip_address(tcp_bind)
    except LocalProtocolError as exc:
        raise UsageProblem(f"--ports {ports_text!r}: {exc.reason}") from None
    except ValueError:
        raise UsageProblem(f"--tcp must be an IP address to bind, not {tcp_bind!r}") from None
    if (cert_path is None) != (key_path is None):
        raise UsageProblem("give both --cert and --key, or neither (to use the state directory)")
    token_auth = auth == SCHEME_TOKEN
    created_state: ServerState | None = None
    if cert_path is None or key_path is None:
        state, created = ensure_server_state(
            state_dir or default_state_dir(),
            _certificate_names(quic_host),
            token_auth=token_auth and tokens_path is None,
        )
        cert_path, key_path = state.certificate, state.private_key
        if token_auth and tokens_path is None:
            tokens_path = state.tokens
        created_state = state
        if created:
            logger.info(
                "created a certificate%s in %s",
                " and a token" if token_auth else "",
                state.certificate.parent,
            )
    certificate_pem = _read_file(cert_path, "certificate file")
    key_pem = _read_file(key_path, "private key file")
    try:
        chain, _ = load_identity(
            certificate_pem,
            key_pem,
            certificate_source=f"certificate file {cert_path}",
            key_source=f"private key file {key_path}",
        )
    except LocalProtocolError as exc:
        raise UsageProblem(exc.reason) from None
    if is_certificate_authority(chain[0]):
        logger.warning(
            "%s is a CA certificate (basicConstraints CA:TRUE): snocat-cli 0.8 clients "
            "refuse it as the server's own (CaUsedAsEndEntity); `snocat cert` makes an "
            "end-entity one",
            cert_path,
        )
    tokens: dict[str, bytes] = {}
    if token_auth:
        if tokens_path is None:
            raise UsageProblem(
                "token authentication needs --tokens FILE (lines 'NAME SECRET'); "
                "or use --auth simple-ack for snocat 0.8 clients"
            )
        try:
            tokens = parse_tokens(
                _read_file(tokens_path, "tokens file").decode("utf-8", "replace"),
                source=str(tokens_path),
            )
        except LocalProtocolError as exc:
            raise UsageProblem(exc.reason) from None
        if not tokens:
            raise UsageProblem(f"{tokens_path} lists no tunnel names; add lines 'NAME SECRET'")
    check_port_range(port_range, tcp_bind)
    try:
        config = ServerConfig(
            certificate_pem=certificate_pem,
            private_key_pem=key_pem,
            quic_host=quic_host,
            quic_port=quic_port,
            auth=auth,
            tokens=tokens,
            port_range=port_range,
            tcp_bind=tcp_bind,
            limits=_limits(max_streams),
            max_tunnels=max_tunnels,
            handshake_rate=HandshakeRate.of(handshake_rate) if handshake_rate else None,
            idle_timeout=idle_timeout,
            keepalive_interval=keepalive or None,
            max_datagram_size=max_datagram_size,
            secrets_log_file=_open_key_log(),
        )
    except (ValueError, LocalProtocolError) as exc:
        raise UsageProblem(getattr(exc, "reason", str(exc))) from None
    digest = fingerprint(chain[0])

    async def main() -> None:
        server = TunnelServer(config)
        serving = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            await tg.start(_until_signalled, serving)
            tg.start_soon(
                functools.partial(_report, server.activity.subscribe(), json_mode=json_mode)
            )
            try:
                await tg.start(server.serve)
            except OSError as exc:
                message = f"cannot listen for tunnels on {quic} (UDP): {exc.strerror or exc}"
                if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                    # Like a taken --ports range: the user picks another --quic.
                    raise UsageProblem(f"{message}; choose another --quic address") from None
                raise OSError(message) from None
            host, port = server.quic_address
            address = format_host_port(host, port)
            _announce_server(address, digest, tokens_path, created_state, json_mode=json_mode)
            if not json_mode and sys.stderr.isatty():
                tg.start_soon(_live_status, server)
            with serving:  # already cancelled if a signal came during startup
                await anyio.sleep_forever()
            await server.shutdown()
            tg.cancel_scope.cancel()

    _run(main, backend, loop)


def _announce_server(
    address: str,
    digest: str,
    tokens_path: Path | None,
    state: ServerState | None,
    *,
    json_mode: bool,
) -> None:
    out = _console(stderr=json_mode)
    out.print(f"[bold]snocat server[/] listening on [cyan]{address}[/] (QUIC)")
    out.print(f"certificate SHA-256 fingerprint: {digest}")
    if state is not None and tokens_path == state.tokens:
        out.print(
            "\nOn the client machine, copy "
            f"[cyan]{escape(str(state.client_token))}[/] and run:\n"
            f"  snocat client --driver {address} --san localhost --fingerprint {digest} "
            f"--token-file client.token --target HOST:PORT\n"
        )


# client ------------------------------------------------------------------------


def load_client_token(token_file: Path | None) -> tuple[str, bytes] | None:
    if token_file is not None:
        text = _read_file(token_file, "token file").decode("utf-8", "replace")
        source = str(token_file)
    elif os.environ.get(TOKEN_ENVIRONMENT):
        text = os.environ[TOKEN_ENVIRONMENT]
        source = f"${TOKEN_ENVIRONMENT}"
    else:
        return None
    try:
        return parse_single_token(text, source=source)
    except LocalProtocolError as exc:
        raise UsageProblem(exc.reason) from None


@cli.command()
@click.option("--driver", required=True, help="The aggregator's QUIC address, HOST:PORT.")
@click.option(
    "--san",
    "server_name",
    help="Name the aggregator's certificate must carry [default: the --driver host].",
)
@click.option(
    "--target",
    "targets",
    required=True,
    multiple=True,
    help="HOST:PORT to forward to; only these are ever connected. The first is published.",
)
@click.option(
    "--authority",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM certificate(s) to trust for the aggregator [default: the system's roots].",
)
@click.option(
    "--fingerprint",
    "pin",
    help="Trust exactly the aggregator certificate with this SHA-256 fingerprint.",
)
@click.option(
    "--auth",
    type=click.Choice([SCHEME_TOKEN, SCHEME_SIMPLE_ACK]),
    default=SCHEME_TOKEN,
    show_default=True,
    help="Authentication scheme; simple-ack talks to snocat 0.8 aggregators.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"File with one `NAME SECRET` line [or ${TOKEN_ENVIRONMENT}='NAME SECRET'].",
)
@click.option(
    "--reconnect/--no-reconnect",
    default=True,
    show_default=True,
    help="Reconnect when the tunnel is lost.",
)
@click.option(
    "--backoff-max",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Longest wait between reconnect attempts, in seconds.",
)
@_liveness_options(keepalive=CONNECT_KEEPALIVE_INTERVAL, who="aggregator (keeps NAT mappings open)")
@_datagram_option
@_output_options
@_backend_option
def client(
    driver: str,
    server_name: str | None,
    targets: tuple[str, ...],
    authority: Path | None,
    pin: str | None,
    auth: str,
    token_file: Path | None,
    reconnect: bool,
    backoff_max: float,
    idle_timeout: float,
    keepalive: float,
    max_datagram_size: int,
    log_level: str,
    json_mode: bool,
    backend: str,
    loop: str,
) -> None:
    """Dial an aggregator, publish a local target on a public port, and keep it up."""
    _setup_logging(log_level)
    host, port = parse_socket_address(driver, what="--driver")
    if port == 0:
        raise UsageProblem("--driver needs a port, e.g. example.org:9090")
    parsed_targets = tuple(_parse_target(t) for t in targets)
    if pin is not None:
        try:
            parse_fingerprint(pin)
        except LocalProtocolError as exc:
            raise UsageProblem(f"--fingerprint: {exc.reason}") from None
    authority_pem = None
    if authority is not None:
        authority_pem = _read_file(authority, "authority file")
        try:
            load_certificate_chain(authority_pem, source=f"--authority {authority}")
        except LocalProtocolError as exc:
            raise UsageProblem(exc.reason) from None
    if auth == SCHEME_TOKEN:
        token = load_client_token(token_file)
        if token is None:
            raise UsageProblem(
                "token authentication needs --token-file FILE or "
                f"{TOKEN_ENVIRONMENT}='NAME SECRET' "
                "(or --auth simple-ack for a snocat 0.8 aggregator)"
            )
        credentials = ClientCredentials.token(*token)
    else:
        logger.warning("SimpleAck carries no credentials: anyone can pose as this client")
        credentials = ClientCredentials.simple_ack()
    try:
        config = ClientConfig(
            server_host=host,
            server_port=port,
            server_name=server_name or host,
            targets=parsed_targets,
            credentials=credentials,
            authority_pem=authority_pem,
            fingerprint=pin,
            reconnect=reconnect,
            backoff_max=backoff_max,
            backoff_initial=min(0.5, backoff_max),
            idle_timeout=idle_timeout,
            keepalive_interval=keepalive or None,
            max_datagram_size=max_datagram_size,
            secrets_log_file=_open_key_log(),
        )
    except (ValueError, LocalProtocolError) as exc:
        raise UsageProblem(getattr(exc, "reason", str(exc))) from None

    async def main() -> None:
        tunnel_client = TunnelClient(config)
        console = _console(stderr=json_mode)

        def show(record: activity.Activity) -> None:
            if isinstance(record, activity.PortGranted):
                # Escaped: the addresses and reasons come from the aggregator.
                addresses = escape(", ".join(record.addresses))
                console.print(
                    f"[bold green]public address:[/] [bold]{addresses}[/] "
                    f"-> forwards to [bold]{parsed_targets[0]}[/]"
                )
            elif isinstance(record, activity.Reconnecting):
                console.print(
                    f"[yellow]{escape(record.reason)}; reconnecting in {record.delay:.1f} s "
                    f"(attempt {record.attempt})[/]"
                )

        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(
                    _report,
                    tunnel_client.activity.subscribe(),
                    json_mode=json_mode,
                    on_record=None if json_mode else show,
                )
            )
            with anyio.CancelScope() as running:
                await tg.start(_until_signalled, running)
                console.print(f"connecting to {format_host_port(host, port)} ...")
                await tunnel_client.run()
            await tunnel_client.aclose()
            tg.cancel_scope.cancel()

    _run(main, backend, loop)


# demo --------------------------------------------------------------------------


@cli.command()
@click.option(
    "--target",
    required=True,
    help="Local HOST:PORT to publish, e.g. a web server on 127.0.0.1:8000.",
)
@click.option(
    "--ports",
    "ports_text",
    default="8080:8090",
    show_default=True,
    help="Public port range, START:END.",
)
@click.option(
    "--tcp",
    "tcp_bind",
    default="127.0.0.1",
    show_default=True,
    help="Address the public port binds to.",
)
@_datagram_option
@_output_options
@_backend_option
def demo(
    target: str,
    ports_text: str,
    tcp_bind: str,
    max_datagram_size: int,
    log_level: str,
    json_mode: bool,
    backend: str,
    loop: str,
) -> None:
    """Aggregator and client in one process over real loopback QUIC, with a fresh certificate
    and token: the quickest way to see a tunnel work."""
    _setup_logging(log_level)
    parsed_target = _parse_target(target)
    try:
        port_range = PortRange.parse(ports_text)
    except LocalProtocolError as exc:
        raise UsageProblem(f"--ports {ports_text!r}: {exc.reason}") from None
    check_port_range(port_range, tcp_bind)
    certificate_pem, key_pem = generate_self_signed(["localhost"], now=_now())
    secret = secrets.token_urlsafe(24).encode()
    server_config = ServerConfig(
        certificate_pem=certificate_pem,
        private_key_pem=key_pem,
        quic_host="127.0.0.1",
        quic_port=0,
        tokens={DEMO_TUNNEL_NAME: secret},
        port_range=port_range,
        tcp_bind=tcp_bind,
        max_datagram_size=max_datagram_size,
    )

    async def main() -> None:
        tunnel_server = TunnelServer(server_config)
        console = _console(stderr=json_mode)
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(_report, tunnel_server.activity.subscribe(), json_mode=json_mode)
            )
            await tg.start(tunnel_server.serve)
            host, port = tunnel_server.quic_address
            client_config = ClientConfig(
                server_host=host,
                server_port=port,
                server_name="localhost",
                targets=(parsed_target,),
                credentials=ClientCredentials.token(DEMO_TUNNEL_NAME, secret),
                authority_pem=certificate_pem,
                max_datagram_size=max_datagram_size,
            )
            tunnel_client = TunnelClient(client_config)
            with anyio.CancelScope() as running:
                await tg.start(_until_signalled, running)
                await tg.start(tunnel_client.run)
                addresses = await tunnel_client.wait_granted()
                console.print(
                    f"[bold green]demo tunnel up:[/] connect to [bold]{', '.join(addresses)}[/] "
                    f"-> {parsed_target} (through QUIC on {format_host_port(host, port)}). "
                    "Ctrl-C stops."
                )
                await anyio.sleep_forever()
            await tunnel_client.aclose()
            await tunnel_server.shutdown()
            tg.cancel_scope.cancel()

    _run(main, backend, loop)


def main() -> None:
    """The console script: click's own usage errors also end in one line, not a box."""
    try:
        status = cli.main(standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _fail(exc.format_message() + hint, exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        _fail("aborted", 130)
    raise SystemExit(status if isinstance(status, int) else 0)
