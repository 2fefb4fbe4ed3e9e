"""``snocat demo``: an aggregator and a client in one process, over loopback QUIC."""

from __future__ import annotations

import functools
import secrets
from pathlib import Path

import anyio
import rich_click as click

from snocat_proto._service.config import ClientConfig, ServerConfig
from snocat_proto._service.ports import PortRange
from snocat_proto._wire.auth import ClientCredentials
from snocat_proto._wire.certificates import generate_self_signed
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.network import format_host_port

from .._client import TunnelClient
from .._server import TunnelServer
from ._common import UsageProblem, console, parse_target, utc_now
from ._group import backend_option, cli, datagram_option
from ._output import output_options, report, setup_logging
from ._running import run, until_signalled
from ._server import check_port_range
from ._targets import watch_targets

DEMO_TUNNEL_NAME = "demo"


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
@datagram_option
@output_options
@backend_option
def demo(
    target: str,
    ports_text: str,
    tcp_bind: str,
    max_datagram_size: int | None,
    path_mtu_discovery: bool,
    udp_batch: int,
    log_level: str,
    log_file: Path | None,
    json_mode: bool,
    backend: str,
    loop: str,
) -> None:
    """Aggregator and client in one process over real loopback QUIC, with a fresh certificate
    and token: the quickest way to see a tunnel work."""
    setup_logging(log_level, log_file=log_file)
    parsed_target = parse_target(target)
    try:
        port_range = PortRange.parse(ports_text)
    except LocalProtocolError as exc:
        raise UsageProblem(f"--ports {ports_text!r}: {exc.reason}") from None
    check_port_range(port_range, tcp_bind)
    certificate_pem, key_pem = generate_self_signed(["localhost"], now=utc_now())
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
        path_mtu_discovery=path_mtu_discovery,
        limits=Limits(udp_segments_per_call=udp_batch),
    )

    async def main() -> None:
        tunnel_server = TunnelServer(server_config)
        out = console(stderr=json_mode)
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(report, tunnel_server.activity.subscribe(), json_mode=json_mode)
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
                path_mtu_discovery=path_mtu_discovery,
                limits=Limits(udp_segments_per_call=udp_batch),
            )
            tunnel_client = TunnelClient(client_config)
            with anyio.CancelScope() as running:
                await tg.start(until_signalled, running)
                tg.start_soon(watch_targets, (parsed_target,))
                await tg.start(tunnel_client.run)
                addresses = await tunnel_client.wait_granted()
                out.print(
                    f"[bold green]demo tunnel up:[/] connect to [bold]{', '.join(addresses)}[/] "
                    f"-> {parsed_target} (through QUIC on {format_host_port(host, port)}). "
                    "Ctrl-C stops."
                )
                await anyio.sleep_forever()
            await tunnel_client.aclose()
            await tunnel_server.shutdown()
            tg.cancel_scope.cancel()

    run(main, backend, loop)
