"""``snocat server --metrics`` and ``snocat status`` as real processes: a real server
and client on loopback, a download through the tunnel, then ``/metrics`` scraped and
parsed as Prometheus would (``prometheus_client.parser``), ``/status`` read, and the
status command run.  The admin endpoint's token and bounds are checked against the
real server too; tests/test_admin.py covers them in detail, tests/test_metrics.py
the collector.  Nothing here asserts how long anything took."""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any

import pytest
from cli_harness import (  # noqa: F401 (fixtures)
    BIG_FILE_SIZE,
    HOST,
    STEP_TIMEOUT,
    TOKEN,
    Aggregator,
    Lab,
    Website,
    assert_one_line_error,
    fetch_ok,
    free_port_range,
    free_tcp_port,
    free_udp_port,
    lab_fixture,
    public_port,
    start_client,
    start_server,
    wait_until,
    website_fixture,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from snocat_anyio._metrics import PER_TUNNEL_NAMES
from snocat_anyio.cli import cli

ADMIN_TOKEN = "admin-s3cret-0123456789abcdef"
WRONG_TOKEN = "alpha wrong-wrong-wrong-wrong\n"
#: Every secret a test's files hold: none may appear in what the admin endpoint says.
SECRETS = (
    TOKEN.split()[1],
    "b3ta-b3ta-b3ta-b3ta-2",  # cli_harness's tokens file, second line
    WRONG_TOKEN.split()[1],
    ADMIN_TOKEN,
)


def get(port: int, path: str, token: str | None = None) -> tuple[int, dict[str, str], str]:
    connection = http.client.HTTPConnection(HOST, port, timeout=STEP_TIMEOUT)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read().decode()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


def scrape(port: int, token: str | None = None) -> list[Sample]:
    status, headers, body = get(port, "/metrics", token)
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    return [sample for family in text_string_to_metric_families(body) for sample in family.samples]


def value(samples: list[Sample], metric: str, /, **labels: str) -> float:
    found = [s.value for s in samples if s.name == metric and s.labels == labels]
    assert len(found) == 1, (metric, labels, [s for s in samples if s.name == metric])
    return found[0]


def status_document(port: int, token: str | None = None) -> dict[str, Any]:
    status, headers, body = get(port, "/status", token)
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    document = json.loads(body)
    assert isinstance(document, dict)
    return document


def bodies(port: int, token: str | None = None) -> str:
    return get(port, "/metrics", token)[2] + get(port, "/status", token)[2]


def with_metrics(lab: Lab, *extra: str) -> tuple[Aggregator, int]:
    """A ``snocat server --metrics`` on a free loopback port (up once it says so)."""
    admin_port = free_tcp_port()
    aggregator = start_server(lab, "--metrics", f"{HOST}:{admin_port}", *extra)
    aggregator.process.wait_line(rf"metrics on http://{HOST}:{admin_port}/metrics", stream="stderr")
    return aggregator, admin_port


def test_a_real_server_and_client_scraped_read_and_shown(lab: Lab, website: Website) -> None:
    aggregator, admin = with_metrics(lab, "--metrics-per-tunnel")
    client = start_client(lab, aggregator, website.port)
    port = public_port(client)
    fetch_ok(port, website, "big.bin")
    # A refused login: the wrong secret for alpha.
    wrong = lab.tokens("wrong.token", WRONG_TOKEN)
    refused = lab.run(
        "client",
        "--driver",
        f"{HOST}:{aggregator.quic_port}",
        "--san",
        "localhost",
        "--authority",
        str(aggregator.certificate),
        "--token-file",
        str(wrong),
        "--target",
        f"{HOST}:{website.port}",
    )
    assert_one_line_error(refused, 3)

    failures = "snocat_authentication_failures_total"
    wait_until(
        lambda: value(scrape(admin), failures, reason="bad_credential") == 1,
        STEP_TIMEOUT,
        "the refused login counted",
    )
    samples = scrape(admin)
    assert value(samples, "snocat_tunnels") == 1
    assert value(samples, "snocat_ports_in_use") == 1
    assert value(samples, "snocat_port_range_size") == 4  # cli_harness's free_port_range()
    assert value(samples, "snocat_received_bytes_total") >= BIG_FILE_SIZE
    assert value(samples, "snocat_sent_bytes_total") > 0  # the request went the other way
    assert sum(s.value for s in samples if s.name == failures) == 1
    assert value(samples, "snocat_handshakes_started_total") >= 2
    assert value(samples, "snocat_handshakes_completed_total") >= 2
    assert value(samples, "snocat_authentications_total") == 1
    assert value(samples, "snocat_registry_up", registry="embedded") == 1
    [build] = [s for s in samples if s.name == "snocat_build_info"]
    assert build.labels["version"]
    # The heap policy is on by default: the modules and the tunnel are frozen.
    assert value(samples, "snocat_gc_frozen_objects") > 10_000
    assert value(samples, "snocat_gc_full_collections_total", kind="deep") >= 0
    # Per tunnel (asked for): alpha, and "other" for what is beyond the bound.
    received = {
        s.labels["name"]: s.value for s in samples if s.name == "snocat_tunnel_received_bytes_total"
    }
    assert set(received) == {"alpha", "other"}
    assert received["alpha"] >= BIG_FILE_SIZE and received["other"] == 0
    assert value(samples, "snocat_tunnel_ports", name="alpha") == 1

    # The download's stream may still be closing (its relay ends after the visitor's
    # last read): wait until the tunnel carries no visitor.
    wait_until(
        lambda: status_document(admin)["tunnels"][0]["connections"] == 0,
        STEP_TIMEOUT,
        "the download's stream closed",
    )
    document = status_document(admin)
    node = document["node"]
    assert isinstance(node, dict)
    assert node["quic"] == f"{HOST}:{aggregator.quic_port}" and node["version"]
    assert isinstance(node["uptime"], float)
    [tunnel] = document["tunnels"]
    assert tunnel["name"] == "alpha" and tunnel["ports"] == [port]
    assert tunnel["bytes_in"] >= BIG_FILE_SIZE and tunnel["connections"] == 0
    assert isinstance(tunnel["age"], float) and tunnel["open_streams"] == 1
    # The same numbers as /metrics (both from the TunnelStatus the live table shows):
    # the tunnel is idle now, so two reads agree.
    assert tunnel["bytes_in"] == value(
        scrape(admin), "snocat_tunnel_received_bytes_total", name="alpha"
    )

    shown = lab.run("status", "--admin", f"http://{HOST}:{admin}")
    assert shown.returncode == 0, shown.stderr
    assert "alpha" in shown.stdout and str(port) in shown.stdout
    assert f"{HOST}:{aggregator.quic_port}" in shown.stdout
    as_json = lab.run("status", "--admin", str(admin), "--json")  # a bare port works too
    assert as_json.returncode == 0, as_json.stderr
    assert [t["name"] for t in json.loads(as_json.stdout)["tunnels"]] == ["alpha"]

    text = bodies(admin)
    assert not [secret for secret in SECRETS if secret in text]


def test_the_admin_token_and_the_bounds_on_a_real_server(lab: Lab) -> None:
    token_file = lab.tokens("admin.token", ADMIN_TOKEN + "\n")
    os.chmod(token_file, 0o600)
    _, admin = with_metrics(lab, "--admin-token-file", str(token_file))
    for path in ("/metrics", "/status", "/elsewhere"):
        status, headers, _ = get(admin, path)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer"), path
        assert get(admin, path, "not-the-token-at-all")[0] == 401
    assert get(admin, "/metrics", ADMIN_TOKEN)[0] == 200
    assert get(admin, "/status", ADMIN_TOKEN)[0] == 200
    assert get(admin, "/elsewhere", ADMIN_TOKEN)[0] == 404
    # Without --metrics-per-tunnel no series is per tunnel.
    assert not [s for s in scrape(admin, ADMIN_TOKEN) if "name" in s.labels]

    # A slowloris holds its connection; scrapes go on beside it.
    with socket.create_connection((HOST, admin), timeout=STEP_TIMEOUT) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bea")
        assert get(admin, "/metrics", ADMIN_TOKEN)[0] == 200
        assert value(scrape(admin, ADMIN_TOKEN), "snocat_tunnels") == 0
    # Too much is refused with the status that says so.
    for request, expected in (
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n", b" 431 "),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", b" 413 "),
    ):
        with socket.create_connection((HOST, admin), timeout=STEP_TIMEOUT) as rude:
            rude.sendall(request)
            assert rude.recv(100).startswith(b"HTTP/1.1" + expected)

    # snocat status needs the token too.
    missing = lab.run("status", "--admin", f"{HOST}:{admin}")
    assert "--admin-token-file" in assert_one_line_error(missing, 3)
    shown = lab.run("status", "--admin", f"{HOST}:{admin}", "--admin-token-file", str(token_file))
    assert shown.returncode == 0, shown.stderr
    assert "0 tunnels" in shown.stdout

    text = bodies(admin, ADMIN_TOKEN)
    assert not [secret for secret in SECRETS if secret in text]


