"""The flags of reaching tunnels by name (docs/protocol.md 3.14, 3.18), for ``snocat
server`` and ``snocat client``: checked here, turned into config fields."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import rich_click as click

from snocat_proto._service.visitors import TrustedNetworks
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.names import TunnelDomain
from snocat_proto._wire.targets import ProxyTcpTarget

from ._common import UsageProblem, parse_socket_address, parse_target


def server_name_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--domain``, ``--http``, ``--tls``, ``--accept-proxy-protocol-from``."""
    function = click.option(
        "--accept-proxy-protocol-from",
        "proxy_protocol_from",
        metavar="CIDR",
        multiple=True,
        help="A load balancer's network: its connections to the public listeners (ports "
        "and shared) must start with a PROXY protocol header (v1 or v2), which says who "
        "the visitor is; from elsewhere a PROXY header is refused. Repeatable.",
    )(function)
    function = click.option(
        "--tls",
        "tls_listen",
        metavar="HOST:PORT",
        help="A shared TLS listener: each connection goes to the tunnel its ClientHello's "
        "SNI names (NAME.DOMAIN), without terminating TLS. Needs --domain.",
    )(function)
    function = click.option(
        "--http",
        "http_listen",
        metavar="HOST:PORT",
        help="A shared plain HTTP/1.x listener: each connection goes to the tunnel its "
        "first request's Host names (NAME.DOMAIN). Needs --domain.",
    )(function)
    return click.option(
        "--domain",
        help="Reach tunnels by name: NAME.DOMAIN is the tunnel named NAME, on --http and --tls.",
    )(function)


def server_name_settings(
    domain: str | None,
    http_listen: str | None,
    tls_listen: str | None,
    proxy_protocol_from: tuple[str, ...],
) -> dict[str, Any]:
    """The ``ServerConfig`` fields these flags set, or a :class:`UsageProblem`."""
    settings: dict[str, Any] = {}
    if domain is not None:
        try:
            settings["domain"] = TunnelDomain.parse(domain)
        except LocalProtocolError as exc:
            raise UsageProblem(exc.reason) from None
    for flag, text, key in (
        ("--http", http_listen, "http_listen"),
        ("--tls", tls_listen, "tls_listen"),
    ):
        if text is None:
            continue
        if domain is None:
            raise UsageProblem(f"{flag} routes by name: give --domain DOMAIN too")
        settings[key] = parse_socket_address(text, what=flag)
    if domain is not None and http_listen is None and tls_listen is None:
        raise UsageProblem("--domain needs a shared listener: --http HOST:PORT or --tls HOST:PORT")
    try:
        settings["proxy_protocol_from"] = TrustedNetworks(proxy_protocol_from)
    except LocalProtocolError as exc:
        raise UsageProblem(exc.reason) from None
    return settings


def client_name_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--http``, ``--tls``, ``--proxy-protocol``."""
    function = click.option(
        "--proxy-protocol",
        type=click.Choice(["v1", "v2"]),
        help="Write a PROXY protocol header with the visitor's address to the target "
        "before its first byte (UNKNOWN when the aggregator does not say, e.g. snocat 0.8).",
    )(function)
    function = click.option(
        "--tls",
        "tls_target",
        metavar="HOST:PORT",
        help="Publish this TLS target by name: the aggregator's --tls listener sends "
        "NAME.DOMAIN's connections (by SNI) to it, TLS end to end.",
    )(function)
    return click.option(
        "--http",
        "http_target",
        metavar="HOST:PORT",
        help="Publish this HTTP target by name: the aggregator's --http listener sends "
        "NAME.DOMAIN's requests (by Host) to it.",
    )(function)


def client_name_settings(
    http_target: str | None, tls_target: str | None, proxy_protocol: str | None
) -> dict[str, Any]:
    """The ``ClientConfig`` fields these flags set, or a :class:`UsageProblem`."""
    http: ProxyTcpTarget | None = None
    tls: ProxyTcpTarget | None = None
    if http_target is not None:
        http = parse_target(http_target, what="--http")
    if tls_target is not None:
        tls = parse_target(tls_target, what="--tls")
    version = None if proxy_protocol is None else int(proxy_protocol.removeprefix("v"))
    return {"http_target": http, "tls_target": tls, "proxy_protocol": version}
