"""The ``snocat`` command: ``cert``, ``server``, ``client``, ``demo``, ``status`` and ``token``.

The reference's flags (``snocat-cli`` 0.8) keep their names and meaning; everything
else is an addition.  Every mistake a user can make ends in one line that says what
to do and a non-zero exit status, never a traceback:

====  ==============================================================
code  meaning
====  ==============================================================
0     finished (including a graceful stop on Ctrl-C / SIGTERM)
1     a runtime failure (a socket error, an unexpected exception)
2     a usage or configuration error (flags, files, port range, a public port
      the aggregator cannot give: none free without --reconnect, or outside its range)
3     authentication failed (wrong token, scheme mismatch, token revoked; for
      ``status``, the admin token was refused)
4     the aggregator could not be reached or its certificate is not trusted (for
      ``status``, the admin endpoint did not answer)
====  ==============================================================

One module per command (``_server``, ``_client``, ``_demo``, ``_cert``, ``_status``,
``_token``);
what they share is in ``_common`` (errors, consoles, parsing), ``_output`` (logs,
``--json``, the live table), ``_config`` (``--config``), ``_tokens`` (reloading and
editing tokens files), ``_targets`` (is a target up?) and ``_running`` (signals,
exit statuses).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from . import _cert, _client, _demo, _server, _status, _token
from ._common import (
    EXIT_AUTHENTICATION,
    EXIT_CONNECT,
    EXIT_RUNTIME,
    EXIT_USAGE,
    UsageProblem,
)
from ._group import cli, main

__all__ = [
    "AUTO_PREFERS_UVLOOP",
    "EXIT_AUTHENTICATION",
    "EXIT_CONNECT",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "UsageProblem",
    "cli",
    "main",
    "run_options",
]

# The command modules register themselves with the group as they are imported.
_COMMANDS = (_cert, _client, _demo, _server, _status, _token)

#: Whether ``--loop auto`` takes uvloop when it is installed.  Not now: measured on
#: the tunnel (docs/performance.md, table (g)), uvloop cost 1.1-2x the CPU per MB of
#: asyncio's own loop, moved fewer MB/s and opened streams no faster.
AUTO_PREFERS_UVLOOP = False


def run_options(backend: str, loop: str, *, uvloop_installed: bool) -> dict[str, Any]:
    """``anyio.run``'s ``backend_options`` for ``--backend`` and ``--loop``.

    ``auto`` is uvloop if it is installed and :data:`AUTO_PREFERS_UVLOOP` (it was
    measured faster), else asyncio's own loop; ``uvloop`` insists on it.  Trio has
    one loop of its own: ``--loop`` does not apply."""
    if backend != "asyncio":
        return {}
    if loop == "uvloop" and not uvloop_installed:
        raise UsageProblem("--loop uvloop: uvloop is not installed (pip install 'snocat[fast]')")
    use_uvloop = loop == "uvloop" or (loop == "auto" and AUTO_PREFERS_UVLOOP and uvloop_installed)
    return {"use_uvloop": use_uvloop}


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None