def _server_args(lab: Lab, *extra: str) -> list[str]:
    certificate, key = lab.certificate("s")
    tokens = lab.tokens("tokens", f"{TOKEN}\n")
    return [
        "server",
        "--cert",
        str(certificate),
        "--key",
        str(key),
        "--quic",
        f"{HOST}:{free_udp_port()}",
        "--ports",
        "{}:{}".format(*free_port_range()),
        "--tokens",
        str(tokens),
        *extra,
    ]


def test_without_the_heap_policy_nothing_is_frozen(lab: Lab) -> None:
    _, admin = with_metrics(lab, "--no-heap-freeze")
    samples = scrape(admin)
    assert value(samples, "snocat_tunnels") == 0
    assert not [s for s in samples if s.name.startswith("snocat_gc_")]
    # prometheus_client's own series still count the collections.
    assert [s for s in samples if s.name == "python_gc_collections_total"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--metrics", "0.0.0.0:{port}"), "--admin-token-file"),
        (("--metrics", "[::]:{port}"), "--admin-token-file"),
        (("--metrics", "agg.example.com:{port}"), "--admin-token-file"),
        (("--metrics-per-tunnel",), "--metrics-per-tunnel needs --metrics"),
        (("--admin-token-file", "admin.token"), "--admin-token-file needs --metrics"),
        (("--metrics", "nowhere"), "--metrics must be HOST:PORT"),
        (("--metrics", "{port}", "--admin-token-file", "short.token"), "at least 16"),
        (("--metrics", "{port}", "--admin-token-file", "missing.token"), "cannot read"),
        (("--metrics", "{taken}"), "cannot listen on --metrics"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, tuple) else None,
)
def test_admin_usage_errors(lab: Lab, extra: tuple[str, ...], expected: str) -> None:
    lab.tokens("admin.token", ADMIN_TOKEN + "\n")
    lab.tokens("short.token", "too-short\n")
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        filled = [part.format(port=free_tcp_port(), taken=taken.getsockname()[1]) for part in extra]
        result = lab.run(*_server_args(lab, *filled))
    line = assert_one_line_error(result, 2)
    assert expected in line, line


def test_status_of_a_server_that_is_not_there(lab: Lab) -> None:
    result = lab.run("status", "--admin", f"http://{HOST}:{free_tcp_port()}")
    assert "cannot reach the admin endpoint" in assert_one_line_error(result, 4)
    bad = lab.run("status", "--admin", "ftp://example.com")
    assert_one_line_error(bad, 2)


def test_the_help_says_the_per_tunnel_bound() -> None:
    [option] = [p for p in cli.commands["server"].params if p.name == "metrics_per_tunnel"]
    assert f"the {PER_TUNNEL_NAMES} oldest names" in str(getattr(option, "help", ""))
