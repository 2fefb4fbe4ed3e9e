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
import http.client
import http.server
import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_certificates import old_style_certificate

from snocat_anyio import cli as snocat_cli
from snocat_proto._wire.certificates import (
    fingerprint,
    generate_self_signed,
    load_certificate_chain,
)

HOST = "127.0.0.1"
#: Bound on anything a process is expected to do (start, answer, exit).
STEP_TIMEOUT = 15.0
BIG_FILE_SIZE = 4 * 1024 * 1024
SMALL_FILE_SIZE = 64 * 1024
SCRIPT = Path(sys.executable).with_name("snocat")
#: A record of snocat's own logging on stderr (aioquic's are kept out unless debugging).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) snocat")


# Ports -------------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def tcp_port_free(port: int) -> bool:
    """Nobody listens on ``port`` (connections in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            sock.listen()
        except OSError:
            return False
        return True


def udp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port_range(count: int = 4) -> tuple[int, int]:
    """A random range of free TCP ports below Linux's ephemeral range (32768+)."""
    for _ in range(200):
        start = random.randrange(20000, 32000 - count)
        ports = range(start, start + count)
        if all(tcp_port_free(port) for port in ports):
            return start, start + count - 1
    raise RuntimeError("no free port range found")


def connection_refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        try:
            sock.connect((HOST, port))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
        return False


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition``; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


# The forwarded target: a threaded HTTP server with random files ------------------


@dataclass(frozen=True)
class Website:
    port: int
    digests: dict[str, str]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True


