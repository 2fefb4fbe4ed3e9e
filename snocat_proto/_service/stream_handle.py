"""The application's side of one tunnel stream, shared by every binding.

A binding's stream (anyio's ``ByteStream``, the blocking socket-like one) is a
:class:`StreamHandle` plus a way to wait.  The handle keeps what arrived and was not
read yet, whether the peer ended or reset the stream, whether it was accepted, and
moves bytes through the :class:`~snocat_proto.tunnel.TunnelConnection`: reading
acknowledges what was read (which is what gives the peer more credit), writing
offers no more than the send buffer takes.

Every call returns at once.  A call that cannot make progress says why with
:class:`Blocked`; the binding then waits for the next notification, raises its own
error type, or returns.  After any call that may have changed the tunnel the binding
flushes it (drains events, transmits datagrams).  The handle never waits, locks or
reads a clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum, auto

from .._wire.address import RouteAddress
from .._wire.codes import StreamCode
from .._wire.events import (
    DataReceived,
    StreamAccepted,
    StreamEnded,
    StreamRejected,
    StreamReset,
    StreamWritable,
    TunnelEvent,
)
from .._wire.tunnel import TunnelConnection

__all__ = ["Blocked", "FailureKind", "HandleView", "Opening", "StreamFailure", "StreamHandle"]


class Blocked(Enum):
    """Why a read or write made no progress."""

    #: Nothing to do now; a notification follows when there is.
    WAIT = auto()
    #: (Reading) the peer finished its direction and everything was read.
    END = auto()
    #: The application closed or reset the stream.
    CLOSED = auto()
    #: (Writing) our direction was already finished.
    EOF_SENT = auto()
    #: The stream was reset or its tunnel closed: see :attr:`StreamHandle.failure`.
    FAILED = auto()


class Opening(Enum):
    """Where a stream we opened stands (see :attr:`StreamHandle.opening`)."""

    PENDING = auto()
    ACCEPTED = auto()
    REFUSED = auto()
    #: The tunnel closed before the peer decided.
    TUNNEL_CLOSED = auto()


class FailureKind(Enum):
    RESET = auto()
    TUNNEL_CLOSED = auto()


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamFailure:
    """Why a stream carries no more data: a reset (by the peer or the core) or the close
    of its tunnel.  Bindings turn it into their own exception type."""

    kind: FailureKind
    code: int
    reason: str
    by_peer: bool


class StreamHandle:
    """One bidirectional stream of a tunnel, as the application sees it."""

    def __init__(
        self,
        tunnel: TunnelConnection,
        stream_id: int,
        address: RouteAddress,
        *,
        accepted: bool,
    ) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id
        self.address = address
        #: Service bytes received from / sent to the peer (final once :attr:`finished`).
        self.bytes_received = 0
        self.bytes_sent = 0
        self._chunks: deque[bytes] = deque()
        self._accepted: bool | None = True if accepted else None
        self._refusal = ""
        self._eof_received = False
        self._eof_sent = False
        self._discarding = False
        self._closed = False
        self._failure: StreamFailure | None = None

    # State -------------------------------------------------------------------

    @property
    def failure(self) -> StreamFailure | None:
        return self._failure

    @property
    def closed(self) -> bool:
        """Closed or reset by the application."""
        return self._closed

    @property
    def eof_sent(self) -> bool:
        return self._eof_sent

    @property
    def finished(self) -> bool:
        """No more events concern this stream: its byte counts are final."""
        return self._closed or self._failure is not None or self._accepted is False

    @property
    def opening(self) -> Opening:
        if self._accepted is None:
            return Opening.PENDING
        if self._accepted:
            return Opening.ACCEPTED
        if self._failure is not None and self._failure.kind is FailureKind.TUNNEL_CLOSED:
            return Opening.TUNNEL_CLOSED
        return Opening.REFUSED

    @property
    def refusal(self) -> str:
        """Why the peer refused (once :attr:`opening` is REFUSED or TUNNEL_CLOSED)."""
        return self._refusal or "refused"

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return sum(len(chunk) for chunk in self._chunks)

    # Reading -----------------------------------------------------------------

    def read(self, max_bytes: int) -> bytes | Blocked:
        """Up to ``max_bytes`` (> 0) received bytes, acknowledged to the peer."""
        if not self._chunks:
            return self._read_blocked()
        chunks = self._chunks
        chunk = chunks[0]
        if len(chunk) > max_bytes:
            data, chunks[0] = chunk[:max_bytes], chunk[max_bytes:]
        elif len(chunks) == 1 or len(chunk) + len(chunks[1]) > max_bytes:
            data = chunks.popleft()
        else:
            # Several datagrams' worth waiting: one read takes them together, so a
            # relay makes one write (and one acknowledgement) instead of many.
            parts, size = [], 0
            while chunks and size + len(chunks[0]) <= max_bytes:
                part = chunks.popleft()
                parts.append(part)
                size += len(part)
            data = b"".join(parts)
        self.tunnel.acknowledge_received_data(self.stream_id, len(data))
        return data

    def discard_incoming(self) -> None:
        """Stop reading (a socket's ``SHUT_RD``): what is buffered and what still comes
        is dropped and acknowledged, so the peer is not stalled; reads see the end."""
        self._discarding = True
        dropped = sum(len(chunk) for chunk in self._chunks)
        self._chunks.clear()
        if dropped and not self.finished:
            self.tunnel.acknowledge_received_data(self.stream_id, dropped)

    def _read_blocked(self) -> Blocked:
        if self._closed:
            return Blocked.CLOSED
        if self._failure is not None:
            return Blocked.FAILED
        if self._eof_received or self._discarding:
            return Blocked.END
        return Blocked.WAIT

    # Writing -----------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> int | Blocked:
        """Send as much of ``data`` as the send buffer takes now; how much that was.

        ``Blocked.WAIT`` when it takes nothing (a notification follows once it does);
        empty ``data`` is sent as zero bytes when the stream could take some."""
        blocked = self._write_blocked()
        if blocked is not None:
            return blocked
        capacity = self.tunnel.send_capacity(self.stream_id)
        if capacity == 0:
            return Blocked.WAIT
        chunk = bytes(data[:capacity])
        if chunk:
            self.tunnel.send_data(self.stream_id, chunk)
            self.bytes_sent += len(chunk)
        return len(chunk)

    def write_whole(self, data: bytes) -> bool | Blocked:
        """Send all of ``data`` if the send buffer takes it whole now (True), else none
        of it (False): for datagrams framed on a stream, which are dropped rather than
        split or queued (a fleet's relayed UDP flows, docs/protocol.md 3.16.1)."""
        blocked = self._write_blocked()
        if blocked is not None:
            return blocked
        if self.tunnel.send_capacity(self.stream_id) < len(data):
            return False
        if data:
            self.tunnel.send_data(self.stream_id, data)
            self.bytes_sent += len(data)
        return True

    def send_eof(self) -> Blocked | None:
        """Finish our direction (idempotent); None once it is finished."""
        if self._eof_sent:
            return None
        blocked = self._write_blocked()
        if blocked is not None:
            return blocked
        self._eof_sent = True
        self.tunnel.send_data(self.stream_id, b"", end_stream=True)
        return None

    def _write_blocked(self) -> Blocked | None:
        if self._closed:
            return Blocked.CLOSED
        if self._failure is not None:
            return Blocked.FAILED
        if self._eof_sent:
            return Blocked.EOF_SENT
        return None

    # Ending ------------------------------------------------------------------

    def close(self) -> bool:
        """Finish our direction (written data is still delivered) and stop reading.

        Idempotent; False if it was closed already (nothing changed)."""
        if self._closed:
            return False
        self._closed = True
        self._chunks.clear()
        if self._failure is None:
            self.tunnel.close_stream(self.stream_id)
        return True

    def reset(self, code: int = StreamCode.CANCELLED) -> bool:
        """Abort both directions; unsent data is dropped.  False if already closed."""
        if self._closed:
            return False
        self._closed = True
        self._chunks.clear()
        if self._failure is None:
            self.tunnel.reset_stream(self.stream_id, code)
        return True

    # Fed by the binding's pump -----------------------------------------------

    def on_event(self, event: TunnelEvent) -> bool:
        """Apply an event of this stream; whether waiters should be woken."""
        if isinstance(event, DataReceived):
            self.bytes_received += len(event.data)
            if self._discarding:
                self.tunnel.acknowledge_received_data(self.stream_id, len(event.data))
                return False
            self._chunks.append(event.data)
        elif isinstance(event, StreamEnded):
            self._eof_received = True
        elif isinstance(event, StreamAccepted):
            self._accepted = True
        elif isinstance(event, StreamRejected):
            self._accepted = False
            self._refusal = event.reason
        elif isinstance(event, StreamReset):
            self._failure = StreamFailure(
                kind=FailureKind.RESET, code=event.code, reason=event.reason, by_peer=event.by_peer
            )
        elif not isinstance(event, StreamWritable):
            return False
        return True

    def on_tunnel_closed(self, code: int, reason: str) -> None:
        """The tunnel closed: every waiter fails (after reading what was buffered)."""
        if self._failure is None:
            self._failure = StreamFailure(
                kind=FailureKind.TUNNEL_CLOSED, code=code, reason=reason, by_peer=False
            )
        if self._accepted is None:
            self._accepted = False
            self._refusal = f"tunnel closed: {reason}"


class HandleView:
    """What a binding's stream shows of its :class:`StreamHandle` (``self.handle``)."""

    handle: StreamHandle

    @property
    def tunnel(self) -> TunnelConnection:
        return self.handle.tunnel

    @property
    def stream_id(self) -> int:
        return self.handle.stream_id

    @property
    def address(self) -> RouteAddress:
        return self.handle.address

    @property
    def bytes_received(self) -> int:
        return self.handle.bytes_received

    @property
    def bytes_sent(self) -> int:
        return self.handle.bytes_sent
