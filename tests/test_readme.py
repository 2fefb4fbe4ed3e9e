"""README.md as written: its shell commands and its Python snippets, run as real
processes.  The only changes made to them are the ports (the README's fixed 9090,
8000 and 8080-8090 become free ones, as flags appended or text replaced), since other
programs may hold those on a shared machine."""

from __future__ import annotations

import http.client
import re
import shlex
import signal
import sys
import time
import tomllib
from pathlib import Path

import pytest
from cli_harness import (  # noqa: F401 (fixtures)
    HOST,
    Lab,
    Snocat,
    Website,
    free_port_range,
    free_tcp_port,
    free_udp_port,
    lab_fixture,
    private_env,
    website_fixture,
)

from snocat_anyio.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The text of the README section whose heading is ``title``, to the next heading
    of the same or a higher level (a ``#`` inside a code block is no heading)."""
    lines = README.splitlines(keepends=True)
    fenced = False
    start: int | None = None
    level = 0
    for number, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
            continue
        heading = None if fenced else re.match(r"(#+) (.*)\n", line)
        if heading is None:
            continue
        if start is None and heading.group(2) == title:
            start, level = number + 1, len(heading.group(1))
        elif start is not None and len(heading.group(1)) <= level:
            return "".join(lines[start:number])
    assert start is not None, title
    return "".join(lines[start:])


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def shell_commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1]
            continue
        commands.append((current + line).strip())
        current = ""
    return commands


@pytest.fixture
def clone(lab: Lab) -> Path:
    """A directory like a fresh clone after the README's one-command install: its
    ``.venv`` is this test run's virtual environment."""
    directory = lab.tmp_path / "clone"
    directory.mkdir()
    (directory / ".venv").symlink_to(Path(sys.prefix))
    assert (directory / ".venv" / "bin" / "snocat").exists()
    return directory


def shell(lab: Lab, clone: Path, command: str) -> Snocat:
    """``command`` run by bash in ``clone``, with a PATH that has no virtual environment
    on it: the README's commands must not need an activated one."""
    env = {**private_env(lab.tmp_path), "PATH": "/usr/bin:/bin"}
    process = Snocat([command], env, clone, ["bash", "-c"])
    lab.processes.append(process)
    return process


def finish(process: Snocat, timeout: float = 30) -> None:
    status = process.popen.wait(timeout)
    for reader in process._readers:
        reader.join(5)
    assert status == 0, process.describe()


