"""The tunnel client on asyncio or trio: :class:`TunnelClient`, run with :meth:`~TunnelClient.run`.

The flows are :class:`~._client_flows.ClientCore` (shared with ``snocat_sync``);
this adds the structured lifecycle: ``run(task_status=...)`` reports started once
the client is ready (see the flows' module docstring), :meth:`TunnelClient.aclose`
(or leaving ``async with``) says goodbye and stops everything, and so does
cancelling ``run()``: the goodbye runs shielded, bounded by ``close_timeout``.
"""

from __future__ import annotations

import anyio
import anyio.abc

from snocat_proto._service.config import ClientConfig

from ._client_flows import ClientCore

__all__ = ["ClientConfig", "TunnelClient"]


class TunnelClient(ClientCore):
    """The Connect side of snocat: see the module docstring."""

    _running = False
    _run_scope: anyio.CancelScope | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[TunnelClient] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect and serve until :meth:`aclose`, cancellation, or a fatal error."""
        if self._running:
            raise RuntimeError("TunnelClient.run() can be called only once")
        self._running = True
        if self._stop:
            return  # aclose() came first
        started = False

        def on_ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started(self)

        try:
            with anyio.CancelScope() as scope:
                self._run_scope = scope
                await self._run_loop(on_ready)
        finally:
            self._finish()

    async def aclose(self) -> None:
        """Release the port, close the tunnel (NORMAL), stop every task, close the socket."""
        self._request_stop()
        if not self._running:
            self._finish()
            return
        if self._run_scope is not None:
            self._run_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._changed.wait_for(lambda: self._done)

    async def __aenter__(self) -> TunnelClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
