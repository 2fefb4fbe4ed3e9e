"""``snocat server --udp-ports`` and ``snocat client --udp-target``, as real processes:
a UDP echo behind the client answers a visitor of the public UDP port, the ``--json``
lines tell the flows and the UDP port, and the port is free again once the client
has gone."""

from __future__ import annotations

import signal
import socket
from contextlib import AbstractContextManager
from pathlib import Path

from cli_harness import (  # noqa: F401 (fixtures)
    HOST,
    Lab,
    free_port_range,
    free_udp_port,
    lab_fixture,
    start_server,
    udp_echo_port,
    udp_port_free,
    wait_until,
)
from test_readme import clone, code_blocks, finish, section, shell, shell_commands  # noqa: F401


def udp_echo() -> AbstractContextManager[int]:
    """A UDP target that answers each datagram upper-cased (so a reply is told from
    its request)."""
    return udp_echo_port(bytes.upper)


def free_udp_range() -> tuple[int, int]:
    for _ in range(50):
        start, end = free_port_range(2)
        if all(udp_port_free(port) for port in range(start, end + 1)):
            return start, end
    raise RuntimeError("no free UDP range")


def test_a_udp_target_is_published_on_a_udp_port_and_given_back(lab: Lab) -> None:
    start, end = free_udp_range()
    aggregator = start_server(lab, "--udp-ports", f"{start}:{end}")
    with udp_echo() as echo_port:
        client = lab.start(
            "client",
            "--driver",
            f"{HOST}:{aggregator.quic_port}",
            "--san",
            "localhost",
            "--authority",
            str(aggregator.certificate),
            "--token-file",
            str(aggregator.client_token),
            "--udp-target",
            f"{HOST}:{echo_port}",
            "--json",
        )
        granted = client.wait_event("port_granted")
        assert granted["protocol"] == "udp"
        assert granted["target"] == f"{HOST}:{echo_port}"
        port = int(str(granted["port"]))
        assert start <= port <= end
        server_grant = aggregator.process.wait_event("port_granted")
        assert (server_grant["port"], server_grant["protocol"]) == (port, "udp")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as visitor:
            visitor.settimeout(5)
            visitor.connect((HOST, port))
            for word in (b"hello", b"udp", b"tunnel"):
                visitor.send(word)
                assert visitor.recv(100) == word.upper()
        opened = aggregator.process.wait_event("udp_flow_opened")
        assert opened["port"] == port
        assert client.wait_event("udp_flow_opened")["target"] == f"{HOST}:{echo_port}"
        client.stop()
        closed = aggregator.process.wait_event("udp_flow_closed")
        assert (closed["datagrams_out"], closed["datagrams_in"]) == (3, 3)
        released = aggregator.process.wait_event("port_released")
        assert (released["port"], released["protocol"]) == (port, "udp")
        wait_until(lambda: udp_port_free(port), 10, "the UDP port to be free")
    aggregator.process.stop()


def test_the_udp_options_come_from_a_config_file_too(lab: Lab) -> None:
    start, end = free_udp_range()
    aggregator = start_server(lab)  # a TCP-only one: the file adds nothing to it
    aggregator.process.stop()
    key = aggregator.certificate.parent / "server.priv.pem"
    config = lab.tokens(
        "server.toml",
        f'cert = "{aggregator.certificate}"\nkey = "{key}"'
        f'\nquic = "{HOST}:{aggregator.quic_port}"\nudp-ports = "{start}:{end}"\njson = true\n'
        f'tokens = "{aggregator.tokens}"\n',
    )
    server = lab.start("server", "--config", str(config))
    server.wait_event("listening_on")
    with udp_echo() as echo_port:
        client_file = lab.tokens(
            "client.toml",
            f'driver = "{HOST}:{aggregator.quic_port}"\nsan = "localhost"\n'
            f'authority = "{aggregator.certificate}"\ntoken-file = "{aggregator.client_token}"\n'
            f'udp-target = ["{start + 1}={HOST}:{echo_port}"]\njson = true\n',
        )
        client = lab.start("client", "--config", str(client_file))
        granted = client.wait_event("port_granted")
        assert (granted["port"], granted["protocol"]) == (start + 1, "udp")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as visitor:
            visitor.settimeout(5)
            visitor.connect((HOST, start + 1))
            visitor.send(b"from the file")
            assert visitor.recv(100) == b"FROM THE FILE"
        client.stop()
    server.stop()


def test_a_client_needs_a_target_of_some_kind(lab: Lab) -> None:
    result = lab.run("client", "--driver", f"{HOST}:9", "--auth", "simple-ack")
    assert result.returncode == 2
    assert "--udp-target" in result.stderr


def test_udp_ports_must_be_a_range(lab: Lab) -> None:
    result = lab.run("server", "--udp-ports", "53")
    assert result.returncode == 2
    assert "--udp-ports '53'" in result.stderr


def test_the_readme_udp_section_as_written(lab: Lab, clone: Path) -> None:  # noqa: F811
    """The README's "Forward UDP" commands, ports moved to free ones, a UDP echo in
    place of the resolver (the ``dig`` line is left out: not every machine has it)."""
    setup = shell_commands(
        code_blocks(section("Three terminals: a real aggregator and client"), "sh")[0]
    )
    for command in setup[:2]:  # the certificate and the office-1 token
        finish(shell(lab, clone, command))
    server_command, client_command, dig = shell_commands(
        code_blocks(section("Forward UDP (DNS, WireGuard, game servers)"), "sh")[0]
    )
    assert dig.startswith("dig @127.0.0.1 -p 9053")
    quic_port, (start, end) = free_udp_port(), free_udp_range()
    tcp_start, tcp_end = free_port_range()
    with udp_echo() as echo_port:

        def ported(command: str) -> str:
            return (
                command.replace("127.0.0.1:9090", f"{HOST}:{quic_port}")
                .replace("9053:9063", f"{start}:{end}")
                .replace("127.0.0.1:53", f"{HOST}:{echo_port}")
            )

        server = shell(
            lab,
            clone,
            f"exec {ported(server_command)} --quic {HOST}:{quic_port} "
            f"--ports {tcp_start}:{tcp_end}",
        )
        server.wait_line("listening on", stream="stderr")
        client = shell(lab, clone, "exec " + ported(client_command))
        match = client.wait_line(
            rf"public address \(UDP\): 127\.0\.0\.1:(\d+) -> forwards to "
            rf"127\.0\.0\.1:{echo_port}"
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as visitor:
            visitor.settimeout(5)
            visitor.connect((HOST, int(match.group(1))))
            visitor.send(b"example.com?")
            assert visitor.recv(100) == b"EXAMPLE.COM?"
        client.send(signal.SIGTERM)
        finish(client)
        server.send(signal.SIGTERM)
        finish(server)
