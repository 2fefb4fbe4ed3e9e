"""Is anything listening on the targets?  A client whose target is down is still a
working tunnel, but every visitor is refused: say so at start, and once more when
the target starts answering."""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from snocat_proto._wire.targets import ProxyTcpTarget

from ._common import logger

#: How long one probe waits for the target to accept.
PROBE_TIMEOUT = 3.0
#: How often a target that did not answer is tried again.
RECHECK_INTERVAL = 3.0


async def probe(target: ProxyTcpTarget, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None if ``target`` accepts a TCP connection (closed at once), else why not."""
    try:
        with anyio.fail_after(timeout):
            stream = await anyio.connect_tcp(target.connect_host(), target.port)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as exc:
        return _reason(exc)
    await stream.aclose()
    return None


def _reason(exc: BaseException) -> str:
    """The first attempt's own error (anyio wraps them all in "All connection attempts
    failed")."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    if isinstance(cause, OSError):
        exc = cause
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def watch_targets(
    targets: Sequence[ProxyTcpTarget], interval: float = RECHECK_INTERVAL
) -> None:
    """Warn once about each target that does not accept connections, try it again
    every ``interval`` s while it does not, and say when it answers."""
    async with anyio.create_task_group() as tg:
        for target in dict.fromkeys(targets):
            tg.start_soon(_watch, target, interval)


async def _watch(target: ProxyTcpTarget, interval: float) -> None:
    reason = await probe(target)
    if reason is None:
        return
    logger.warning(
        "target %s does not accept connections (%s): visitors are refused until it "
        "does; trying it every %g s",
        target,
        reason,
        interval,
    )
    while True:
        await anyio.sleep(interval)
        if await probe(target) is None:
            logger.info("target %s answers now", target)
            return
