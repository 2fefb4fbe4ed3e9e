"""``snocat server``: the aggregator, its state directory and its tokens."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import ipaddress
import os
import secrets
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import rich_click as click
from click import get_current_context
from rich.markup import escape

from snocat_proto._service.config import ServerConfig
from snocat_proto._service.heap import LongLivedHeap
from snocat_proto._service.ports import PortRange
from snocat_proto._service.tokens import format_tokens
from snocat_proto._wire.auth import SCHEME_SIMPLE_ACK, SCHEME_TOKEN
from snocat_proto._wire.certificates import (
    fingerprint,
    generate_self_signed,
    is_certificate_authority,
    load_certificate_chain,
    load_identity,
    reissue_as_end_entity,
)
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.handshake_rate import DEFAULT_HANDSHAKE_RATE, HandshakeRate
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.network import format_host_port
from snocat_proto._wire.tunnel import LISTEN_KEEPALIVE_INTERVAL

from .._server import TunnelServer
from .._shared_listeners import ListenerBindError
from ._common import (
    DEFAULT_ADMIN_HOST,
    STATE_ENVIRONMENT,
    UsageProblem,
    console,
    default_state_dir,
    logger,
    open_key_log,
    parse_socket_address,
    read_admin_token,
    read_file,
    utc_now,
    warn_if_exposed,
    write_private,
)
from ._config import config_option, loaded_config
from ._group import backend_option, cli, datagram_option, liveness_options
from ._names import server_name_options, server_name_settings
from ._output import live_status, output_options, report, setup_logging
from ._running import run, until_signalled
from ._tokens import TokenReloader, TokenSources, config_tokens
from ._workers import fleet_config, supervise_workers


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
            certificate_pem, key_pem = generate_self_signed(names, now=utc_now())
            state.private_key.unlink(missing_ok=True)
            write_private(state.private_key, key_pem)
            state.certificate.write_bytes(certificate_pem)
            created = True
        else:
            _reissue_old_certificate(state)
        if token_auth and not state.tokens.exists():
            line = {"client-1": secrets.token_urlsafe(24).encode()}
            write_private(state.tokens, format_tokens(line).encode())
            state.client_token.unlink(missing_ok=True)
            write_private(state.client_token, format_tokens(line).encode())
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
        new_pem = reissue_as_end_entity(
            certificate_pem, state.private_key.read_bytes(), now=utc_now()
        )
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


def _limits(max_streams: int, udp_batch: int) -> Limits:
    try:
        return Limits(max_streams_per_tunnel=max_streams, udp_segments_per_call=udp_batch)
    except LocalProtocolError as exc:
        raise UsageProblem(exc.reason) from None


def local_only(host: str) -> str | None:
    """Why clients on other machines cannot dial ``host`` as it is, if they cannot."""
    if host in ("", "localhost"):
        return "loopback"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.is_unspecified:
        return "wildcard"
    if address.is_loopback:
        return "loopback"
    return None


@cli.command()
@config_option(tables=("tokens",))
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
    "--advertise",
    help="HOST:PORT clients (and the other nodes of a fleet) dial; shown in the "
    "`snocat client` line printed at start [default: the --quic address].",
)
@click.option(
    "--ports",
    "ports_text",
    default="8080:8090",
    show_default=True,
    help="Range of public TCP ports handed to clients, START:END.",
)
@click.option(
    "--udp-ports",
    "udp_ports_text",
    help="Range of public UDP ports handed to clients' --udp-target, START:END (they bind "
    "to the --tcp address) [default: none: no UDP is forwarded].",
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
    help="Tokens file: one `NAME SECRET` line per tunnel name. Reloaded on SIGHUP and "
    "when it changes.",
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
@liveness_options(
    keepalive=LISTEN_KEEPALIVE_INTERVAL, who="client (a fallback: clients ping first)"
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where a created certificate and token live "
    f"[default: ${STATE_ENVIRONMENT} or ~/.local/state/snocat].",
)
@click.option(
    "--plain",
    is_flag=True,
    help="No live table on a terminal: plain, timestamped log lines.",
)
@click.option(
    "--registry",
    help="Join a fleet: its registry, redis://[USER:PASSWORD@]HOST:PORT/DB or rediss:// "
    "(TLS); Valkey, or Redis 6.2 or newer. See docs/fleet.md.",
)
@click.option(
    "--registry-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the registry's password (instead of one in the URL).",
)
@click.option(
    "--node",
    "node_name",
    help="This node's name in the fleet [default: host name and QUIC port].",
)
@click.option(
    "--fleet-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the secret the nodes of the fleet prove to each other "
    "(the same on every node; at least 16 characters).",
)
@click.option(
    "--fleet-lease",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=1.0, max=3600.0),
    help="Seconds a node's claims live unless renewed (every third of it): a dead "
    "node's tunnels and ports are free again within this.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0, max=256),
    help="Run N node processes on this machine sharing the QUIC port and the public "
    "ports (needs --registry; 0: one per core).",
)
@click.option(
    "--heap-freeze/--no-heap-freeze",
    default=True,
    show_default=True,
    help="Keep garbage collection off long-lived tunnels: what survives a full "
    "collection is frozen (gc.freeze) and not walked again until it has grown by a "
    "quarter (docs/performance.md).",
)
@click.option("--worker-group", hidden=True)
@click.option("--worker-index", type=int, default=0, hidden=True)
@click.option(
    "--metrics",
    "metrics_address",
    metavar="HOST:PORT",
    help="Serve /metrics (Prometheus) and /status (JSON) over HTTP on this TCP address "
    f"(a bare PORT: {DEFAULT_ADMIN_HOST}:PORT). An address other than loopback needs "
    "--admin-token-file.",
)
@click.option(
    "--metrics-per-tunnel",
    is_flag=True,
    help="Also series per tunnel name on /metrics (for the 100 oldest names; the rest "
    'are summed under name="other").',
)
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A bearer token that /metrics and /status then require (`Authorization: Bearer TOKEN`).",
)
@server_name_options
@datagram_option
@output_options
@backend_option
def server(
    config_path: Path | None,
    cert_path: Path | None,
    key_path: Path | None,
    quic: str,
    advertise: str | None,
    ports_text: str,
    udp_ports_text: str | None,
    tcp_bind: str,
    auth: str,
    tokens_path: Path | None,
    max_tunnels: int,
    max_streams: int,
    handshake_rate: float,
    idle_timeout: float,
    keepalive: float,
    state_dir: Path | None,
    plain: bool,
    registry: str | None,
    registry_password_file: Path | None,
    node_name: str | None,
    fleet_token_file: Path | None,
    fleet_lease: float,
    workers: int | None,
    heap_freeze: bool,
    worker_group: str | None,
    worker_index: int,
    metrics_address: str | None,
    metrics_per_tunnel: bool,
    admin_token_file: Path | None,
    domain: str | None,
    http_listen: str | None,
    tls_listen: str | None,
    proxy_protocol_from: tuple[str, ...],
    max_datagram_size: int | None,
    path_mtu_discovery: bool,
    udp_batch: int,
    log_level: str,
    log_file: Path | None,
    json_mode: bool,
    backend: str,
    loop: str,
) -> None:
    """Run the aggregator: accept tunnels over QUIC and give each client a public TCP port.

    SIGHUP (or a change to the tokens file) reloads the tokens: tunnels whose token is
    unchanged stay up.  With --registry it is a node of a fleet (docs/fleet.md)."""
    setup_logging(log_level, log_file=log_file, plain=plain)
    config_file = loaded_config(get_current_context())
    quic_host, quic_port = parse_socket_address(quic, what="--quic")
    if advertise is not None:
        advertised = parse_socket_address(advertise, what="--advertise")
        if advertised[1] == 0:
            raise UsageProblem("--advertise needs a port, e.g. agg.example.com:9090")
    try:
        port_range = PortRange.parse(ports_text)
        ipaddress.ip_address(tcp_bind)
    except LocalProtocolError as exc:
        raise UsageProblem(f"--ports {ports_text!r}: {exc.reason}") from None
    except ValueError:
        raise UsageProblem(f"--tcp must be an IP address to bind, not {tcp_bind!r}") from None
    udp_port_range = None
    if udp_ports_text is not None:
        try:
            udp_port_range = PortRange.parse(udp_ports_text)
        except LocalProtocolError as exc:
            raise UsageProblem(f"--udp-ports {udp_ports_text!r}: {exc.reason}") from None
    admin = _admin_settings(metrics_address, admin_token_file, metrics_per_tunnel)
    by_name = server_name_settings(domain, http_listen, tls_listen, proxy_protocol_from)
    if admin is not None and worker_index > 1:
        # Each worker serves its own numbers, on the next port up.
        admin = dataclasses.replace(admin, port=admin.port + worker_index - 1)
    if (cert_path is None) != (key_path is None):
        raise UsageProblem("give both --cert and --key, or neither (to use the state directory)")
    token_auth = auth == SCHEME_TOKEN
    inline = config_file is not None and isinstance(config_file.data.get("tokens"), dict)
    if inline and config_file is not None:
        config_tokens(config_file)  # its errors first, with their line
    needs_file = token_auth and tokens_path is None and not inline
    created_state: ServerState | None = None
    if cert_path is None or key_path is None:
        state, created = ensure_server_state(
            state_dir or default_state_dir(), _certificate_names(quic_host), token_auth=needs_file
        )
        cert_path, key_path = state.certificate, state.private_key
        if needs_file:
            tokens_path = state.tokens
        created_state = state
        if created:
            logger.info(
                "created a certificate%s in %s",
                " and a token" if needs_file else "",
                state.certificate.parent,
            )
    certificate_pem = read_file(cert_path, "certificate file")
    key_pem = read_file(key_path, "private key file")
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
    sources: TokenSources | None = None
    tokens: dict[str, bytes] = {}
    pools: frozenset[str] = frozenset()
    if token_auth:
        if tokens_path is None and not inline:
            raise UsageProblem(
                "token authentication needs --tokens FILE (lines 'NAME SECRET') or a "
                "[tokens] table in --config; or use --auth simple-ack for snocat 0.8 clients"
            )
        sources = TokenSources(tokens_path, config_file.path if inline and config_file else None)
        tokens, pools = sources.load_with_pools(config_file)
        if not tokens:
            raise UsageProblem(
                f"{sources.describe()} lists no tunnel names; add lines 'NAME SECRET'"
            )
        if tokens_path is not None:
            warn_if_exposed(tokens_path, "tokens file")
        if sources.config is not None:
            warn_if_exposed(sources.config, "config file (its [tokens])")
    check_port_range(port_range, tcp_bind)
    if worker_group is not None:
        workers = None  # this is one of them
    elif workers is not None and registry is None:
        raise UsageProblem(
            "--workers needs --registry: the workers are nodes of a fleet that share one "
            "registry (docs/fleet.md)"
        )
    fleet = None
    if registry is not None:
        fleet = fleet_config(
            registry,
            registry_password_file,
            node_name,
            advertise,
            (quic_host, quic_port),
            fleet_token_file,
            fleet_lease,
            group=worker_group or "",
        )
    elif node_name or fleet_token_file or registry_password_file:
        raise UsageProblem(
            "--node, --fleet-token-file and --registry-password-file need --registry"
        )
    digest = fingerprint(chain[0])
    if workers is not None:
        assert fleet is not None
        if quic_port == 0:
            raise UsageProblem("--workers share one QUIC port: give --quic HOST:PORT, not port 0")
        count = workers or os.cpu_count() or 1
        _announce_server(
            format_host_port(quic_host, quic_port),
            advertise,
            digest,
            tokens_path,
            created_state,
            json_mode=json_mode,
            workers=count,
        )
        run(functools.partial(supervise_workers, count, fleet.node), backend, loop)
        return
    try:
        config = ServerConfig(
            certificate_pem=certificate_pem,
            private_key_pem=key_pem,
            quic_host=quic_host,
            quic_port=quic_port,
            auth=auth,
            tokens=tokens,
            port_range=port_range,
            udp_port_range=udp_port_range,
            tcp_bind=tcp_bind,
            limits=_limits(max_streams, udp_batch),
            max_tunnels=max_tunnels,
            handshake_rate=HandshakeRate.of(handshake_rate) if handshake_rate else None,
            idle_timeout=idle_timeout,
            keepalive_interval=keepalive or None,
            max_datagram_size=max_datagram_size,
            path_mtu_discovery=path_mtu_discovery,
            secrets_log_file=open_key_log(),
            fleet=fleet,
            quic_reuse_port=worker_group is not None,
            pools=pools,
            **by_name,
        )
    except (ValueError, LocalProtocolError) as exc:
        raise UsageProblem(getattr(exc, "reason", str(exc))) from None
    show_table = not (json_mode or plain) and sys.stderr.isatty()
    # The process is the aggregator's: keep full collections off its long-lived tunnels.
    heap = LongLivedHeap()

    async def main() -> None:
        if fleet is None:
            server = TunnelServer(config)
        else:
            from .._fleet import FleetServer  # imports the store's client

            server = FleetServer(config)
        reloader = TokenReloader(server, sources) if sources is not None else None
        serving = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            await tg.start(until_signalled, serving)
            await tg.start(_reload_on_hangup, reloader)
            tg.start_soon(
                functools.partial(report, server.activity.subscribe(), json_mode=json_mode)
            )
            if admin is not None:
                await _start_admin(tg, server, admin, heap)
            try:
                await tg.start(server.serve)
            except ListenerBindError as exc:
                raise UsageProblem(f"{exc.strerror}; choose another address") from None
            except OSError as exc:
                message = f"cannot listen for tunnels on {quic} (UDP): {exc.strerror or exc}"
                if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                    # Like a taken --ports range: the user picks another --quic.
                    raise UsageProblem(f"{message}; choose another --quic address") from None
                raise OSError(message) from None
            host, port = server.quic_address
            if worker_group is None:  # else the supervisor said it once for all
                _announce_server(
                    format_host_port(host, port),
                    advertise,
                    digest,
                    tokens_path,
                    created_state,
                    json_mode=json_mode,
                )
            if reloader is not None:
                tg.start_soon(reloader.watch)
            if show_table:
                tg.start_soon(live_status, server)
            with serving:  # already cancelled if a signal came during startup
                await anyio.sleep_forever()
            await server.shutdown()
            tg.cancel_scope.cancel()

    if heap_freeze:
        heap.install()
    try:
        run(main, backend, loop)
    finally:
        heap.uninstall()


@dataclass(frozen=True)
class AdminSettings:
    """``--metrics``, ``--metrics-per-tunnel`` and ``--admin-token-file``, checked."""

    text: str
    host: str
    port: int
    token: bytes | None
    per_tunnel: bool


def _admin_settings(
    address: str | None, token_file: Path | None, per_tunnel: bool
) -> AdminSettings | None:
    if address is None:
        for given, flag in (
            (token_file is not None, "--admin-token-file"),
            (per_tunnel, "--metrics-per-tunnel"),
        ):
            if given:
                raise UsageProblem(f"{flag} needs --metrics HOST:PORT")
        return None
    text = f"{DEFAULT_ADMIN_HOST}:{address}" if address.isdigit() else address
    host, port = parse_socket_address(text, what="--metrics")
    token = read_admin_token(token_file) if token_file is not None else None
    if token is None and local_only(host) != "loopback":
        raise UsageProblem(
            f"--metrics {address} can be reached from other machines: give "
            "--admin-token-file FILE (a bearer token), or bind a loopback address"
        )
    return AdminSettings(address, host, port, token, per_tunnel)


async def _start_admin(
    tg: anyio.abc.TaskGroup, server: TunnelServer, settings: AdminSettings, heap: LongLivedHeap
) -> None:
    """Count the server's activity (subscribed before it starts) and serve /metrics and
    /status on its event loop."""
    # Imported here: prometheus_client and h11 cost only the servers that use them.
    from .._admin import AdminServer, admin_routes
    from .._metrics import ServerMetrics

    if server.config.fleet is not None:
        from .._fleet import FleetServer

        assert isinstance(server, FleetServer)
        metrics = ServerMetrics(
            server,
            per_tunnel=settings.per_tunnel,
            registry_health=server.registry_health,
            heap=heap,
        )
    else:
        metrics = ServerMetrics(server, per_tunnel=settings.per_tunnel, heap=heap)
    tg.start_soon(metrics.run)
    admin = AdminServer(admin_routes(metrics), token=settings.token)
    try:
        host, port = await tg.start(admin.serve, settings.host, settings.port)
    except OSError as exc:
        raise UsageProblem(
            f"cannot listen on --metrics {settings.text}: {exc.strerror or exc}; "
            "choose another address"
        ) from None
    logger.info(
        "metrics on http://%s/metrics, status on /status%s",
        format_host_port(host, port),
        " (bearer token required)" if settings.token is not None else "",
    )


async def _reload_on_hangup(
    reloader: TokenReloader | None,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """SIGHUP reloads the tokens (it would kill the process otherwise)."""
    if not hasattr(signal, "SIGHUP"):  # Windows
        task_status.started()
        return
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            if reloader is None:
                logger.info("SIGHUP received: no tokens to reload (--auth simple-ack)")
            else:
                reloader.reload("SIGHUP received")


def _announce_server(
    address: str,
    advertise: str | None,
    digest: str,
    tokens_path: Path | None,
    state: ServerState | None,
    *,
    json_mode: bool,
    workers: int = 0,
) -> None:
    out = console(stderr=json_mode)
    dialed = f"; clients dial [cyan]{escape(advertise)}[/]" if advertise else ""
    processes = f" with {workers} workers" if workers else ""
    out.print(f"[bold]snocat server[/] listening on [cyan]{address}[/] (QUIC){processes}{dialed}")
    out.print(f"certificate SHA-256 fingerprint: {digest}")
    if state is not None and tokens_path == state.tokens:
        driver = advertise or address
        host, port = parse_socket_address(driver, what="--advertise")
        note = ""
        if advertise is None:
            where = local_only(host)
            if where == "loopback":
                note = (
                    f"  # {host} is this machine only: for another machine, start the server "
                    f"with --quic 0.0.0.0:{port} --advertise THIS-HOST:{port}"
                )
            elif where == "wildcard":
                note = (
                    f"  # replace {host} with this machine's address or name "
                    "(or start the server with --advertise HOST:PORT)"
                )
        out.print(
            "\nOn the client machine, copy "
            f"[cyan]{escape(str(state.client_token))}[/] and run:\n"
            f"  snocat client --driver {escape(driver)} --san localhost --fingerprint {digest} "
            f"--token-file client.token --target HOST:PORT{escape(note)}\n"
        )
