"""The peek contract shared by the connection-start parsers of the shared listeners.

This module owns what :mod:`~snocat_proto._wire.sni`,
:mod:`~snocat_proto._wire.http_host` and :mod:`~snocat_proto._wire.proxy_protocol`
have in common, and nothing about any one format: a sans-IO parser that is fed the
first bytes of a TCP connection as they arrive, in any split, and answers
:data:`NEED_MORE`, a result, or a :class:`~snocat_proto.errors.RemoteProtocolError`
subclass.

* **It never consumes.** The caller keeps every byte it read: for SNI and ``Host``
  it forwards all of them to the target unchanged; for a PROXY protocol header it
  strips exactly the ``size`` the result reports.  The parser keeps its own copy,
  of at most ``limit`` bytes, whatever the size of the reads it is fed.
* **It is bounded.** Bytes past ``limit`` are never buffered: when the first
  ``limit`` bytes decide nothing and more arrive, the format's "too large" error
  is raised.  A format whose lengths are announced refuses an oversized one as soon
  as its length field arrives.
* **The answer does not depend on the split.** A subclass decides on a prefix of
  the stream only, and once a prefix decides, every longer prefix decides the same
  (errors are found in the order of their position in the stream), so feeding the
  bytes whole, byte at a time, or with trailing data gives one answer.

A table ``(state, input) -> state`` is the only place the state changes (PEEKING,
then DONE with a result or FAILED with an error).  Feeding a parser that is done or
failed is a :class:`~snocat_proto.errors.LocalProtocolError`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final, Generic, TypeVar

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["NEED_MORE", "NeedMore", "PeekParser"]


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The bytes so far are a valid beginning; feed more (or report the end)."""


#: The one :class:`NeedMore` value.
NEED_MORE: Final = NeedMore()


class _State(Enum):
    PEEKING = auto()
    DONE = auto()
    FAILED = auto()


class _Input(Enum):
    RESULT = auto()
    PEER_ERROR = auto()


_TRANSITIONS: dict[tuple[_State, _Input], _State] = {
    (_State.PEEKING, _Input.RESULT): _State.DONE,
    (_State.PEEKING, _Input.PEER_ERROR): _State.FAILED,
}

ResultT = TypeVar("ResultT")


class PeekParser(ABC, Generic[ResultT]):
    """Feeds a bounded copy of the stream's first bytes to :meth:`_examine`.

    Subclasses implement :meth:`_examine` (decide on the buffer, which only ever
    grows between calls), :meth:`_too_large` and :meth:`_truncated` (their error for
    a stream that passes ``limit`` undecided, and for one that ends undecided).
    """

    __slots__ = ("_buffer", "_limit", "_result", "_state")

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise LocalProtocolError(f"a peek limit must be a positive int, not {limit!r}")
        self._limit = limit
        self._buffer = bytearray()
        self._result: ResultT | None = None
        self._state = _State.PEEKING

    @property
    def limit(self) -> int:
        """The most bytes this parser buffers."""
        return self._limit

    @property
    def buffered(self) -> int:
        """Bytes held now (at most :attr:`limit`; none once decided)."""
        return len(self._buffer)

    @property
    def result(self) -> ResultT | None:
        """The result, once :meth:`feed` returned it."""
        return self._result

    @property
    def done(self) -> bool:
        """Whether a result was returned."""
        return self._state is _State.DONE

    @property
    def failed(self) -> bool:
        """Whether an error was raised."""
        return self._state is _State.FAILED

    def feed(self, data: bytes) -> ResultT | NeedMore:
        """Add the bytes that arrived; the result, :data:`NEED_MORE`, or the error."""
        if self._state is not _State.PEEKING:
            raise LocalProtocolError(
                f"the parser is {self._state.name.lower()}; "
                "the bytes after its answer belong to the caller"
            )
        try:
            result = self._take(data)
        except RemoteProtocolError:
            self._advance(_Input.PEER_ERROR)
            self._buffer = bytearray()
            raise
        if result is None:
            return NEED_MORE
        self._advance(_Input.RESULT)
        self._result = result
        self._buffer = bytearray()
        return result

    def receive_eof(self) -> None:
        """The stream ended: the format's "truncated" error unless already decided."""
        if self._state is not _State.PEEKING:
            return  # the answer was given; the end adds nothing
        error = self._truncated()
        self._advance(_Input.PEER_ERROR)
        self._buffer = bytearray()
        raise error

    def _take(self, data: bytes) -> ResultT | None:
        room = self._limit - len(self._buffer)
        result = None
        if data and room > 0:
            self._buffer += data[:room]
            result = self._examine(self._buffer)
        if result is None and len(data) > room:
            raise self._too_large()
        return result

    def _advance(self, event: _Input) -> None:
        next_state = _TRANSITIONS.get((self._state, event))
        if next_state is None:
            raise LocalProtocolError(f"peek parser cannot take {event.name} in {self._state.name}")
        self._state = next_state

    @abstractmethod
    def _examine(self, buffer: bytearray) -> ResultT | None:
        """The result the buffer decides, ``None`` if it decides nothing yet, or raise.

        Must be a function of the buffer's bytes alone (the buffer grows by appends
        between calls), and must decide a prefix the way it decides its extensions."""

    @abstractmethod
    def _too_large(self) -> RemoteProtocolError:
        """The error for a stream whose first ``limit`` bytes decide nothing."""

    @abstractmethod
    def _truncated(self) -> RemoteProtocolError:
        """The error for a stream that ended before a decision."""
