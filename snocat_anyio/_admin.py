"""The admin endpoint: a small HTTP/1.1 server on the aggregator's own event loop.

``snocat server --metrics HOST:PORT`` serves ``/metrics`` (Prometheus) and ``/status``
(JSON) with it.  It runs as tasks beside the server's, never in a thread: the
server's state may only be read on its event loop, and a handler here is a plain
function called from the connection's task (:data:`Handler`).

h11 speaks the protocol (parsing, framing, keep-alive); this module adds what an
endpoint that anyone who reaches the port can talk to needs:

* **bounds** (:class:`AdminLimits`): the request line and headers in at most
  ``max_request_size`` bytes and ``max_headers`` fields (else 431), no request body
  (413), one request in and its answer out within ``request_timeout`` seconds, an
  idle keep-alive connection closed after as long (so a client that trickles bytes,
  or says nothing, holds its connection that long at most), and at most
  ``max_connections`` connections at once (as many more get 503, any beyond are
  closed at once);
* **authentication**: with a token, every request needs ``Authorization: Bearer
  TOKEN`` (compared in constant time), else 401 with ``WWW-Authenticate: Bearer``;
  nothing, not even which paths exist, is told without it;
* 404 for another path, 405 (``Allow: GET, HEAD``) for another method.

The blocking binding (``snocat_sync``) has no admin endpoint.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc
import h11
from anyio.abc import SocketAttribute
from prometheus_client.exposition import choose_encoder

from ._metrics import ServerMetrics

__all__ = [
    "AdminLimits",
    "AdminServer",
    "Handler",
    "Response",
    "admin_routes",
    "bearer_token",
]

logger = logging.getLogger("snocat.admin")

#: Bytes read from a connection at a time.
READ_SIZE = 4096
#: After an error response that closes the connection, how long (and how many bytes)
#: to read and discard what the client still sends, so that closing with unread data
#: does not reset the connection before it has read the response.
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024
ALLOWED_METHODS = (b"GET", b"HEAD")


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminLimits:
    """The admin endpoint's bounds (docs/security.md lists them)."""

    #: Bytes of one request's line and headers (h11's ``max_incomplete_event_size``).
    max_request_size: int = 8 * 1024
    #: Header fields in one request.
    max_headers: int = 64
    #: Seconds for one request to arrive and its answer to leave (and the longest a
    #: keep-alive connection may sit idle): then the connection is closed.
    request_timeout: float = 10.0
    #: Connections at once.
    max_connections: int = 32


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


#: Answers one authenticated ``GET`` (or ``HEAD``) of its path; runs on the event loop.
Handler = Callable[[h11.Request], Response]


def _text(status: int, text: str, *headers: tuple[str, str]) -> Response:
    return Response(status, (text + "\n").encode(), headers=headers)


def header(request: h11.Request, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case), the first if there are several."""
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return None


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` value (None if not one)."""
    if authorization is None:
        return None
    scheme, _, credentials = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not credentials.strip():
        return None
    return credentials.strip()