@pytest.fixture(scope="module")
def website(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Website]:
    root = tmp_path_factory.mktemp("www")
    digests = {}
    for name, size in (("big.bin", BIG_FILE_SIZE), ("small.bin", SMALL_FILE_SIZE)):
        data = os.urandom(size)
        (root / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()

    def handler(*args: object) -> _QuietHandler:
        return _QuietHandler(*args, directory=str(root))  # type: ignore[arg-type]

    server = _Server((HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Website(port=server.server_address[1], digests=digests)
    finally:
        server.shutdown()
        server.server_close()


def fetch_digest(port: int, name: str, timeout: float = 30.0) -> str:
    """GET ``/name`` through ``port`` (http.client: no proxy settings apply)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", f"/{name}")
        response = connection.getresponse()
        assert response.status == 200, response.status
        return hashlib.sha256(response.read()).hexdigest()
    finally:
        connection.close()


def fetch_ok(port: int, website: Website, name: str = "big.bin") -> None:
    assert fetch_digest(port, name) == website.digests[name]


# Processes ---------------------------------------------------------------------


class Snocat:
    """One running ``snocat`` process whose output is collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, command: list[str]):
        self.args = args
        self.popen = subprocess.Popen(
            [*command, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: object, lines: list[str]) -> None:
        assert stream is not None
        for line in stream:  # type: ignore[attr-defined]
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def describe(self) -> str:
        return (
            f"snocat {' '.join(self.args)} (exit status {self.popen.poll()})\n"
            "--- stdout:\n" + "\n".join(self.stdout) + "\n--- stderr:\n" + "\n".join(self.stderr)
        )

    def wait_line(
        self,
        pattern: str,
        *,
        stream: str = "stdout",
        after: int = 0,
        timeout: float = STEP_TIMEOUT,
    ) -> re.Match[str]:
        """The first line at index >= ``after`` of ``stream`` that ``pattern`` matches."""
        lines = self.stdout if stream == "stdout" else self.stderr
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in lines[after:]:
                    match = regex.search(line)
                    if match:
                        return match
                ended = self.popen.poll() is not None and not any(
                    r.is_alive() for r in self._readers
                )
                remaining = deadline - time.monotonic()
                if ended or remaining <= 0:
                    why = "it exited" if ended else f"{timeout} s passed"
                    raise AssertionError(
                        f"no line {pattern!r} on {stream}; {why}\n{self.describe()}"
                    )
                self._changed.wait(min(remaining, 0.2))

    def events(self) -> list[dict[str, object]]:
        """The stdout lines of a ``--json`` process, each one JSON object."""
        with self._changed:
            lines = list(self.stdout)
        return [json.loads(line) for line in lines]

    def wait_event(
        self, kind: str, *, after: int = 0, timeout: float = STEP_TIMEOUT
    ) -> dict[str, object]:
        match = self.wait_line(rf'"event": "{kind}"', after=after, timeout=timeout)
        event = json.loads(match.string)
        assert isinstance(event, dict)
        return event

    def send(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> float:
        """Signal, wait for a clean exit (status 0); returns the seconds it took."""
        start = time.monotonic()
        self.send(signum)
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            message = f"still running {timeout} s after signal {signum}\n{self.describe()}"
            raise AssertionError(message) from None
        for reader in self._readers:
            reader.join(5)
        assert status == 0, self.describe()
        return time.monotonic() - start

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        for reader in self._readers:
            reader.join(5)


@dataclass
class Lab:
    """A temporary home for the processes of one test."""

    tmp_path: Path
    env: dict[str, str]
    processes: list[Snocat]

    def start(self, *args: str, env: dict[str, str] | None = None, script: bool = False) -> Snocat:
        command = [str(SCRIPT)] if script else [sys.executable, "-m", "snocat_anyio"]
        process = Snocat(list(args), {**self.env, **(env or {})}, self.tmp_path, command)
        self.processes.append(process)
        return process

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = STEP_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to its end (killed after ``timeout``)."""
        return subprocess.run(
            [sys.executable, "-m", "snocat_anyio", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            cwd=self.tmp_path,
            timeout=timeout,
        )

    def certificate(self, name: str, *sans: str) -> tuple[Path, Path]:
        """``certs/NAME.pub.pem`` and ``.priv.pem``, made here (``snocat cert`` has its test)."""
        public = self.tmp_path / "certs" / f"{name}.pub.pem"
        private = self.tmp_path / "certs" / f"{name}.priv.pem"
        if not public.exists():
            now = datetime.datetime.now(datetime.UTC)
            certificate_pem, key_pem = generate_self_signed(list(sans or ("localhost",)), now=now)
            public.parent.mkdir(exist_ok=True)
            public.write_bytes(certificate_pem)
            private.write_bytes(key_pem)
        return public, private

    def tokens(self, name: str, lines: str) -> Path:
        path = self.tmp_path / name
        path.write_text(lines)
        return path


def private_env(tmp_path: Path) -> dict[str, str]:
    """The environment without snocat settings, with a HOME and state dir of its own."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SNOCAT_", "SSLKEYLOGFILE", "XDG_", "FORCE_COLOR", "COLUMNS"))
    }
    (tmp_path / "home").mkdir(exist_ok=True)
    env.update(
        HOME=str(tmp_path / "home"),
        SNOCAT_STATE_DIR=str(tmp_path / "state"),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    processes: list[Snocat] = []
    try:
        yield Lab(tmp_path, private_env(tmp_path), processes)
    finally:
        for process in processes:
            process.kill()


class Background:
    """A command started now and checked later: a run that is slow by design (a timeout)
    overlaps the other tests instead of adding to the file's time."""

    def __init__(self, args: list[str], tmp_path: Path) -> None:
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "snocat_anyio", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=private_env(tmp_path),
            cwd=tmp_path,
        )
        self.seconds = float("inf")
        self.result: subprocess.CompletedProcess[str] | None = None
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        stdout, stderr = self.popen.communicate()
        self.seconds = time.monotonic() - self.started
        self.result = subprocess.CompletedProcess(
            self.popen.args, self.popen.returncode, stdout, stderr
        )

    def finish(self, timeout: float) -> subprocess.CompletedProcess[str]:
        self._waiter.join(max(0.0, self.started + timeout - time.monotonic()))
        if self.result is None:
            self.kill()
            raise AssertionError(f"{self.popen.args!r} still running after {timeout} s")
        return self.result

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self._waiter.join(10)


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


@dataclass(frozen=True)
class Aggregator:
    """A running ``snocat server`` with its identity and one client token."""

    process: Snocat
    quic_port: int
    ports: tuple[int, int]
    certificate: Path
    tokens: Path
    client_token: Path


TOKEN = "alpha s3cret-s3cret-s3cret-1"


def start_server(
    lab: Lab,
    *extra: str,
    quic_port: int | None = None,
    ports: tuple[int, int] | None = None,
    json_mode: bool = True,
    idle_timeout: float = 3.0,
    env: dict[str, str] | None = None,
) -> Aggregator:
    certificate = lab.tmp_path / "certs" / "server.pub.pem"
    if not certificate.exists():
        lab.certificate("server", "localhost")
    key = lab.tmp_path / "certs" / "server.priv.pem"
    tokens = lab.tokens("tokens", f"# tunnels\n{TOKEN}\nbeta b3ta-b3ta-b3ta-b3ta-2\n")
    client_token = lab.tokens("alpha.token", TOKEN + "\n")
    quic_port = quic_port or free_udp_port()
    ports = ports or free_port_range()
    args = [
        "server",
        "--cert",
        str(certificate),
        "--key",
        str(key),
        "--quic",
        f"{HOST}:{quic_port}",
        "--ports",
        f"{ports[0]}:{ports[1]}",
        "--tokens",
        str(tokens),
        "--idle-timeout",
        str(idle_timeout),
    ]
    if json_mode:
        args.append("--json")
    process = lab.start(*args, *extra, env=env)
    if json_mode:
        process.wait_event("listening_on")
    else:
        process.wait_line("listening on")
    return Aggregator(process, quic_port, ports, certificate, tokens, client_token)


def start_client(
    lab: Lab,
    aggregator: Aggregator,
    target_port: int,
    *extra: str,
    env: dict[str, str] | None = None,
    trust: tuple[str, str] | None = None,
) -> Snocat:
    return lab.start(
        "client",
        "--driver",
        f"{HOST}:{aggregator.quic_port}",
        "--san",
        "localhost",
        *(trust or ("--authority", str(aggregator.certificate))),
        "--token-file",
        str(aggregator.client_token),
        "--target",
        f"{HOST}:{target_port}",
        "--backoff-max",
        "1",
        *extra,
        env=env,
    )


def public_port(client: Snocat, *, after: int = 0) -> int:
    match = client.wait_line(r"public address: \S*:(\d+)", after=after)
    return int(match.group(1))


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int) -> str:
    """One ``error:`` line on stderr (log records aside), no traceback, ``status``."""
    context = f"exit status {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.returncode == status, context
    assert "Traceback" not in result.stderr + result.stdout, context
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, context
    others = [line for line in lines if not line.startswith("error: ")]
    assert all(LOG_LINE.match(line) for line in others), context
    return errors[0]


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
    assert not any("reconnecting" in line for line in client.stdout), client.describe()

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
    words = line.split()
    assert words[0] == "snocat"
    words[words.index("--token-file") + 1] = str(state / "client.token")
    words[words.index("--target") + 1] = f"{HOST}:{website.port}"
    client = lab.start(*words[1:], script=SCRIPT.exists())
    fetch_ok(public_port(client), website)
    assert client.stop(signal.SIGINT) < 10
    assert second.stop() < 10


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
        (("--target", "nowhere"), "--target 'nowhere'"),
        (("--target", "127.0.0.1:70000"), "--target '127.0.0.1:70000'"),
        (("--driver", "nowhere"), "--driver must be HOST:PORT"),
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
