"""Running a command's event loop: signals, and one line and an exit status for an error."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from snocat_proto._wire.errors import LocalProtocolError

from .._errors import AuthenticationError, ConnectError, PortRefusedError, SnocatError
from ._common import (
    EXIT_AUTHENTICATION,
    EXIT_CONNECT,
    EXIT_RUNTIME,
    EXIT_USAGE,
    UsageProblem,
    fail,
    logger,
)


async def until_signalled(
    scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Ctrl-C / SIGTERM cancel ``scope`` (a graceful stop); a second one exits at once.

    Start it with ``tg.start`` before announcing anything: a signal sent as soon as the
    process says it is ready must find the handler installed (else SIGTERM kills it).
    """
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if scope.cancel_called:
                os._exit(130)
            logger.info("%s received: shutting down (again to force)", signal.Signals(signum).name)
            scope.cancel()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


#: Which error decides the message and exit status, most specific first.
_EXIT_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (AuthenticationError, EXIT_AUTHENTICATION),
    (ConnectError, EXIT_CONNECT),
    (PortRefusedError, EXIT_USAGE),
    (UsageProblem, EXIT_USAGE),
    (LocalProtocolError, EXIT_USAGE),
    (OSError, EXIT_RUNTIME),
    (SnocatError, EXIT_RUNTIME),
)


def run(main: Callable[[], Awaitable[None]], backend: str, loop: str) -> None:
    """Run ``main``, mapping an error to one line and an exit status (no traceback)."""
    from . import run_options, uvloop_installed  # the package's, which tests patch

    options = run_options(backend, loop, uvloop_installed=uvloop_installed())
    try:
        anyio.run(main, backend=backend, backend_options=options)
    except Exception as exc:
        leaves = _leaves(exc)
        for kind, status in _EXIT_STATUS:
            for leaf in leaves:
                if isinstance(leaf, kind):
                    if isinstance(leaf, UsageProblem):
                        fail(leaf.format_message(), status)
                    fail(leaf.reason if isinstance(leaf, LocalProtocolError) else str(leaf), status)
        logger.debug("unexpected error", exc_info=exc)
        fail(f"unexpected error: {leaves[0]!r} (details with --log-level debug)", EXIT_RUNTIME)