class AdminServer:
    """Serves ``routes`` (path -> :data:`Handler`) over HTTP/1.1; see the module docstring."""

    def __init__(
        self,
        routes: Mapping[str, Handler],
        *,
        token: bytes | None,
        limits: AdminLimits | None = None,
    ) -> None:
        self.routes = dict(routes)
        self.limits = limits or AdminLimits()
        self._token = token
        self._connections = 0
        #: Connections over the cap being told so (as many again at most).
        self._refusing = 0

    @property
    def connections(self) -> int:
        """Connections open now."""
        return self._connections

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until cancelled; ``task_status`` gets the
        bound address (``port`` 0 picks one).  Raises ``OSError`` if it cannot listen."""
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        async with listener, anyio.create_task_group() as tg:
            bound = listener.extra(SocketAttribute.local_address)
            task_status.started((str(bound[0]), int(bound[1])))
            await listener.serve(self._connection, task_group=tg)

    # One connection ----------------------------------------------------------------

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        try:
            async with stream:
                if self._connections >= self.limits.max_connections:
                    if self._refusing < self.limits.max_connections:  # else: closed at once
                        self._refusing += 1
                        try:
                            with anyio.move_on_after(self.limits.request_timeout):
                                await self._refuse(stream)
                        finally:
                            self._refusing -= 1
                    return
                self._connections += 1
                try:
                    await self._exchange(stream)
                finally:
                    self._connections -= 1
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:
            # Never let one connection end the listener (and with it the server).
            logger.exception("admin endpoint: a connection failed")

    async def _refuse(self, stream: anyio.abc.SocketStream) -> None:
        response = _text(503, "too many connections; try again later", ("retry-after", "1"))
        await self._close_with(stream, h11.Connection(h11.SERVER), response)

    async def _exchange(self, stream: anyio.abc.SocketStream) -> None:
        """Requests, one after another, until one of us closes or a deadline passes."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_request_size)
        while True:
            keep_alive = False
            with anyio.move_on_after(self.limits.request_timeout):
                keep_alive = await self._one_request(stream, conn)
            if not keep_alive:
                return
            conn.start_next_cycle()

    async def _one_request(self, stream: anyio.abc.SocketStream, conn: h11.Connection) -> bool:
        """Read a request and answer it; whether the connection may carry another."""
        try:
            request = await self._read_request(stream, conn)
        except h11.RemoteProtocolError as exc:
            logger.debug("admin endpoint: bad request: %s", exc)
            status = exc.error_status_hint
            await self._close_with(stream, conn, _text(status, _REASONS.get(status, "bad request")))
            return False
        if request is None:
            return False
        if header(request, b"content-length") not in (None, b"0") or header(
            request, b"transfer-encoding"
        ):
            await self._close_with(stream, conn, _text(413, "a request here has no body"))
            return False
        # Without a body, the request has ended with its headers.
        if not isinstance(conn.next_event(), h11.EndOfMessage):
            await self._close_with(stream, conn, _text(400, "bad request"))
            return False
        try:
            response = self._answer(request)
        except Exception:
            logger.exception(
                "admin endpoint: %s failed", bytes(request.target).decode("ascii", "replace")
            )
            await self._close_with(
                stream, conn, _text(500, "internal error (see the server's log)")
            )
            return False
        await self._send(stream, conn, response, head=request.method == b"HEAD")
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _close_with(
        self, stream: anyio.abc.SocketStream, conn: h11.Connection, response: Response
    ) -> None:
        await self._send(stream, conn, response, close=True)
        await self._linger(stream)

    async def _read_request(
        self, stream: anyio.abc.SocketStream, conn: h11.Connection
    ) -> h11.Request | None:
        """The next request; None if the client closed the connection first."""
        # h11 bounds a head that is still incomplete; a whole one that came in a single
        # read would pass, so reads stop at the limit too.
        limit = self.limits.max_request_size
        received = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if received > limit:
                    raise h11.RemoteProtocolError("request head too large", 431)
                try:
                    data = await stream.receive(min(READ_SIZE, limit + 1 - received))
                except anyio.EndOfStream:
                    data = b""
                received += len(data)
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                if len(event.headers) > self.limits.max_headers:
                    raise h11.RemoteProtocolError("too many header fields", 431)
                return event
            else:  # ConnectionClosed (or PAUSED after a close)
                return None

    def _answer(self, request: h11.Request) -> Response:
        if self._token is not None:
            presented = bearer_token(header(request, b"authorization"))
            if presented is None or not hmac.compare_digest(presented, self._token):
                challenge = 'Bearer realm="snocat"'
                if presented is not None:
                    challenge += ', error="invalid_token"'
                return _text(401, "unauthorized", ("www-authenticate", challenge))
        path = bytes(request.target).split(b"?", 1)[0].decode("ascii", "replace")
        handler = self.routes.get(path)
        if handler is None:
            return _text(404, "not found")
        if request.method not in ALLOWED_METHODS:
            return _text(405, "method not allowed", ("allow", "GET, HEAD"))
        return handler(request)

    async def _send(
        self,
        stream: anyio.abc.SocketStream,
        conn: h11.Connection,
        response: Response,
        *,
        head: bool = False,
        close: bool = False,
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # nothing can be said on this connection any more
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("cache-control", "no-store"),
            *response.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        phrase = HTTPStatus(response.status).phrase.encode()
        start = h11.Response(status_code=response.status, headers=headers, reason=phrase)
        data = conn.send(start) or b""
        if not head:
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send(data)

    async def _linger(self, stream: anyio.abc.SocketStream) -> None:
        """Before closing after an error: end our side, and read (a bounded amount of)
        what the client still sends, so its unread data does not reset the connection
        before the client has read our answer."""
        with anyio.move_on_after(LINGER_SECONDS):
            await stream.send_eof()
            drained = 0
            while drained < LINGER_BYTES:
                try:
                    drained += len(await stream.receive(READ_SIZE))
                except anyio.EndOfStream:
                    return


_REASONS = {
    400: "bad request",
    408: "request timeout",
    413: "request too large",
    414: "request target too long",
    431: "request header fields too large",
}


def admin_routes(metrics: ServerMetrics) -> dict[str, Handler]:
    """``/metrics`` and ``/status`` of a server's :class:`ServerMetrics`."""

    def metrics_page(request: h11.Request) -> Response:
        accept = (header(request, b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        return Response(200, encoder(metrics.registry), content_type)

    def status_page(request: h11.Request) -> Response:
        document: dict[str, Any] = metrics.status()
        body = json.dumps(document, indent=2).encode() + b"\n"
        return Response(200, body, "application/json")

    return {"/metrics": metrics_page, "/status": status_page}
