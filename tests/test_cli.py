"""End-to-end tests of the ``snocat`` command: real processes on loopback.

Every test runs ``python -m snocat_anyio`` (or the ``snocat`` console script) as a
subprocess with stdin closed, a private HOME and state directory, and ports picked
free on 127.0.0.1.  A local threaded HTTP server is the forwarded target; data that
crosses a tunnel is checked by SHA-256.  Every process a test starts is killed when
the test ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cli_harness import (  # noqa: F401 (fixtures)
    HOST,
    LOG_LINE,
    SCRIPT,
    STEP_TIMEOUT,
    TOKEN,
    Aggregator,
    Background,
    Lab,
    Website,
    assert_one_line_error,
    connection_refused,
    fetch_digest,
    fetch_ok,
    free_port_range,
    free_tcp_port,
    free_udp_port,
    lab_fixture,
    public_port,
    start_client,
    start_server,
    tcp_port_free,
    udp_port_free,
    wait_until,
    website_fixture,
)
from test_certificates import old_style_certificate

from snocat_anyio import cli as snocat_cli
from snocat_proto._wire.certificates import (
    fingerprint,
    generate_self_signed,
    load_certificate_chain,
)


@pytest.fixture(scope="module", autouse=True)
def unreachable_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    """``snocat client --no-reconnect`` towards a UDP port nobody listens on, started with
    the module (it waits for its connect timeout); test_client_unreachable_driver_gives_up
    checks how it ended."""
    tmp_path = tmp_path_factory.mktemp("unreachable")
    token = tmp_path / "alpha.token"
    token.write_text(f"{TOKEN}\n")
    args = [
        "client",
        "--driver",
        f"{HOST}:{free_udp_port()}",
        "--san",
        "localhost",
        "--token-file",
        str(token),
        "--target",
        f"{HOST}:{free_tcp_port()}",
        "--no-reconnect",
    ]
    process = Background(args, tmp_path)
    try:
        yield process
    finally:
        process.kill()


# 1. cert -----------------------------------------------------------------------


def test_cert_writes_a_pair_and_refuses_to_overwrite(lab: Lab) -> None:
    path = lab.tmp_path / "deep" / "er" / "server"
    result = lab.run("cert", str(path), "--san", "localhost")
    assert result.returncode == 0, result.stderr
    public = Path(f"{path}.pub.pem")
    private = Path(f"{path}.priv.pem")
    assert public.is_file() and private.is_file()
    assert private.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in private.read_bytes()
    digest = fingerprint(load_certificate_chain(public.read_bytes())[0])
    match = re.search(r"SHA-256 fingerprint: (\S+)", result.stdout)
    assert match and match.group(1) == digest, result.stdout

    again = lab.run("cert", str(path), "--san", "localhost")
    line = assert_one_line_error(again, 2)
    assert "already exists" in line
    assert fingerprint(load_certificate_chain(public.read_bytes())[0]) == digest


# 2, 4, 5, 9. forwarding, --json events, SSLKEYLOGFILE, graceful stop ---------------


def emoji_prone_certificate(lab: Lab) -> str:
    """Write the server certificate, one whose fingerprint holds ":AB:" or ":CD:" (which
    rich would print as emoji); returns that fingerprint."""
    now = datetime.datetime.now(datetime.UTC)
    while True:
        certificate_pem, key_pem = generate_self_signed(["localhost"], now=now)
        digest = fingerprint(load_certificate_chain(certificate_pem)[0])
        if ":AB:" in digest or ":CD:" in digest:
            break
    (lab.tmp_path / "certs").mkdir(exist_ok=True)
    (lab.tmp_path / "certs" / "server.pub.pem").write_bytes(certificate_pem)
    (lab.tmp_path / "certs" / "server.priv.pem").write_bytes(key_pem)
    return digest


def test_forwarding_json_events_and_graceful_stop(lab: Lab, website: Website) -> None:
    digest = emoji_prone_certificate(lab)
    keylog = lab.tmp_path / "keys.log"
    aggregator = start_server(lab)
    # With --json the banner goes to stderr; the fingerprint it shows pins the server.
    shown = aggregator.process.wait_line(r"fingerprint: (\S+)", stream="stderr").group(1)
    assert shown == digest
    client = start_client(
        lab,
        aggregator,
        website.port,
        env={"SSLKEYLOGFILE": str(keylog)},
        trust=("--fingerprint", shown),
    )
    port = public_port(client)
    assert aggregator.ports[0] <= port <= aggregator.ports[1]

    fetch_ok(port, website)
    with ThreadPoolExecutor(max_workers=100) as pool:
        digests = list(pool.map(lambda _: fetch_digest(port, "small.bin"), range(100)))
    assert digests == [website.digests["small.bin"]] * 100

    server = aggregator.process
    granted = server.wait_event("port_granted")
    assert granted["port"] == port and granted["name"] == "alpha"
    authenticated = server.wait_event("tunnel_authenticated")
    assert authenticated["name"] == "alpha" and authenticated["scheme"] == "token"
    wait_until(
        lambda: [e["event"] for e in server.events()].count("stream_closed") >= 101,
        10,
        "a stream_closed event for each of the 101 connections",
    )
    events = server.events()
    assert all(isinstance(event.get("event"), str) for event in events)
    kinds = [event["event"] for event in events]
    assert kinds.count("stream_opened") >= 101, kinds
    assert kinds.index("tunnel_authenticated") < kinds.index("port_granted")
    assert not any(line.startswith("{") for line in server.stderr)
    assert all(LOG_LINE.match(line) for line in client.stderr), client.describe()

    secrets_logged = keylog.read_text()
    assert "CLIENT_HANDSHAKE_TRAFFIC_SECRET" in secrets_logged
    assert "CLIENT_TRAFFIC_SECRET_0" in secrets_logged

    assert client.stop(signal.SIGINT) < 10
    assert server.wait_event("port_released")["port"] == port
    assert server.stop(signal.SIGTERM) < 10
    assert tcp_port_free(port)
    assert udp_port_free(aggregator.quic_port)
    for process in (client, server):
        assert "Traceback" not in "\n".join(process.stderr), process.describe()


# 3. a killed client frees its port; a restarted server is found again ------------


def test_killed_client_releases_its_port(lab: Lab, website: Website) -> None:
    aggregator = start_server(lab, idle_timeout=3)
    client = start_client(lab, aggregator, website.port)
    port = public_port(client)
    # Idle for longer than the idle timeout: keepalives hold the tunnel up.
    time.sleep(4.5)
    fetch_ok(port, website, "small.bin")
    assert not [e for e in aggregator.process.events() if e["event"] == "tunnel_closed"]
    assert not any("reconnecting" in line for line in client.stdout + client.stderr), (
        client.describe()
    )

    client.popen.kill()
    took = wait_until(lambda: connection_refused(port), 3 + 5, "the port is released")
    assert took > 0.5  # the server did notice through the idle timeout, not a goodbye
    closed = aggregator.process.wait_event("tunnel_closed")
    assert closed["name"] == "alpha"
    assert aggregator.process.wait_event("port_released")["port"] == port


def test_keepalive_zero_on_both_sides_lets_an_idle_tunnel_time_out(
    lab: Lab, website: Website
) -> None:
    # The options reach both ends: without pings, 3 s of silence end the tunnel.
    aggregator = start_server(lab, "--keepalive", "0", idle_timeout=3)
    client = start_client(lab, aggregator, website.port, "--keepalive", "0")
    public_port(client)
    closed = aggregator.process.wait_event("tunnel_closed", timeout=15)
    assert closed["name"] == "alpha"
    assert "idle" in str(closed["reason"]).lower()


def test_on_trio_too_the_json_events_start_with_listening_on(lab: Lab, website: Website) -> None:
    # The printer subscribes before the server starts: on trio, whose scheduling
    # order is its own, a printer task started alongside missed the first records.
    aggregator = start_server(lab, "--backend", "trio")
    client = start_client(lab, aggregator, website.port, "--backend", "trio", "--json")
    fetch_ok(int(client.wait_event("port_granted")["port"]), website)  # type: ignore[call-overload]


def test_client_reconnects_to_a_restarted_server(lab: Lab, website: Website) -> None:
    aggregator = start_server(lab)
    client = start_client(lab, aggregator, website.port, "--json")
    first = client.wait_event("port_granted")
    port = int(first["port"])  # type: ignore[call-overload]
    fetch_ok(port, website)

    lines = len(client.stdout)
    assert aggregator.process.stop(signal.SIGTERM) < 10
    client.wait_event("reconnecting", after=lines)
    assert connection_refused(port)

    restarted = start_server(lab, quic_port=aggregator.quic_port, ports=aggregator.ports)
    again = client.wait_event("port_granted", after=lines, timeout=20)
    port = int(again["port"])  # type: ignore[call-overload]
    fetch_ok(port, website)
    assert restarted.process.wait_event("tunnel_authenticated")["name"] == "alpha"
    assert client.stop(signal.SIGTERM) < 10
    assert all(isinstance(event.get("event"), str) for event in client.events())
    assert restarted.process.stop(signal.SIGINT) < 10
    assert tcp_port_free(port)


# 7. a server without --cert/--key: the state directory ---------------------------


def test_server_state_directory_and_printed_client_line(lab: Lab, website: Website) -> None:
    state = lab.tmp_path / "state"
    quic_port = free_udp_port()
    ports = free_port_range()
    args = ("server", "--quic", f"{HOST}:{quic_port}", "--ports", f"{ports[0]}:{ports[1]}")

    first = lab.start(*args)
    line = first.wait_line(r"^\s*snocat client .*").group(0).strip()
    digest = first.wait_line(r"fingerprint: (\S+)").group(1)
    first.wait_line("created a certificate and a token", stream="stderr")
    assert first.stop() < 10
    files = {path.name for path in state.iterdir()}
    assert {"server.pub.pem", "server.priv.pem", "tokens", "client.token"} <= files
    for name in ("server.priv.pem", "tokens", "client.token"):
        assert (state / name).stat().st_mode & 0o777 == 0o600
    assert fingerprint(load_certificate_chain((state / "server.pub.pem").read_bytes())[0]) == (
        digest
    )
    stamps = {name: (state / name).stat().st_mtime_ns for name in files}

    second = lab.start(*args)
    assert second.wait_line(r"fingerprint: (\S+)").group(1) == digest
    assert second.wait_line(r"^\s*snocat client .*").group(0).strip() == line
    assert {name: (state / name).stat().st_mtime_ns for name in files} == stamps
    assert not any("created" in text for text in second.stderr)

    assert f"--driver {HOST}:{quic_port}" in line and f"--fingerprint {digest}" in line
    # Loopback: the line says, as a shell comment, that another machine needs more.
    assert f"# {HOST} is this machine only" in line and "--advertise" in line
    words = shlex.split(line, comments=True)
    assert words[0] == "snocat"
    words[words.index("--token-file") + 1] = str(state / "client.token")
    words[words.index("--target") + 1] = f"{HOST}:{website.port}"
    client = lab.start(*words[1:], script=SCRIPT.exists())
    fetch_ok(public_port(client), website)
    assert client.stop(signal.SIGINT) < 10
    assert second.stop() < 10


@pytest.mark.parametrize(
    ("quic_host", "advertise", "driver", "note"),
    [
        ("0.0.0.0", "agg.example.com:{port}", "agg.example.com:{port}", None),
        ("0.0.0.0", None, "0.0.0.0:{port}", "# replace 0.0.0.0 with this machine's address"),
        (HOST, "[2001:db8::1]:{port}", "[2001:db8::1]:{port}", None),
    ],
)
def test_server_prints_the_advertised_address(
    lab: Lab, quic_host: str, advertise: str | None, driver: str, note: str | None
) -> None:
    port = free_udp_port()
    extra = ["--advertise", advertise.format(port=port)] if advertise else []
    server = lab.start(
        "server",
        "--quic",
        f"{quic_host}:{port}",
        "--ports",
        "{}:{}".format(*free_port_range()),
        *extra,
    )
    line = server.wait_line(r"^\s*snocat client .*").group(0)
    assert f"--driver {driver.format(port=port)} " in line, line
    if note is None:
        assert "#" not in line, line
    else:
        assert note in line, line
    assert server.stop() < 10


def test_server_advertise_must_be_host_port(lab: Lab) -> None:
    for value, expected in (
        ("https://agg.example.com:9090", "--advertise must be HOST:PORT"),
        ("agg.example.com:0", "--advertise needs a port"),
    ):
        result = lab.run(*_server_args(lab, "--advertise", value))
        line = assert_one_line_error(result, 2)
        assert expected in line, line


# 8. demo -----------------------------------------------------------------------


def test_demo(lab: Lab, website: Website) -> None:
    ports = free_port_range()
    demo = lab.start(
        "demo", "--target", f"{HOST}:{website.port}", "--ports", f"{ports[0]}:{ports[1]}"
    )
    port = int(demo.wait_line(r"connect to \S*:(\d+)").group(1))
    assert ports[0] <= port <= ports[1]
    fetch_ok(port, website)
    assert demo.stop(signal.SIGINT) < 10
    assert tcp_port_free(port)


# 6. user mistakes ----------------------------------------------------------------


def _server_args(lab: Lab, *extra: str) -> list[str]:
    certificate, key = lab.certificate("s")
    tokens = lab.tokens("tokens", f"{TOKEN}\n")
    base = {
        "--cert": str(certificate),
        "--key": str(key),
        "--quic": f"{HOST}:{free_udp_port()}",
        "--ports": "{}:{}".format(*free_port_range()),
        "--tokens": str(tokens),
    }
    overrides = dict(zip(extra[::2], extra[1::2], strict=True))
    base.update(overrides)
    return ["server", *(item for pair in base.items() if pair[1] for item in pair)]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--cert", "missing.pem"), "cannot read certificate file"),
        (("--key", "missing.pem"), "cannot read private key file"),
        (("--key", ""), "give both --cert and --key"),
        (("--ports", "9000:8000"), "--ports '9000:8000'"),
        (("--ports", "abc"), "--ports 'abc'"),
        (("--tcp", "not-an-address"), "--tcp must be an IP address"),
        (("--quic", "nowhere"), "--quic must be HOST:PORT"),
        (("--tokens", "bad.tokens"), "bad.tokens line 3"),
        (("--tokens", "missing.tokens"), "cannot read tokens file"),
        (("--cert", "junk.pem"), "certificate file junk.pem holds no PEM certificate"),
        (("--key", "junk.pem"), "private key file junk.pem holds no PEM private key"),
        (("--cert", "certs/s.priv.pem"), "s.priv.pem holds a private key, not a certificate"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, tuple) else None,
)
def test_server_usage_errors(lab: Lab, extra: tuple[str, ...], expected: str) -> None:
    lab.tokens("bad.tokens", f"# ok\n{TOKEN}\nshort tooshort\n")
    lab.tokens("junk.pem", "not a certificate\n")
    result = lab.run(*_server_args(lab, *extra))
    line = assert_one_line_error(result, 2)
    assert expected in line
    assert "cryptography.io" not in line and "MalformedFraming" not in line


def test_server_warns_about_a_ca_certificate_it_is_given(lab: Lab) -> None:
    """A certificate made by an older ``snocat cert``: served, but snocat-cli refuses it."""
    certificate_pem, key_pem = old_style_certificate(["localhost"])
    (lab.tmp_path / "certs").mkdir()
    (lab.tmp_path / "certs" / "server.pub.pem").write_bytes(certificate_pem)
    (lab.tmp_path / "certs" / "server.priv.pem").write_bytes(key_pem)
    aggregator = start_server(lab)
    aggregator.process.wait_line(
        r"server\.pub\.pem is a CA certificate.*CaUsedAsEndEntity.*snocat cert", stream="stderr"
    )
    assert aggregator.process.stop() < 10


def test_server_unreadable_key(lab: Lab) -> None:
    args = _server_args(lab)
    key = Path(args[args.index("--key") + 1])
    if os.geteuid() == 0:  # root reads any file: a directory is unreadable as a key
        key.unlink()
        key.mkdir()
    else:
        key.chmod(0)
    result = lab.run(*args)
    assert str(key) in assert_one_line_error(result, 2)


def test_server_port_range_all_taken(lab: Lab) -> None:
    start, end = free_port_range(3)
    with contextlib.ExitStack() as stack:
        for port in range(start, end + 1):
            sock = stack.enter_context(socket.socket())
            sock.bind((HOST, port))
            sock.listen()
        result = lab.run(*_server_args(lab, "--ports", f"{start}:{end}"))
    assert "no port of --ports" in assert_one_line_error(result, 2)


def test_server_quic_port_in_use(lab: Lab) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        port = taken.getsockname()[1]
        result = lab.run(*_server_args(lab, "--quic", f"{HOST}:{port}"))
    line = assert_one_line_error(result, 2)
    assert f"{HOST}:{port}" in line and "in use" in line


def test_server_ports_reusable_right_after_a_restart(lab: Lab, website: Website) -> None:
    """A one-port range stays usable while old connections on it are in TIME_WAIT."""
    port = free_port_range(1)[0]
    aggregator = start_server(lab, ports=(port, port))
    client = start_client(lab, aggregator, website.port)
    assert public_port(client) == port
    # Read to the end before closing: the aggregator closes first, so the connection's
    # TIME_WAIT sits on the public port.
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(b"GET /small.bin HTTP/1.0\r\n\r\n")
        received = b"".join(iter(lambda: sock.recv(65536), b""))
    assert (
        hashlib.sha256(received.partition(b"\r\n\r\n")[2]).hexdigest()
        == (website.digests["small.bin"])
    )
    assert client.stop() < 10
    assert aggregator.process.stop() < 10
    again = start_server(lab, ports=(port, port))
    client = start_client(lab, again, website.port)
    assert public_port(client) == port


def _client_args(lab: Lab, *extra: str, aggregator: Aggregator | None = None) -> list[str]:
    if aggregator is None:
        certificate, _ = lab.certificate("s")
        quic_port = free_udp_port()
    else:
        certificate, quic_port = aggregator.certificate, aggregator.quic_port
    token = lab.tokens("alpha.token", f"{TOKEN}\n")
    base = {
        "--driver": f"{HOST}:{quic_port}",
        "--san": "localhost",
        "--authority": str(certificate),
        "--token-file": str(token),
        "--target": f"{HOST}:{free_tcp_port()}",
    }
    base.update(dict(zip(extra[::2], extra[1::2], strict=True)))
    return ["client", *(item for pair in base.items() if pair[1] for item in pair)]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--auth", "token", "--token-file", ""), "token authentication needs --token-file"),
        (("--token-file", "missing.token"), "cannot read token file"),
        (("--fingerprint", "zz:yy"), "--fingerprint"),
        (("--target", "nowhere"), "--target must be HOST:PORT"),
        (("--target", "127.0.0.1:70000"), "--target has port 70000"),
        (("--target", "127.0.0.1:0"), "--target '127.0.0.1:0'"),
        (("--driver", "nowhere"), "--driver must be HOST:PORT"),
        # A URL gets the URL message, not the IPv6-brackets hint, from every address flag.
        (("--driver", "https://agg.example.com:9090"), "--driver must be HOST:PORT"),
        (("--target", "http://127.0.0.1:8000"), "--target must be HOST:PORT"),
        (("--authority", "missing.pem"), "cannot read authority file"),
        (("--authority", "junk.pem"), "--authority junk.pem holds no PEM certificate"),
        (("--auth", "magic"), "--auth"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, tuple) else None,
)
def test_client_usage_errors(lab: Lab, extra: tuple[str, ...], expected: str) -> None:
    lab.tokens("junk.pem", "not a certificate\n")
    result = lab.run(*_client_args(lab, *extra))
    line = assert_one_line_error(result, 2)
    assert expected in line
    assert "cryptography.io" not in line and "MalformedFraming" not in line
    assert ("not a URL" in line) == ("://" in " ".join(extra)), line


def test_client_missing_option_is_one_line(lab: Lab) -> None:
    result = lab.run("client", "--target", f"{HOST}:80")
    assert "--driver" in assert_one_line_error(result, 2)


def test_client_unreachable_driver_gives_up(unreachable_client: Background) -> None:
    result = unreachable_client.finish(timeout=30)
    assert "nothing answers" in assert_one_line_error(result, 4)
    print(f"\naggregator not running: reported after {unreachable_client.seconds:.2f} s")
    assert unreachable_client.seconds < 5  # ICMP port unreachable, not the 10 s timeout


def test_client_authentication_and_certificate_failures(lab: Lab, website: Website) -> None:
    aggregator = start_server(lab)
    other, _ = lab.certificate("other", "localhost")
    wrong = lab.tokens("wrong.token", "alpha wrong-wrong-wrong-wrong\n")
    unknown = lab.tokens("unknown.token", "gamma s3cret-s3cret-s3cret-1\n")
    cases = [
        (("--authority", str(other)), 4, "not trusted"),
        (("--san", "elsewhere.example"), 4, "issued for localhost, not for 'elsewhere.example'"),
        (("--authority", "", "--fingerprint", "AB" * 32), 4, ":".join(["ab"] * 32)),
        (("--token-file", str(wrong)), 3, "authentication"),
        (("--token-file", str(unknown)), 3, "authentication"),
        (("--auth", "simple-ack"), 3, "authentication"),
    ]
    target = ("--target", f"{HOST}:{website.port}")
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        results = list(
            pool.map(
                lambda case: lab.run(*_client_args(lab, *case[0], *target, aggregator=aggregator)),
                cases,
            )
        )
    for (extra, status, expected), result in zip(cases, results, strict=True):
        line = assert_one_line_error(result, status)
        assert expected in line.lower(), (extra, line)
    assert not [e for e in aggregator.process.events() if e["event"] == "port_granted"]

    # The token may also come from the environment.
    args = _client_args(lab, "--token-file", "", *target, aggregator=aggregator)
    client = lab.start(*args, env={"SNOCAT_TOKEN": TOKEN})
    fetch_ok(public_port(client), website, "small.bin")


def test_a_signal_right_after_the_first_line_stops_cleanly(lab: Lab, website: Website) -> None:
    """The handler is installed before the process says anything (SIGTERM must not kill)."""
    aggregator = start_server(lab, json_mode=False)
    assert aggregator.process.stop(signal.SIGTERM) < 10
    aggregator = start_server(lab, quic_port=aggregator.quic_port)
    assert aggregator.process.stop(signal.SIGINT) < 10
    demo = lab.start(
        "demo", "--target", f"{HOST}:{website.port}", "--ports", "{}:{}".format(*free_port_range())
    )
    demo.wait_line("connect to")
    assert demo.stop(signal.SIGTERM) < 10


def test_client_signalled_while_connecting_stops(lab: Lab, website: Website) -> None:
    aggregator = start_server(lab)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGINT):
        client = start_client(lab, aggregator, website.port)
        client.wait_line("connecting to")
        assert client.stop(signum) < 10


# The event loop (--loop, $SNOCAT_LOOP) -----------------------------------------------


@pytest.mark.parametrize(
    ("backend", "loop", "installed", "expected"),
    [
        # auto: asyncio's own loop, installed uvloop or not (uvloop measured slower).
        ("asyncio", "auto", True, {"use_uvloop": False}),
        ("asyncio", "auto", False, {"use_uvloop": False}),
        ("asyncio", "asyncio", True, {"use_uvloop": False}),
        ("asyncio", "uvloop", True, {"use_uvloop": True}),
        # trio has its own loop: --loop does not apply.
        ("trio", "auto", True, {}),
        ("trio", "uvloop", False, {}),
    ],
)
def test_the_loop_choice(backend: str, loop: str, installed: bool, expected: object) -> None:
    assert snocat_cli.AUTO_PREFERS_UVLOOP is False
    assert snocat_cli.run_options(backend, loop, uvloop_installed=installed) == expected


def test_auto_takes_uvloop_only_if_preferred_and_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snocat_cli, "AUTO_PREFERS_UVLOOP", True)
    cases = [("auto", True, True), ("auto", False, False), ("asyncio", True, False)]
    for loop, installed, uses_uvloop in cases:
        options = snocat_cli.run_options("asyncio", loop, uvloop_installed=installed)
        assert options == {"use_uvloop": uses_uvloop}, (loop, installed)


def test_uvloop_asked_for_but_missing_is_a_usage_error() -> None:
    with pytest.raises(snocat_cli.UsageProblem, match=r"snocat\[fast\]"):
        snocat_cli.run_options("asyncio", "uvloop", uvloop_installed=False)


@pytest.mark.skipif(
    importlib.util.find_spec("uvloop") is not None, reason="uvloop is installed here"
)
def test_loop_uvloop_without_uvloop_is_one_line(lab: Lab) -> None:
    result = lab.run(*_client_args(lab, "--loop", "uvloop"))
    assert "uvloop is not installed" in assert_one_line_error(result, 2)
    result = lab.run(*_client_args(lab), env={"SNOCAT_LOOP": "uvloop"})
    assert "uvloop is not installed" in assert_one_line_error(result, 2)


# 12. A dead aggregator, noticed by a client that is downloading ------------------


def test_a_killed_aggregator_is_noticed_within_seconds_mid_download(
    lab: Lab, website: Website
) -> None:
    """kill -9 of the aggregator while a visitor's download is under way: the client
    notices within a few seconds (its probes go unanswered), not at the 30 s idle
    timeout, and says so.  The figure is printed; the bound is generous."""
    aggregator = start_server(lab, idle_timeout=30.0)
    client = start_client(lab, aggregator, website.port, "--json", "--idle-timeout", "30")
    port = int(client.wait_event("port_granted")["port"])  # type: ignore[call-overload]
    with socket.create_connection((HOST, port), timeout=STEP_TIMEOUT) as visitor:
        visitor.sendall(b"GET /big.bin HTTP/1.0\r\n\r\n")
        assert visitor.recv(1024).startswith(b"HTTP/1.0 200")  # the download is running
        lines = len(client.stdout)
        killed_at = time.monotonic()
        aggregator.process.kill()
        closed = client.wait_event("tunnel_closed", after=lines, timeout=30)
        noticed = time.monotonic() - killed_at
    print(f"\naggregator killed mid-download: the client noticed after {noticed:.2f} s")
    assert "no answer from the peer" in str(closed["reason"])
    assert noticed < 10.0
    client.wait_event("reconnecting", after=lines)
    assert client.stop(signal.SIGTERM) < 10


# Messages: one reconnect line, a dead target, --log-file, --version ------------------


def test_each_reconnect_is_told_once(lab: Lab, website: Website) -> None:
    aggregator = start_server(lab)
    client = start_client(lab, aggregator, website.port)
    public_port(client)
    assert aggregator.process.stop() < 10
    client.wait_line("reconnecting in", stream="stderr")
    time.sleep(0.5)  # the CLI printed the same record on stdout right after it
    # The client's log line says it; the CLI no longer prints the same on stdout.
    assert not [line for line in client.stdout if "reconnecting" in line], client.describe()
    assert client.stop() < 10


def test_a_dead_target_is_told_once_and_when_it_answers(lab: Lab) -> None:
    aggregator = start_server(lab)
    target = free_tcp_port()
    client = start_client(lab, aggregator, target)
    public_port(client)
    warning = client.wait_line(r"WARNING .*does not accept", stream="stderr").string
    assert f"target {HOST}:{target} does not accept connections" in warning
    assert "refused" in warning.lower()
    time.sleep(7)  # rechecked twice while down: still one warning
    assert len([line for line in client.stderr if "does not accept" in line]) == 1
    with socket.socket() as listener:
        listener.bind((HOST, target))
        listener.listen()
        client.wait_line(rf"target {HOST}:{target} answers now", stream="stderr")
    assert client.stop() < 10

    demo = lab.start(
        "demo", "--target", f"{HOST}:{target}", "--ports", "{}:{}".format(*free_port_range())
    )
    demo.wait_line("connect to")
    demo.wait_line(rf"WARNING .*target {HOST}:{target} does not accept", stream="stderr")
    assert demo.stop() < 10


def test_log_file_takes_the_logs_and_errors_still_print_one_line(
    lab: Lab, website: Website
) -> None:
    server_log = lab.tmp_path / "server.log"
    server_log.write_text("an earlier run\n")
    aggregator = start_server(lab, "--log-file", str(server_log), json_mode=False)
    client_log = lab.tmp_path / "client.log"
    client = start_client(lab, aggregator, website.port, "--log-file", str(client_log))
    public_port(client)
    assert client.stop() < 10
    assert aggregator.process.stop() < 10
    assert aggregator.process.stderr == [] and client.stderr == [], client.describe()
    lines = server_log.read_text().splitlines()
    assert lines[0] == "an earlier run"  # appended
    assert all(LOG_LINE.match(line) for line in lines[1:]), lines
    assert any("listening on" in line for line in lines)
    assert any("SIGTERM received" in line for line in lines)
    client_lines = client_log.read_text().splitlines()
    assert any("SIGTERM received" in line for line in client_lines), client_lines
    assert all(LOG_LINE.match(line) for line in client_lines), client_lines

    wrong = lab.tokens("wrong.token", "alpha wrong-wrong-wrong-wrong\n")
    failed_log = lab.tmp_path / "failed.log"
    args = _client_args(lab, "--token-file", str(wrong), "--log-file", str(failed_log))
    args[args.index("--driver") + 1] = f"{HOST}:{aggregator.quic_port}"
    args[args.index("--authority") + 1] = str(aggregator.certificate)
    again = start_server(lab, quic_port=aggregator.quic_port)
    result = lab.run(*args)
    line = assert_one_line_error(result, 3)
    assert "authentication" in line
    logged = failed_log.read_text()
    assert "ERROR snocat: " + line.removeprefix("error: ") in logged, logged
    assert again.process.stop() < 10
    unwritable = lab.run(*_client_args(lab, "--log-file", str(lab.tmp_path / "no" / "such.log")))
    assert "cannot open --log-file" in assert_one_line_error(unwritable, 2)


def test_version(lab: Lab) -> None:
    result = lab.run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"snocat, version {importlib.metadata.version('snocat')}\n"


# 13. Several targets, public ports asked for, refusals ------------------------------


def test_every_target_gets_its_own_public_port(lab: Lab, website: Website) -> None:
    """Two --target flags: two public ports, each printed with its target (only the
    first was published before)."""
    aggregator = start_server(lab)
    client = lab.start(
        *_client_args(lab, aggregator=aggregator)[:-2],
        "--target",
        f"{HOST}:{website.port}",
        "--target",
        f"localhost:{website.port}",
    )
    client.wait_line(r"public address: ")
    deadline = time.monotonic() + STEP_TIMEOUT
    while len({m.group(2) for m in _grants(client)}) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    grants = {m.group(2): int(m.group(1)) for m in _grants(client)}
    assert set(grants) == {f"{HOST}:{website.port}", f"localhost:{website.port}"}
    assert len(set(grants.values())) == 2
    for port in grants.values():
        fetch_ok(port, website)
    assert client.stop() < 10


def _grants(client: Any) -> list[re.Match[str]]:
    pattern = re.compile(r"public address: \S*:(\d+) -> forwards to (\S+)")
    return [m for line in list(client.stdout) if (m := pattern.search(line))]


def test_a_public_port_asked_for_is_given_or_refused_with_status_2(
    lab: Lab, website: Website
) -> None:
    ports = free_port_range()
    aggregator = start_server(lab, ports=ports)
    wanted = ports[0] + 2
    args = _client_args(lab, aggregator=aggregator)[:-2]
    client = lab.start(*args, "--target", f"{wanted}={HOST}:{website.port}")
    assert public_port(client) == wanted
    fetch_ok(wanted, website)
    assert client.stop() < 10
    outside = lab.run(*args, "--target", f"{ports[1] + 1}={HOST}:{website.port}")
    line = assert_one_line_error(outside, 2)
    assert f"port {ports[1] + 1} is outside this aggregator's range" in line
    bad = lab.run(*args, "--target", f"nope={HOST}:{website.port}")
    assert "the public port before '='" in assert_one_line_error(bad, 2)


def test_no_reconnect_with_no_free_port_exits_2_with_a_sentence(lab: Lab, website: Website) -> None:
    """It retried forever with a warning every few seconds ('(null answer)')."""
    port = free_port_range(1)
    aggregator = start_server(lab, ports=port)
    first = start_client(lab, aggregator, website.port)
    public_port(first)
    beta = lab.tokens("beta.token", "beta b3ta-b3ta-b3ta-b3ta-2\n")
    args = _client_args(lab, aggregator=aggregator)
    args[args.index("--token-file") + 1] = str(beta)
    started = time.monotonic()
    result = lab.run(*args, "--no-reconnect")
    line = assert_one_line_error(result, 2)
    assert f"no public port for {HOST}:" in line and "no free port in" in line
    assert time.monotonic() - started < 15
    assert first.stop() < 10