def test_three_terminals_and_the_python_snippets_as_written(
    lab: Lab, clone: Path, website: Website
) -> None:
    commands = shell_commands(
        code_blocks(section("Three terminals: a real aggregator and client"), "sh")[0]
    )
    assert [command.split()[0] for command in commands] == [
        ".venv/bin/snocat",
        "(umask",
        ".venv/bin/snocat",
        ".venv/bin/snocat",
        "curl",
    ], commands
    certificate, token_add, server_command, client_command, curl = commands

    # 1. The certificate and the token, exactly as written.
    finish(shell(lab, clone, certificate))
    finish(shell(lab, clone, token_add))
    for name in ("agg.priv.pem", "tokens", "office-1.token"):
        assert (clone / name).stat().st_mode & 0o777 == 0o600, name
    line = (clone / "office-1.token").read_text()
    assert line.startswith("office-1 ") and (clone / "tokens").read_text() == line

    # 2. The aggregator, on free ports.
    quic_port = free_udp_port()
    ports = free_port_range()
    server = shell(
        lab, clone, f"exec {server_command} --quic {HOST}:{quic_port} --ports {ports[0]}:{ports[1]}"
    )
    server.wait_line("listening on")

    # 3. The client, towards that port and the test's web server.
    assert "127.0.0.1:9090" in client_command and "127.0.0.1:8000" in client_command
    client = shell(
        lab,
        clone,
        "exec "
        + client_command.replace("127.0.0.1:9090", f"{HOST}:{quic_port}").replace(
            "127.0.0.1:8000", f"{HOST}:{website.port}"
        ),
    )
    port = int(client.wait_line(r"public address: 127\.0\.0\.1:(\d+)").group(1))
    url = shlex.split(curl)[1]
    assert url == "http://127.0.0.1:8080/"
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    connection.request("GET", "/")
    assert connection.getresponse().status == 200
    connection.close()
    assert not any("WARNING" in text for text in server.stderr + client.stderr), (
        server.describe() + client.describe()
    )
    client.send(signal.SIGTERM)
    finish(client)

    # The Python snippets, run beside that aggregator and stopped with Ctrl-C (SIGINT).
    anyio_snippet = code_blocks(section("asyncio or trio (`snocat_anyio`)"), "python")[0]
    sync_snippet = code_blocks(section("Without an event loop (`snocat_sync`)"), "python")[0]
    trio_snippet = anyio_snippet.replace("anyio.run(main)", 'anyio.run(main, backend="trio")')
    assert trio_snippet != anyio_snippet
    for name, snippet in (("anyio", anyio_snippet), ("trio", trio_snippet), ("sync", sync_snippet)):
        assert "server_port=9090" in snippet and '"127.0.0.1:8000"' in snippet, name
        script = clone / f"{name}_snippet.py"
        script.write_text(
            snippet.replace("server_port=9090", f"server_port={quic_port}").replace(
                '"127.0.0.1:8000"', f'"{HOST}:{website.port}"'
            )
        )
        run = shell(lab, clone, f"exec .venv/bin/python {script.name}")
        port = int(run.wait_line(r"public.*127\.0\.0\.1:(\d+)").group(1))
        connection = http.client.HTTPConnection(HOST, port, timeout=10)
        connection.request("GET", "/small.bin")
        assert connection.getresponse().read() and True
        connection.close()
        run.send(signal.SIGINT)
        finish(run)
        assert not run.stderr, (name, run.describe())  # no KeyboardInterrupt traceback
        # The client said goodbye: the aggregator saw it close, not time out.
        server.wait_line("closed by the peer: code 0x0", stream="stderr")
        server.stderr.clear()
    server.send(signal.SIGTERM)
    finish(server)


def test_reach_tunnels_by_name_as_written(lab: Lab, clone: Path, website: Website) -> None:
    """The section's commands: the aggregator with shared listeners, a client by name,
    curl through it (a name that reaches nothing answers 404), a pool's token."""
    setup = shell_commands(
        code_blocks(section("Three terminals: a real aggregator and client"), "sh")[0]
    )
    for command in setup[:2]:  # the certificate and the office-1 token
        finish(shell(lab, clone, command))
    blocks = code_blocks(section("Reach tunnels by name"), "sh")
    server_command, client_command, reach, unknown = shell_commands(blocks[0])
    quic_port, ports = free_udp_port(), free_port_range()
    http_port, tls_port = free_tcp_port(), free_tcp_port()

    def ported(command: str) -> str:
        return (
            command.replace("127.0.0.1:9090", f"{HOST}:{quic_port}")
            .replace("127.0.0.1:8000", f"{HOST}:{website.port}")
            .replace(":8880", f":{http_port}")
            .replace(":8443", f":{tls_port}")
        )

    assert "--http 127.0.0.1:8880 --tls 127.0.0.1:8443" in server_command
    server = shell(
        lab,
        clone,
        f"exec {ported(server_command)} --quic {HOST}:{quic_port} --ports {ports[0]}:{ports[1]}",
    )
    server.wait_line(r"listening on .* \(HTTP: NAME\.tunnels\.example\.com", stream="stderr")
    client = shell(lab, clone, "exec " + ported(client_command))
    client.wait_line(
        rf"public address: office-1\.tunnels\.example\.com:{http_port} -> forwards to "
        rf"127\.0\.0\.1:{website.port} \(http by name\)"
    )
    fetched = shell(lab, clone, ported(reach))
    finish(fetched)
    assert any("small.bin" in line for line in fetched.stdout), fetched.describe()
    refused = shell(lab, clone, ported(unknown))
    finish(refused)
    assert refused.stdout == ["no tunnel named nobody"], refused.describe()
    client.send(signal.SIGTERM)
    finish(client)
    server.send(signal.SIGTERM)
    finish(server)
    [pool_command] = shell_commands(blocks[1])
    finish(shell(lab, clone, pool_command))
    name, secret = (clone / "web.token").read_text().split()
    assert f"{name} {secret} pool\n" in (clone / "tokens").read_text() and name == "web"


