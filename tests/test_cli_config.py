"""``--config FILE`` (TOML) for ``snocat server`` and ``snocat client``: the examples in
docs/ run with the real CLI, flags beat the file which beats the defaults, errors
name the file, line and key, and the server's ``[tokens]`` reload like a tokens file."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from cli_harness import (  # noqa: F401 (fixtures)
    HOST,
    TOKEN,
    Lab,
    Website,
    assert_one_line_error,
    fetch_ok,
    free_port_range,
    free_tcp_port,
    free_udp_port,
    lab_fixture,
    public_port,
    website_fixture,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
ALPHA_SECRET = TOKEN.split()[1]


def test_the_example_configs_run_with_the_real_cli(lab: Lab, website: Website) -> None:
    # The examples, copied with the files they name (relative to the file's directory).
    here = lab.tmp_path / "etc"
    here.mkdir()
    shutil.copy(DOCS / "server.example.toml", here)
    shutil.copy(DOCS / "client.example.toml", here)
    certificate, key = lab.certificate("server", "localhost")
    shutil.copy(certificate, here / "agg.pub.pem")
    shutil.copy(key, here / "agg.priv.pem")
    (here / "tokens").write_text(f"office-1 {ALPHA_SECRET}\n")
    (here / "office-1.token").write_text(f"office-1 {ALPHA_SECRET}\n")
    for name in ("tokens", "office-1.token"):
        (here / name).chmod(0o600)

    quic_port = free_udp_port()
    ports = free_port_range()
    # The example listens on 0.0.0.0:9090 and 8080-8090: flags move it to test ports.
    server = lab.start(
        "server",
        "--config",
        str(here / "server.example.toml"),
        "--quic",
        f"{HOST}:{quic_port}",
        "--ports",
        f"{ports[0]}:{ports[1]}",
        "--json",
    )
    assert server.wait_event("listening_on")["address"] == f"{HOST}:{quic_port}"
    # advertise comes from the file: the banner names it.
    server.wait_line(r"clients dial agg\.example\.com:9090", stream="stderr")
    client = lab.start(
        "client",
        "--config",
        str(here / "client.example.toml"),
        "--driver",
        f"{HOST}:{quic_port}",
        "--san",
        "localhost",
        "--target",
        f"{HOST}:{website.port}",
    )
    port = public_port(client)
    assert ports[0] <= port <= ports[1]
    fetch_ok(port, website, "small.bin")
    assert server.wait_event("tunnel_authenticated")["name"] == "office-1"
    assert not any("WARNING" in line for line in client.stderr), client.describe()
    assert client.stop() < 10
    assert server.stop() < 10


def test_a_flag_beats_the_file_which_beats_the_default(lab: Lab, website: Website) -> None:
    lab.certificate("server", "localhost")
    in_file, on_command_line = free_udp_port(), free_udp_port()
    ports = free_port_range()
    config = lab.tokens(
        "server.toml",
        f'cert = "certs/server.pub.pem"\nkey = "certs/server.priv.pem"\n'
        f'quic = "{HOST}:{in_file}"\nports = "{ports[0]}:{ports[1]}"\njson = true\n'
        f'[tokens]\nalpha = "{ALPHA_SECRET}"\n',
    )
    config.chmod(0o600)
    server = lab.start("server", "--config", str(config), "--quic", f"{HOST}:{on_command_line}")
    assert server.wait_event("listening_on")["address"] == f"{HOST}:{on_command_line}"
    token = lab.tokens("alpha.token", TOKEN + "\n")
    token.chmod(0o600)
    client_config = lab.tokens(
        "client.toml",
        f'driver = "{HOST}:{in_file}"\nsan = "localhost"\n'
        f'authority = "certs/server.pub.pem"\ntoken-file = "alpha.token"\n'
        f'target = ["{HOST}:{website.port}", "{HOST}:{free_tcp_port()}"]\n',
    )
    client = lab.start(
        "client", "--config", str(client_config), "--driver", f"{HOST}:{on_command_line}"
    )
    # Two targets: their grants may be printed in either order.
    port = public_port(client, target=f"{HOST}:{website.port}")
    assert ports[0] <= port <= ports[1]  # from the file; the default is 8080:8090
    fetch_ok(port, website, "small.bin")
    line = server.wait_line(
        rf'^(?=.*"event": "port_granted")(?=.*"target": "[^"]*:{website.port}")'
    )
    assert json.loads(line.string)["port"] == port
    # The second target of the file's list is checked too (nothing listens there).
    client.wait_line(r"WARNING .*target 127\.0\.0\.1:\d+ does not accept", stream="stderr")
    assert client.stop() < 10
    assert server.stop() < 10


def test_the_tokens_table_reloads_like_a_tokens_file(lab: Lab, website: Website) -> None:
    lab.certificate("server", "localhost")
    quic_port = free_udp_port()
    beta_secret = "b3ta-b3ta-b3ta-b3ta-2"
    head = (
        'cert = "certs/server.pub.pem"\nkey = "certs/server.priv.pem"\n'
        f'quic = "{HOST}:{quic_port}"\nports = "{{}}:{{}}"\njson = true\n'.format(
            *free_port_range()
        )
    )
    config = lab.tokens(
        "server.toml", f'{head}[tokens]\nalpha = "{ALPHA_SECRET}"\nbeta = "{beta_secret}"\n'
    )
    server = lab.start("server", "--config", str(config))
    server.wait_event("listening_on")
    warning = server.wait_line("readable by other", stream="stderr").string
    assert f"chmod 600 {config}" in warning  # it holds secrets now
    token = lab.tokens("alpha.token", TOKEN + "\n")
    token.chmod(0o600)
    client = lab.start(
        "client",
        "--driver",
        f"{HOST}:{quic_port}",
        "--san",
        "localhost",
        "--authority",
        str(lab.tmp_path / "certs" / "server.pub.pem"),
        "--token-file",
        str(token),
        "--target",
        f"{HOST}:{website.port}",
    )
    public_port(client)
    config.write_text(f'{head}[tokens]\nbeta = "{beta_secret}"\n')
    server.send(signal.SIGHUP)
    assert server.wait_event("tokens_replaced")["closed"] == ["alpha"]
    assert client.popen.wait(15) == 3, client.describe()
    # A broken table keeps the tokens, naming the line of the key.
    config.write_text(f'{head}[tokens]\nbeta = "short"\n')
    line = server.wait_line("keeping the previous tokens", stream="stderr").string
    assert f"{config} line 7: [tokens] the secret for 'beta'" in line, line
    assert server.stop() < 10


SERVER_BASE = 'cert = "certs/server.pub.pem"\nkey = "certs/server.priv.pem"\n'


@pytest.mark.parametrize(
    ("command", "text", "expected"),
    [
        ("server", SERVER_BASE + "max-tunnels = 5\nports = 80\n", "line 4: ports must be a string"),
        ("server", SERVER_BASE + "max-tunels = 5\n", "line 3: unknown setting 'max-tunels'"),
        ("server", SERVER_BASE + "max-tunels = 5\n", "(did you mean 'max-tunnels'?)"),
        (
            "server",
            SERVER_BASE + 'max-tunnels = "many"\n',
            "line 3: max-tunnels must be an integer",
        ),
        (
            "server",
            SERVER_BASE + "\nmax-tunnels = 0\n",
            "line 4: max-tunnels: 0 is not in the range",
        ),
        ("server", SERVER_BASE + "idle-timeout = true\n", "line 3: idle-timeout must be a number"),
        ("server", SERVER_BASE + 'auth = "magic"\n', "line 3: auth: 'magic' is not one of"),
        ("server", SERVER_BASE + "quic = \n", "line 3, column 8: not valid TOML"),
        ("server", SERVER_BASE + "[fleet]\nsize = 3\n", "line 3: [fleet] is not a table"),
        (
            "server",
            SERVER_BASE + '[tokens]\nok = "s3cret-s3cret-s3cret"\nx = "short"\n',
            "line 5: [tokens] the secret for 'x'",
        ),
        ("server", SERVER_BASE + "[tokens]\nbad = 5\n", "line 4: [tokens] bad must be a string"),
        (
            "server",
            SERVER_BASE + 'quic = "https://agg.example.com:9090"\n',
            "--quic must be HOST:PORT (e.g. 127.0.0.1:9090), not a URL",
        ),
        ("client", "target = 8000\n", "line 1: target must be a string or a list of them"),
        ("client", 'driver = "a:1"\nreconnect = "no"\n', "line 2: reconnect must be true or false"),
        ("client", "[tokens]\nalpha = 'x'\n", "line 1: unknown setting 'tokens' for snocat client"),
    ],
)
def test_config_errors_name_the_file_line_and_key(
    lab: Lab, command: str, text: str, expected: str
) -> None:
    lab.certificate("server", "localhost")
    config = lab.tokens(f"{command}.toml", text)
    result = lab.run(command, "--config", str(config))
    line = assert_one_line_error(result, 2)
    assert expected in line, line
    if "HOST:PORT" not in expected:
        assert f"error: {config} line" in line, line


def test_a_missing_config_file_is_one_line(lab: Lab) -> None:
    result = lab.run("client", "--config", "nowhere.toml")
    assert "cannot read --config file 'nowhere.toml'" in assert_one_line_error(result, 2)
