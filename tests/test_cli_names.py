"""``snocat server --domain --http --tls --accept-proxy-protocol-from`` and ``snocat client
--http --tls --proxy-protocol`` as real processes, visited by real curl and Python's ssl:
reaching tunnels by name (docs/protocol.md 3.14), the visitor's address (3.18), pools."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_harness import (  # noqa: F401 (fixtures)
    HOST,
    STEP_TIMEOUT,
    Lab,
    Snocat,
    assert_one_line_error,
    free_port_range,
    free_tcp_port,
    free_udp_port,
    lab_fixture,
)
from names_harness import (
    DOMAIN,
    FQDN,
    Website,
    read_all,
    start_proxy_target,
    start_tls_target,
    tls_digest,
    website,
)

from snocat_proto._wire.proxy_protocol import ProxyAddresses, encode_v2

CURL = shutil.which("curl") or "/usr/bin/curl"
OFFICE = "office-1 office-1-secret-0123456789"
POOL = "pool-1 pool-1-secret-0123456789ab pool"


@pytest.fixture(scope="module")
def site() -> Iterator[Website]:
    with website() as found:
        yield found


class Named:
    """A running ``snocat server`` with shared listeners, and where they are."""

    def __init__(self, lab: Lab, *extra: str, tokens: str = OFFICE) -> None:
        lab.certificate("server", "localhost")
        self.lab = lab
        self.certificate = lab.tmp_path / "certs" / "server.pub.pem"
        self.quic = free_udp_port()
        self.http = free_tcp_port()
        self.tls = free_tcp_port()
        lab.tokens("tokens", tokens + "\n")
        ports = free_port_range()
        self.process = lab.start(
            "server",
            "--cert",
            str(self.certificate),
            "--key",
            str(lab.tmp_path / "certs" / "server.priv.pem"),
            "--quic",
            f"{HOST}:{self.quic}",
            "--ports",
            f"{ports[0]}:{ports[1]}",
            "--tokens",
            str(lab.tmp_path / "tokens"),
            "--idle-timeout",
            "3",
            "--domain",
            DOMAIN,
            "--http",
            f"{HOST}:{self.http}",
            "--tls",
            f"{HOST}:{self.tls}",
            "--json",
            *extra,
        )
        self.process.wait_event("listening_on")

    def client(self, token_line: str, *extra: str) -> Snocat:
        name = token_line.split()[0]
        token = self.lab.tokens(f"{name}.token", " ".join(token_line.split()[:2]) + "\n")
        return self.lab.start(
            "client",
            "--driver",
            f"{HOST}:{self.quic}",
            "--san",
            "localhost",
            "--authority",
            str(self.certificate),
            "--token-file",
            str(token),
            "--backoff-max",
            "1",
            *extra,
        )


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CURL, "--silent", "--show-error", "--max-time", "30", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_curl_reaches_a_tunnel_by_name(lab: Lab, site: Website, tmp_path: Path) -> None:
    server = Named(lab)
    client = server.client(OFFICE, "--http", f"{HOST}:{site.port}", "--json")
    granted = client.wait_event("port_granted")
    assert granted["addresses"] == [f"{FQDN}:{server.http}"]
    resolve = f"{FQDN}:{server.http}:{HOST}"
    base = f"http://{FQDN}:{server.http}"
    # 4 MiB, checksummed.
    out = tmp_path / "big"
    done = curl("--resolve", resolve, "-o", str(out), f"{base}/big")
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == site.digest
    # Keep-alive: three requests on one connection.
    before = len(site.connections)
    done = curl(
        "-v",
        "--resolve",
        resolve,
        f"{base}/who",
        f"{base}/big",
        f"{base}/who",
        "-o",
        os.devnull,
        "-o",
        os.devnull,
        "-o",
        os.devnull,
    )
    assert done.returncode == 0, done.stderr
    assert "Re-using existing connection" in done.stderr, done.stderr
    assert len(site.connections) == before + 1
    # A name nobody has: a 404 that names it.
    other = f"nobody.{DOMAIN}:{server.http}:{HOST}"
    done = curl("--resolve", other, "-w", "%{http_code}", f"http://nobody.{DOMAIN}:{server.http}/")
    assert done.stdout == "no tunnel named nobody\n404"
    # The stream events name the tunnel and the visitor, on both sides.
    closed = server.process.wait_event("stream_closed")
    assert closed["name"] == "office-1" and str(closed["visitor"]).startswith(f"{HOST}:")
    on_client = client.wait_event("stream_closed")
    assert on_client["name"] == "office-1" and on_client["visitor"] == closed["visitor"]
    assert on_client["address"] == f"/proxy-tcp/dns/{HOST}/tcp/{site.port}"


def test_tls_by_name_through_the_processes(lab: Lab, tmp_path: Path) -> None:
    target, listener = start_tls_target(tmp_path / "tls")
    try:
        server = Named(lab)
        client = server.client(OFFICE, "--tls", f"{HOST}:{target.port}", "--json")
        client.wait_event("port_granted")
        data = os.urandom(256 * 1024)
        assert tls_digest(server.tls, target.certificate, data) == hashlib.sha256(data).hexdigest()
        with pytest.raises(OSError, match=r"UNRECOGNIZED_NAME|unrecognized name"):
            tls_digest(server.tls, target.certificate, b"x", server_name=f"nobody.{DOMAIN}")
    finally:
        listener.close()


def test_the_target_sees_the_address_a_trusted_load_balancer_claimed(lab: Lab) -> None:
    target, listener = start_proxy_target()
    try:
        server = Named(lab, "--accept-proxy-protocol-from", "127.0.0.0/8")
        client = server.client(
            OFFICE, "--target", f"{HOST}:{target.port}", "--proxy-protocol", "v1", "--json"
        )
        port = int(client.wait_event("port_granted")["port"])  # type: ignore[call-overload]
        claimed = ProxyAddresses.from_sockaddrs(("203.0.113.9", 4444), ("198.51.100.1", 443))
        # The "load balancer": a connection from 127.0.0.1 that starts with a v2 header.
        with socket.create_connection((HOST, port), timeout=STEP_TIMEOUT) as sock:
            sock.sendall(encode_v2(claimed) + b"ping")
            sock.shutdown(socket.SHUT_WR)
            answer = read_all(sock)
        assert answer == b"203.0.113.9 4444 198.51.100.1 443\nping"
        # From it, a connection without a header is refused.
        with socket.create_connection((HOST, port), timeout=STEP_TIMEOUT) as sock:
            sock.sendall(b"no header")
            sock.shutdown(socket.SHUT_WR)
            assert read_all(sock) == b""
    finally:
        listener.close()


def test_a_pool_of_two_clients_and_one_killed_midway(lab: Lab) -> None:
    with website("a") as site_a, website("b") as site_b:
        server = Named(lab, tokens=POOL)
        members = {
            b"a": server.client(POOL, "--http", f"{HOST}:{site_a.port}", "--json"),
            b"b": server.client(POOL, "--http", f"{HOST}:{site_b.port}", "--json"),
        }
        for member in members.values():
            member.wait_event("port_granted")
        host = f"pool-1.{DOMAIN}"
        seen: Counter[bytes] = Counter()
        before_kill: dict[bytes, int] = {}
        for number in range(200):
            if number == 100:
                members[b"a"].kill()  # kill -9: its tunnel lingers until the idle timeout
                before_kill = dict(seen)
            connection = http.client.HTTPConnection(HOST, server.http, timeout=30)
            try:
                connection.request("GET", "/who", headers={"Host": host})
                response = connection.getresponse()
                assert response.status == 200, (number, response.read())
                seen[response.read()] += 1
            finally:
                connection.close()
        # A fair share each while both served; every later connection succeeded.
        assert before_kill == {b"a": 50, b"b": 50}, before_kill
        assert seen[b"a"] + seen[b"b"] == 200 and seen[b"a"] <= 51


def test_name_flags_that_do_not_fit_are_one_line_errors(lab: Lab) -> None:
    certificate, key = lab.certificate("server", "localhost")
    tokens = lab.tokens("tokens", OFFICE + "\n")
    common = ["server", "--cert", str(certificate), "--key", str(key), "--tokens", str(tokens)]
    result = lab.run(*common, "--http", f"{HOST}:0")
    assert "give --domain" in assert_one_line_error(result, 2)
    result = lab.run(*common, "--domain", "tunnels.example.com")
    assert "--http HOST:PORT or --tls" in assert_one_line_error(result, 2)
    result = lab.run(*common, "--domain", "bad_domain", "--http", f"{HOST}:0")
    assert "--domain" in assert_one_line_error(result, 2)
    result = lab.run(*common, "--accept-proxy-protocol-from", "10.0.0.0/33")
    assert "not an IP network" in assert_one_line_error(result, 2)
    taken = socket.create_server((HOST, 0))
    try:
        busy = taken.getsockname()[1]
        result = lab.run(
            *common,
            "--quic",
            f"{HOST}:{free_udp_port()}",
            "--domain",
            DOMAIN,
            "--http",
            f"{HOST}:{busy}",
        )
        assert f"--http {HOST}:{busy}" in assert_one_line_error(result, 2)
    finally:
        taken.close()
    token = lab.tokens("office.token", OFFICE + "\n")
    result = lab.run("client", "--driver", f"{HOST}:9", "--token-file", str(token))
    assert "--target" in assert_one_line_error(result, 2)


def test_token_add_makes_a_pool(lab: Lab) -> None:
    tokens = lab.tmp_path / "tokens"
    result = lab.run("token", "add", "pool-1", "--pool", "--tokens", str(tokens))
    assert result.returncode == 0, result.stderr
    name, secret = result.stdout.split()  # the client's line: no flag
    assert name == "pool-1"
    assert tokens.read_text() == f"pool-1 {secret} pool\n"
