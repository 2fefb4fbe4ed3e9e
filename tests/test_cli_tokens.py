"""Tokens without a restart: SIGHUP and file changes reload them, ``snocat token``
edits the file, and files holding secrets that others may read get a warning.
Real server and client processes on loopback (tests/cli_harness.py)."""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
import time

from cli_harness import (  # noqa: F401 (fixtures)
    HOST,
    STEP_TIMEOUT,
    TOKEN,
    Aggregator,
    Lab,
    Website,
    assert_one_line_error,
    lab_fixture,
    public_port,
    start_client,
    start_server,
    wait_until,
    website_fixture,
)

BETA = "beta b3ta-b3ta-b3ta-b3ta-2"
GAMMA = "gamma g4mma-g4mma-g4mma-g4mma-3"


def token_file(lab: Lab, line: str) -> str:
    path = lab.tokens(f"{line.split()[0]}.token", line + "\n")
    path.chmod(0o600)
    return str(path)


def wait_exit(process: object, timeout: float = STEP_TIMEOUT) -> int:
    popen = process.popen  # type: ignore[attr-defined]
    return int(popen.wait(timeout))


class SlowDownload:
    """GET /big.bin through ``port``, read at about 1.3 MB/s through a small receive
    buffer, so the transfer is still crossing the tunnel seconds later."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received = 0
        self.digest: str | None = None
        self.error: BaseException | None = None
        self.halfway = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
                sock.settimeout(20)
                sock.connect((HOST, self.port))
                sock.sendall(b"GET /big.bin HTTP/1.0\r\n\r\n")
                data = bytearray()
                while chunk := sock.recv(32 * 1024):
                    data += chunk
                    self.received = len(data)
                    if self.received > 512 * 1024:
                        self.halfway.set()
                    time.sleep(0.025)
            self.digest = hashlib.sha256(bytes(data).partition(b"\r\n\r\n")[2]).hexdigest()
        except BaseException as exc:
            self.error = exc
        finally:
            self.halfway.set()

    def wait(self, timeout: float = 30) -> str:
        self._thread.join(timeout)
        assert self.error is None, self.error
        assert self.digest is not None, "the download did not finish"
        return self.digest


def test_sighup_reloads_the_tokens_closing_only_the_revoked_tunnel(
    lab: Lab, website: Website
) -> None:
    aggregator = start_server(lab)
    alpha = start_client(lab, aggregator, website.port)
    beta = start_client(lab, aggregator, website.port, "--token-file", token_file(lab, BETA))
    alpha_port, beta_port = public_port(alpha), public_port(beta)
    assert alpha_port != beta_port

    download = SlowDownload(beta_port)
    assert download.halfway.wait(STEP_TIMEOUT)
    at_reload = download.received
    lab.tokens("tokens", f"# alpha withdrawn\n{BETA}\n")
    aggregator.process.send(signal.SIGHUP)

    replaced = aggregator.process.wait_event("tokens_replaced")
    assert replaced["closed"] == ["alpha"] and replaced["names"] == 1
    assert wait_exit(alpha) == 3, alpha.describe()
    error = [line for line in alpha.stderr if line.startswith("error:")]
    assert len(error) == 1 and "revoked" in error[0], alpha.describe()

    assert download.wait() == website.digests["big.bin"]
    assert download.received - at_reload > 1024 * 1024  # most of it crossed after the reload
    assert beta.popen.poll() is None
    assert aggregator.process.popen.poll() is None  # SIGHUP used to kill it (status 129)
    assert any("SIGHUP received" in line for line in aggregator.process.stderr)
    assert beta.stop() < 10
    assert aggregator.process.stop() < 10


def test_a_changed_tokens_file_is_noticed_without_a_signal(lab: Lab, website: Website) -> None:
    aggregator = start_server(lab)
    alpha = start_client(lab, aggregator, website.port)
    public_port(alpha)
    lines = len(aggregator.process.stdout)
    changed = time.monotonic()
    lab.tokens("tokens", f"{TOKEN}\n{BETA}\n{GAMMA}\n")
    replaced = aggregator.process.wait_event("tokens_replaced", after=lines)
    noticed = time.monotonic() - changed
    assert noticed < 4, noticed
    assert replaced["closed"] == [] and replaced["names"] == 3
    gamma = start_client(lab, aggregator, website.port, "--token-file", token_file(lab, GAMMA))
    public_port(gamma)
    assert alpha.popen.poll() is None
    assert aggregator.process.stop() < 10


def test_a_broken_tokens_file_keeps_the_old_tokens(lab: Lab, website: Website) -> None:
    aggregator = start_server(lab)
    alpha = start_client(lab, aggregator, website.port)
    public_port(alpha)
    server = aggregator.process
    lab.tokens("tokens", f"{TOKEN}\nbeta tooshort\n")
    warning = server.wait_line(r"WARNING .*tokens line 2", stream="stderr").string
    assert "keeping the previous tokens" in warning and str(aggregator.tokens) in warning
    time.sleep(3)  # polled three more times: no second warning for the same file
    assert len([line for line in server.stderr if "tokens line 2" in line]) == 1
    server.send(signal.SIGHUP)  # an explicit reload is answered, here with the same warning
    wait_until(
        lambda: len([line for line in server.stderr if "tokens line 2" in line]) == 2,
        STEP_TIMEOUT,
        "a warning for the SIGHUP",
    )
    assert not [e for e in server.events() if e["event"] == "tokens_replaced"]
    # The old tokens still admit beta, and alpha was never dropped.
    beta = start_client(lab, aggregator, website.port, "--token-file", token_file(lab, BETA))
    public_port(beta)
    assert alpha.popen.poll() is None
    # An empty file would revoke everyone at once (or be a half-written file): refused too.
    lab.tokens("tokens", "# nothing\n")
    server.wait_line("lists no tunnel names; keeping the previous tokens", stream="stderr")
    assert not [e for e in server.events() if e["event"] == "tokens_replaced"]
    assert server.stop() < 10


def test_token_add_list_revoke_round_trip(lab: Lab, website: Website) -> None:
    tokens = lab.tokens("office.tokens", "")
    tokens.write_text(f"# our tunnels\n{TOKEN}\n\n# more below\n")
    tokens.chmod(0o644)
    added = lab.run("token", "add", "office-1", "--tokens", str(tokens))
    assert added.returncode == 0, added.stderr
    line = added.stdout
    assert line.count("\n") == 1 and line.startswith("office-1 "), added.stdout
    secret = line.split()[1]
    assert len(secret) >= 32
    assert tokens.stat().st_mode & 0o777 == 0o600
    text = tokens.read_text()
    assert text == f"# our tunnels\n{TOKEN}\n\n# more below\n{line}"
    assert list(tokens.parent.glob(".office.tokens.*")) == []  # no temporary file left

    listed = lab.run("token", "list", "--tokens", str(tokens))
    assert listed.returncode == 0 and listed.stdout == "alpha\noffice-1\n"
    assert secret not in listed.stdout + listed.stderr
    again = lab.run("token", "add", "office-1", "--tokens", str(tokens))
    assert "already has a token" in assert_one_line_error(again, 2)
    assert tokens.read_text() == text
    bad_name = lab.run("token", "add", "a/b", "--tokens", str(tokens))
    assert "NAME" in assert_one_line_error(bad_name, 2)

    # The printed line is the client's token file; a running server picks the name up.
    client_token = lab.tokens("office-1.token", line)
    client_token.chmod(0o600)
    aggregator = start_server(lab, "--tokens", str(tokens))
    office = start_client(lab, aggregator, website.port, "--token-file", str(client_token))
    public_port(office)

    revoked = lab.run("token", "revoke", "office-1", "--tokens", str(tokens))
    assert revoked.returncode == 0, revoked.stderr
    assert tokens.read_text() == f"# our tunnels\n{TOKEN}\n\n# more below\n"
    assert tokens.stat().st_mode & 0o777 == 0o600
    assert wait_exit(office) == 3, office.describe()
    replaced = aggregator.process.wait_event("tokens_replaced")
    assert replaced["closed"] == ["office-1"]
    missing = lab.run("token", "revoke", "office-1", "--tokens", str(tokens))
    assert "has no token" in assert_one_line_error(missing, 2)
    assert lab.run("token", "list", "--tokens", str(tokens)).stdout == "alpha\n"
    assert aggregator.process.stop() < 10


def test_token_commands_default_to_the_state_directory(lab: Lab) -> None:
    added = lab.run("token", "add", "laptop")
    assert added.returncode == 0, added.stderr
    state_tokens = lab.tmp_path / "state" / "tokens"
    assert state_tokens.read_text() == added.stdout
    assert state_tokens.stat().st_mode & 0o777 == 0o600
    assert lab.run("token", "list").stdout == "laptop\n"
    missing = lab.run("token", "list", "--tokens", str(lab.tmp_path / "nope"))
    assert "no tokens file" in assert_one_line_error(missing, 2)


def test_secret_files_readable_by_others_get_a_warning(lab: Lab, website: Website) -> None:
    aggregator = start_server(lab)  # its tokens file has the umask's mode, 0644
    tokens = str(aggregator.tokens)
    warning = aggregator.process.wait_line(r"WARNING .*readable by other", stream="stderr")
    assert f"tokens file {tokens} " in warning.string and f"chmod 600 {tokens}" in warning.string
    client = start_client(lab, aggregator, website.port)  # alpha.token: 0644 too
    public_port(client)
    line = client.wait_line(r"WARNING .*readable by other", stream="stderr").string
    assert f"chmod 600 {aggregator.client_token}" in line
    quiet = start_client(lab, aggregator, website.port, "--token-file", token_file(lab, BETA))
    public_port(quiet)
    assert not any("readable by other" in text for text in quiet.stderr), quiet.describe()
    assert aggregator.process.stop() < 10
