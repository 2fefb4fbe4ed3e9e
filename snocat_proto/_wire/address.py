"""Route addresses: the ``/seg1/seg2`` names that NYAN negotiation carries.

This module owns the text form of a route address and nothing else: rendering
segments to text (with ``\\/`` and ``\\\\`` escapes inside a segment), parsing text
back to segments, and the strict UTF-8 step between text and wire bytes.

The rules are those of snocat 0.8 as the wire document states them:

* the empty string is zero segments, ``/`` is one empty segment;
* otherwise the text must start with ``/``, and every further ``/`` that is not
  escaped starts a new segment;
* inside a segment only ``\\\\`` (a backslash) and ``\\/`` (a slash) are escapes;
  any other backslash sequence, including a lone backslash at the very end, is an
  error.

Rendering and parsing are exact inverses: every valid text has exactly one segment
tuple and every segment tuple exactly one rendering, so ``str(RouteAddress.parse(t))
== t`` whenever ``parse`` succeeds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["RouteAddress"]

_SEPARATOR = "/"
_ESCAPE = "\\"


def _escape_segment(segment: str) -> str:
    # Backslashes first, so the backslashes added for slashes are not doubled again.
    return segment.replace(_ESCAPE, _ESCAPE * 2).replace(_SEPARATOR, _ESCAPE + _SEPARATOR)


def _split_escaped(body: str) -> tuple[str, ...]:
    """Split the text after the leading ``/`` into unescaped segments."""
    if _ESCAPE not in body:
        return tuple(body.split(_SEPARATOR))
    segments: list[str] = []
    current: list[str] = []
    index = 0
    length = len(body)
    while index < length:
        char = body[index]
        if char == _ESCAPE:
            if index + 1 == length:
                raise RemoteProtocolError("route address ends in a lone backslash")
            escaped = body[index + 1]
            if escaped not in (_ESCAPE, _SEPARATOR):
                raise RemoteProtocolError(
                    f"invalid escape sequence {_ESCAPE + escaped!r} in route address; "
                    "only '\\\\' and '\\/' are allowed"
                )
            current.append(escaped)
            index += 2
        elif char == _SEPARATOR:
            segments.append("".join(current))
            current = []
            index += 1
        else:
            current.append(char)
            index += 1
    segments.append("".join(current))
    return tuple(segments)


@dataclass(frozen=True, slots=True)
class RouteAddress:
    """A route address: an ordered tuple of text segments.

    Construct one with :meth:`of` (``RouteAddress.of("proxy-tcp", "tcp", "22")``),
    from text with :meth:`parse`, or from wire bytes with :meth:`decode`.
    Segments may contain any text that UTF-8 can encode, ``/`` and ``\\`` included.
    """

    segments: tuple[str, ...]

    def __post_init__(self) -> None:
        segments: object = self.segments
        if isinstance(segments, str | bytes):
            raise LocalProtocolError(
                "RouteAddress takes a tuple of segments; use RouteAddress.parse() for text"
            )
        if not isinstance(segments, tuple):
            if not isinstance(segments, Iterable):
                raise LocalProtocolError(
                    f"RouteAddress segments must be a tuple of str, not {type(segments).__name__}"
                )
            object.__setattr__(self, "segments", tuple(segments))
        for segment in self.segments:
            if not isinstance(segment, str):
                raise LocalProtocolError(
                    f"route address segments must be str, not {type(segment).__name__}"
                )
        try:
            "".join(self.segments).encode("utf-8")
        except UnicodeEncodeError:
            raise LocalProtocolError(
                "route address segments must be encodable as UTF-8 (no lone surrogates)"
            ) from None

    @classmethod
    def of(cls, *segments: str) -> RouteAddress:
        """Build an address from its segments: ``RouteAddress.of("a", "b")`` is ``/a/b``."""
        return cls(segments)

    @classmethod
    def parse(cls, text: str) -> RouteAddress:
        """Parse the text form; :class:`RemoteProtocolError` if it breaks the rules."""
        if not isinstance(text, str):
            raise LocalProtocolError(f"RouteAddress.parse takes str, not {type(text).__name__}")
        if text == "":
            return cls(())
        if not text.startswith(_SEPARATOR):
            raise RemoteProtocolError(
                f"route address must be empty or start with '/': {text[:64]!r}"
            )
        segments = _split_escaped(text[1:])
        try:
            return cls(segments)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(exc.reason) from None

    @classmethod
    def decode(cls, data: bytes) -> RouteAddress:
        """Parse wire bytes: strict UTF-8, then :meth:`parse`."""
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(
                f"route address is not valid UTF-8 (byte {exc.start})"
            ) from None
        return cls.parse(text)

    def encode(self) -> bytes:
        """The wire bytes: UTF-8 of :meth:`__str__`."""
        return str(self).encode("utf-8")

    def startswith(self, *prefix: str) -> bool:
        """Whether the first segments are exactly ``prefix``."""
        return self.segments[: len(prefix)] == prefix

    def __str__(self) -> str:
        return "".join(_SEPARATOR + _escape_segment(segment) for segment in self.segments)
