"""The tunnel client for blocking programs: :class:`TunnelClient`.

The flows are :class:`~._client_flows.ClientCore`, generated from snocat_anyio's: a
background *run thread* strings sessions together with capped, jittered backoff;
each session has its own UDP socket and pump thread, a ``proxyme`` thread that
requests the public port for ``targets[0]``, and one thread per stream the
aggregator opens, forwarded to an allow-listed target once it has answered.

``start()`` (or ``with``) returns once the first tunnel is authenticated and the
first ``proxyme`` answer arrived, granted or not, and raises what retrying cannot fix
(a rejected credential, an untrusted certificate; with ``reconnect=False`` any
failure).  ``close()`` releases the port (waiting for the acknowledgement), closes
the tunnel with :attr:`CloseCode.NORMAL`, joins every thread and closes the socket,
all bounded by ``close_timeout``.
"""

from __future__ import annotations

import logging
import threading

from snocat_proto._service.config import ClientConfig

from ._client_flows import ClientCore
from ._errors import ConnectError, SnocatError

__all__ = ["ClientConfig", "TunnelClient"]

logger = logging.getLogger("snocat.sync.client")


class TunnelClient(ClientCore):
    """The Connect side of snocat, blocking; see the module docstring."""

    _thread: threading.Thread | None = None
    _ready = False
    _error: SnocatError | None = None

    def start(self, timeout: float | None = None) -> TunnelClient:
        """Connect in the background; return once the first tunnel is ready.

        Raises the error that ended the client instead (see the module docstring),
        or ``TimeoutError`` after ``timeout`` seconds (the client is then closed)."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("TunnelClient.start() can be called only once")
            if self._stop:
                raise RuntimeError("the client was closed")
            self._thread = threading.Thread(target=self._run, name="snocat-client", daemon=True)
        self._thread.start()
        self._changed.wait_for(lambda: self._ready or self._done, timeout)
        with self._lock:
            ready, error, done = self._ready, self._error, self._done
        if error is not None:
            self.close()
            raise error
        if not ready:
            self.close()
            if self._error is not None:
                raise self._error
            if done and not self._stop:
                raise ConnectError("the client stopped before its tunnel was ready")
            raise TimeoutError(f"the tunnel was not ready within {timeout:g} s")
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the client stops (True) or ``timeout`` passed (False).

        Raises the error that ended the client, if one did (e.g. the tunnel was lost
        with ``reconnect=False``)."""
        if self._thread is None:
            return True
        if not self._wait_done(timeout):
            return False
        if self._error is not None:
            raise self._error
        return True

    def close(self) -> None:
        """Release the port, close the tunnel (NORMAL), join every thread, close the socket.

        Idempotent; safe from any thread but the client's own service threads."""
        self._request_stop()
        thread = self._thread
        if thread is None:
            self._finish()
        elif thread is not threading.current_thread():
            self._wait_done(None)

    def __enter__(self) -> TunnelClient:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        try:
            self._run_loop(self._mark_ready)
        except SnocatError as exc:
            with self._lock:
                self._error = exc
        except Exception as exc:  # a bug: report it instead of hanging start()
            logger.exception("the client failed")
            with self._lock:
                self._error = ConnectError(f"internal error: {exc!r}")
        finally:
            self._finish()

    def _mark_ready(self) -> None:
        with self._lock:
            self._ready = True
            self._changed.notify_all()

    def _wait_done(self, timeout: float | None) -> bool:
        # A Condition, not Thread.join(): a join interrupted by Ctrl-C can leave the
        # thread looking finished (CPython gh-90882), and the goodbye would be cut short.
        if not self._changed.wait_for(lambda: self._done, timeout):
            return False
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()  # it has finished its work; this only reaps it
        return True
