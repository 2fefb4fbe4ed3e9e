"""What the CLI tests share: real ``snocat`` processes on loopback, in a private home.

Every test runs ``python -m snocat_anyio`` (or the ``snocat`` console script) as a
subprocess with stdin closed, a private HOME and state directory, and ports picked
free on 127.0.0.1.  A local threaded HTTP server is the forwarded target; data that
crosses a tunnel is checked by SHA-256.  Every process a test starts is killed when
the test ends, whatever happened (the ``lab`` fixture).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import http.server
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
from dataclasses import dataclass
from pathlib import Path

import pytest

from snocat_proto._wire.certificates import (
    generate_self_signed,
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


@contextlib.contextmanager
def udp_echo_port(reply: Callable[[bytes], bytes] = bytes) -> Iterator[int]:
    """A UDP target on 127.0.0.1, in a thread, answering each datagram with
    ``reply(data)`` (itself by default); yields its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65535)
            except TimeoutError:
                continue
            sock.sendto(reply(data), addr)

    thread = threading.Thread(target=serve, name="udp-echo")
    thread.start()
    try:
        yield int(sock.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        sock.close()


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


@pytest.fixture(scope="module", name="website")
def website_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Website]:
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


def fetch_digest(port: int, name: str, timeout: float = 30.0, *, host: str = HOST) -> str:
    """GET ``/name`` through ``host:port`` (http.client: no proxy settings apply); the
    SHA-256 of the body."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
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


@pytest.fixture(name="lab")
def lab_fixture(tmp_path: Path) -> Iterator[Lab]:
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


def public_port(client: Snocat, *, after: int = 0, target: str | None = None) -> int:
    """The public port of the client's first grant, or of the one for ``target``
    (``HOST:PORT``): with several targets, grants are printed in the order they come."""
    pattern = r"public address: \S*:(\d+)"
    if target is not None:
        pattern += rf" -> forwards to {re.escape(target)}(?:\s|$)"
    match = client.wait_line(pattern, after=after)
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
