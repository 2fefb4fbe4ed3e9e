"""``snocat status``: a running server's tunnels, from its admin endpoint's ``/status``.

The table is the live table's (:func:`._output.status_view`), drawn once.  No event
loop: one blocking HTTP request (``http.client``) is all it does.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import rich_click as click
from rich.console import Console

from ._common import (
    ADMIN_ENVIRONMENT,
    DEFAULT_ADMIN_HOST,
    DEFAULT_ADMIN_PORT,
    EXIT_AUTHENTICATION,
    EXIT_CONNECT,
    EXIT_RUNTIME,
    UsageProblem,
    fail,
    read_admin_token,
)
from ._group import cli
from ._output import duration, status_view

#: How long the server may take to answer.
REQUEST_TIMEOUT = 10.0
#: The most of ``/status`` read (a server with 1,000 tunnels sends ~300 KB).
MAX_BODY = 64 * 1024 * 1024


def admin_url(text: str) -> urllib.parse.SplitResult:
    """``--admin``: a URL (``http://HOST:PORT``), or ``HOST:PORT``, or a bare ``PORT``."""
    if text.isdigit():
        text = f"{DEFAULT_ADMIN_HOST}:{text}"
    if "://" not in text:
        text = "http://" + text
    url = urllib.parse.urlsplit(text)
    try:
        url.port  # noqa: B018 (raises for a bad port)
    except ValueError:
        raise UsageProblem(f"--admin {text!r}: not a valid port") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UsageProblem(f"--admin must be a URL like http://127.0.0.1:9100, not {text!r}")
    return url


def fetch_status(url: urllib.parse.SplitResult, token: bytes | None) -> dict[str, Any]:
    """GET ``/status`` (below ``url``'s path); one line and an exit status on failure."""
    connection_type = (
        http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    )
    where = urllib.parse.urlunsplit((url.scheme, url.netloc, "", "", ""))
    connection = connection_type(url.hostname or "", url.port, timeout=REQUEST_TIMEOUT)
    headers = {"Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = "Bearer " + token.decode("ascii")
    try:
        connection.request("GET", url.path.rstrip("/") + "/status", headers=headers)
        response = connection.getresponse()
        body = response.read(MAX_BODY)
    except (OSError, http.client.HTTPException) as exc:
        reason = "no answer in time" if isinstance(exc, socket.timeout) else str(exc) or repr(exc)
        fail(
            f"cannot reach the admin endpoint at {where} ({reason}); is snocat server running "
            "with --metrics there?",
            EXIT_CONNECT,
        )
    finally:
        connection.close()
    if response.status == 401:
        hint = "the token was refused" if token is not None else "give --admin-token-file FILE"
        fail(f"the admin endpoint at {where} needs its bearer token: {hint}", EXIT_AUTHENTICATION)
    if response.status != 200:
        fail(f"the admin endpoint at {where} answered {response.status} {response.reason}", 1)
    try:
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("not an object")
    except ValueError:
        fail(f"the admin endpoint at {where} did not answer with a status document", 1)
    return document


@cli.command()
@click.option(
    "--admin",
    "admin_text",
    default=f"http://{DEFAULT_ADMIN_HOST}:{DEFAULT_ADMIN_PORT}",
    show_default=True,
    envvar=ADMIN_ENVIRONMENT,
    help="The server's admin endpoint (its --metrics address), as a URL, HOST:PORT or "
    f"PORT [env: ${ADMIN_ENVIRONMENT}].",
)
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The bearer token the server's --admin-token-file holds.",
)
@click.option(
    "--json",
    "json_mode",
    is_flag=True,
    help="Print the /status document (JSON) as the server sent it.",
)
def status(admin_text: str, admin_token_file: Path | None, json_mode: bool) -> None:
    """Show a running server's tunnels (from its `--metrics` endpoint's /status).

    Exit status 4 if the server cannot be reached, 3 if it refuses the token."""
    url = admin_url(admin_text)
    token = read_admin_token(admin_token_file) if admin_token_file is not None else None
    document = fetch_status(url, token)
    if json_mode:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return
    from .._metrics import status_from_document  # here: prometheus_client loads slowly

    now = time.time()
    try:
        node = document.get("node", {})
        statuses = [status_from_document(tunnel, now) for tunnel in document["tunnels"]]
        header = (
            f"snocat {node.get('version', '?')} on {node.get('quic') or '?'} (QUIC), "
            f"up {duration(float(node.get('uptime', 0)))}"
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        fail("the admin endpoint's status document is not one this snocat reads", EXIT_RUNTIME)
    console = Console(soft_wrap=False, emoji=False, highlight=False)
    console.print(header, markup=False)
    console.print(status_view(statuses, now, console.width))