def test_the_trio_extra_exists() -> None:
    """The README's `pip install -e '.[trio]'` installs trio."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(req.startswith("trio") for req in project["optional-dependencies"]["trio"])
    assert "'.[trio]'" in README


@pytest.mark.parametrize("command", ["server", "client"])
def test_the_options_table_lists_every_option(command: str) -> None:
    table = section("Options")
    part = table[table.index(f"`snocat {command}`") :]
    part = part[: part.index("\n\n", part.index("|---|"))]
    if command == "server":  # the fleet's options have their own table
        part += section("A fleet of aggregators")
    missing = [
        opt
        for param in cli.commands[command].params
        if not getattr(param, "hidden", False)
        for opt in param.opts
        if opt.startswith("--") and opt not in ("--help",) and opt not in part
    ]
    assert not missing, missing


def test_the_fleet_section_as_written(lab: Lab, clone: Path, website: Website) -> None:
    """Two nodes and a client as the README's fleet section runs them (free ports in
    place of 6379, 9090, 8000 and 8080-8090); a fetch through each node; then node a
    is killed and the client is served through b on the same port."""
    commands = shell_commands(code_blocks(section("A fleet of aggregators"), "sh")[0])
    store_command, secret, node_a, node_b, client_command, curl_a, curl_b = commands
    assert [c.split()[0] for c in (node_a, node_b, client_command)] == [".venv/bin/snocat"] * 3
    assert (curl_a, curl_b) == ("curl http://127.0.0.2:8080/", "curl http://127.0.0.3:8080/")
    finish(shell(lab, clone, ".venv/bin/snocat cert agg --san localhost"))
    finish(shell(lab, clone, "(umask 077 && .venv/bin/snocat token add office-1 "
                 "--tokens tokens > office-1.token)"))  # fmt: skip
    (clone / "bench").symlink_to(ROOT / "bench")  # the clone's own files
    store_port = free_port_range(1)[0]
    store = shell(lab, clone, "exec " + store_command.replace("6379", str(store_port)))
    store.wait_line("Ready to accept connections")
    finish(shell(lab, clone, secret))
    assert (clone / "fleet.token").stat().st_mode & 0o777 == 0o600
    quic_port = free_udp_port()
    ports = free_port_range()

    def adapted(command: str) -> str:
        return (
            command.replace("6379", str(store_port))
            .replace(":9090", f":{quic_port}")
            .replace("127.0.0.1:8000", f"{HOST}:{website.port}")
            + f" --ports {ports[0]}:{ports[1]}"
        )

    nodes = [shell(lab, clone, "exec " + adapted(node)) for node in (node_a, node_b)]
    for node in nodes:
        node.wait_line("listening on")
    client = shell(lab, clone, "exec " + adapted(client_command).rsplit(" --ports", 1)[0])
    port = int(client.wait_line(r"public address: 127\.0\.0\.2:(\d+)").group(1))
    for host in ("127.0.0.2", "127.0.0.3"):
        deadline = time.monotonic() + 15
        while True:
            try:
                connection = http.client.HTTPConnection(host, port, timeout=10)
                connection.request("GET", "/small.bin")
                assert connection.getresponse().status == 200
                connection.close()
                break
            except OSError:
                assert time.monotonic() < deadline, host
                time.sleep(0.2)
    nodes[0].popen.kill()
    again = int(client.wait_line(r"public address: 127\.0\.0\.3:(\d+)").group(1))
    assert again == port
    connection = http.client.HTTPConnection("127.0.0.3", port, timeout=10)
    connection.request("GET", "/small.bin")
    assert connection.getresponse().status == 200
    connection.close()
