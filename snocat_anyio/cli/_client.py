"""``snocat client``: dial an aggregator and publish local targets."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import anyio
import rich_click as click
from click import get_current_context
from click.core import ParameterSource
from rich.markup import escape

from snocat_proto._service import activity
from snocat_proto._service.config import ClientConfig
from snocat_proto._service.tokens import parse_single_token
from snocat_proto._wire.auth import SCHEME_SIMPLE_ACK, SCHEME_TOKEN, ClientCredentials
from snocat_proto._wire.certificates import load_certificate_chain, parse_fingerprint
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.network import format_host_port
from snocat_proto._wire.targets import ProxyTcpTarget
from snocat_proto._wire.tunnel import CONNECT_KEEPALIVE_INTERVAL
from snocat_proto._wire.udp_flows import UdpTarget

from .._client import TunnelClient
from ._common import (
    TOKEN_ENVIRONMENT,
    UsageProblem,
    console,
    logger,
    open_key_log,
    parse_publication,
    parse_socket_address,
    parse_udp_publication,
    read_file,
    warn_if_exposed,
)
from ._config import config_option
from ._group import backend_option, cli, datagram_option, liveness_options
from ._names import client_name_options, client_name_settings
from ._output import output_options, report, setup_logging
from ._running import run, until_signalled
from ._targets import watch_targets

#: ``--keepalive`` when more than one ``--driver`` is given and it is not set: an idle
#: client then notices a dead node within this plus the probe answer timeout (3 s).
FAILOVER_KEEPALIVE = 3.0


def load_client_token(token_file: Path | None) -> tuple[str, bytes] | None:
    if token_file is not None:
        text = read_file(token_file, "token file").decode("utf-8", "replace")
        source = str(token_file)
    elif os.environ.get(TOKEN_ENVIRONMENT):
        text = os.environ[TOKEN_ENVIRONMENT]
        source = f"${TOKEN_ENVIRONMENT}"
    else:
        return None
    try:
        token = parse_single_token(text, source=source)
    except LocalProtocolError as exc:
        raise UsageProblem(exc.reason) from None
    if token_file is not None:
        warn_if_exposed(token_file, "token file")
    return token


@cli.command()
@config_option()
@click.option(
    "--driver",
    "drivers",
    required=True,
    multiple=True,
    help="The aggregator's QUIC address, HOST:PORT. Repeat for the nodes of a fleet: the "
    "client fails over to the next one (a name with several addresses counts as a list) "
    f"and pings every {FAILOVER_KEEPALIVE:g} s unless --keepalive says otherwise.",
)
@click.option(
    "--san",
    "server_name",
    help="Name the aggregator's certificate must carry [default: the --driver host].",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    help="HOST:PORT to forward to; only these (and --http, --tls) are ever connected. Each "
    "gets a public port of its own; PUBLIC=HOST:PORT asks for that public port (a refusal "
    "if the aggregator cannot give it). Repeat for more.",
)
@click.option(
    "--udp-target",
    "udp_targets",
    multiple=True,
    help="UDP HOST:PORT to forward to (an aggregator with --udp-ports): each gets a public "
    "UDP port of its own; PUBLIC=HOST:PORT asks for that one. Only these are ever sent "
    "to. Repeat for more.",
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
@liveness_options(keepalive=CONNECT_KEEPALIVE_INTERVAL, who="aggregator (keeps NAT mappings open)")
@client_name_options
@datagram_option
@output_options
@backend_option
def client(
    config_path: Path | None,
    drivers: tuple[str, ...],
    server_name: str | None,
    targets: tuple[str, ...],
    udp_targets: tuple[str, ...],
    authority: Path | None,
    pin: str | None,
    auth: str,
    token_file: Path | None,
    reconnect: bool,
    backoff_max: float,
    idle_timeout: float,
    keepalive: float,
    http_target: str | None,
    tls_target: str | None,
    proxy_protocol: str | None,
    max_datagram_size: int | None,
    path_mtu_discovery: bool,
    udp_batch: int,
    log_level: str,
    log_file: Path | None,
    json_mode: bool,
    backend: str,
    loop: str,
) -> None:
    """Dial an aggregator, publish a local target on a public port, and keep it up."""
    setup_logging(log_level, log_file=log_file)
    servers = []
    for driver in drivers:
        server = parse_socket_address(driver, what="--driver")
        if server[1] == 0:
            raise UsageProblem("--driver needs a port, e.g. example.org:9090")
        servers.append(server)
    (host, port), *more_servers = servers
    source = get_current_context().get_parameter_source("keepalive")
    if more_servers and source is ParameterSource.DEFAULT:
        # Nodes of a fleet: notice a dead one within seconds even when idle, and fail
        # over (a ping every few seconds is a few bytes).
        keepalive = FAILOVER_KEEPALIVE
    by_name = client_name_settings(http_target, tls_target, proxy_protocol)
    if not targets and not udp_targets and not (http_target or tls_target):
        raise UsageProblem(
            "give at least one --target HOST:PORT (or --udp-target, --http, --tls HOST:PORT)"
        )
    publications = [parse_publication(t) for t in targets]
    parsed_targets = tuple(target for target, _ in publications)
    if len(set(parsed_targets)) != len(parsed_targets):
        raise UsageProblem("--target: each target may be given once")
    public_ports = {target: public for target, public in publications if public is not None}
    if len(set(public_ports.values())) != len(public_ports):
        raise UsageProblem("--target: two targets ask for the same public port")
    udp_publications = [parse_udp_publication(t) for t in udp_targets]
    parsed_udp = tuple(target for target, _ in udp_publications)
    if len(set(parsed_udp)) != len(parsed_udp):
        raise UsageProblem("--udp-target: each UDP target may be given once")
    udp_public = {target: public for target, public in udp_publications if public is not None}
    all_public: dict[ProxyTcpTarget | UdpTarget, int] = {}
    for tcp_target, public in public_ports.items():
        all_public[tcp_target] = public
    for udp_target, public in udp_public.items():
        all_public[udp_target] = public
    if len(set(udp_public.values())) != len(udp_public):
        raise UsageProblem("--udp-target: two UDP targets ask for the same public port")
    if pin is not None:
        try:
            parse_fingerprint(pin)
        except LocalProtocolError as exc:
            raise UsageProblem(f"--fingerprint: {exc.reason}") from None
    authority_pem = None
    if authority is not None:
        authority_pem = read_file(authority, "authority file")
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
            more_servers=tuple(more_servers),
            server_name=server_name or host,
            targets=parsed_targets,
            udp_targets=parsed_udp,
            public_ports=all_public,
            credentials=credentials,
            authority_pem=authority_pem,
            fingerprint=pin,
            reconnect=reconnect,
            backoff_max=backoff_max,
            backoff_initial=min(0.5, backoff_max),
            idle_timeout=idle_timeout,
            keepalive_interval=keepalive or None,
            max_datagram_size=max_datagram_size,
            path_mtu_discovery=path_mtu_discovery,
            limits=Limits(udp_segments_per_call=udp_batch),
            secrets_log_file=open_key_log(),
            **by_name,
        )
    except (ValueError, LocalProtocolError) as exc:
        raise UsageProblem(getattr(exc, "reason", str(exc))) from None

    async def main() -> None:
        tunnel_client = TunnelClient(config)
        out = console(stderr=json_mode)

        def show(record: activity.Activity) -> None:
            # A reconnect is told once, by the client's own log line ("reconnecting in").
            if isinstance(record, activity.PortGranted):
                # Escaped: the addresses and reasons come from the aggregator.
                addresses = escape(", ".join(record.addresses))
                udp = " (UDP)" if record.protocol == "udp" else ""
                out.print(
                    f"[bold green]public address{udp}:[/] [bold]{addresses}[/] "
                    f"-> forwards to [bold]{escape(record.target)}[/]"
                )

        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(
                    report,
                    tunnel_client.activity.subscribe(),
                    json_mode=json_mode,
                    on_record=None if json_mode else show,
                )
            )
            with anyio.CancelScope() as running:
                await tg.start(until_signalled, running)
                dialled = " or ".join(format_host_port(*server) for server in servers)
                out.print(f"connecting to {dialled} ...")
                tg.start_soon(watch_targets, config.allowed_targets)
                await tunnel_client.run()
            await tunnel_client.aclose()
            tg.cancel_scope.cancel()

    run(main, backend, loop)
