"""The aggregator's public TCP ports: the configured range, who holds which, and memory.

:class:`PortRange` is the validated ``START:END`` range from the command line.
:class:`PortAllocator` grants the lowest free port of it (as snocat 0.8 does), or a
preferred one, in O(log n) per operation however wide the range.
:class:`StickyPorts` remembers for a while which port a tunnel name last held, so a
client that reconnects under the same name can be offered its old port back.

Nothing here binds sockets: the adapter binds, and passes the ports the operating
system refused as ``exclude`` to the next :meth:`PortAllocator.allocate`.
"""

from __future__ import annotations

import heapq
import math
import re
from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Final

from .._wire.errors import LocalProtocolError

__all__ = ["PortAllocator", "PortRange", "PortsExhausted", "StickyPorts"]

MIN_PORT: Final = 1
MAX_PORT: Final = 65535

# ASCII digits only (str.isdigit would take "٨٠"), at most 5 of them, nothing around.
_RANGE_SYNTAX: Final = re.compile(r"([0-9]{1,5}):([0-9]{1,5})")


class PortsExhausted(LocalProtocolError):
    """Every port of the range that may be granted is allocated (or excluded)."""


def _check_port(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LocalProtocolError(f"{what} must be an integer port, not {value!r}")
    if not MIN_PORT <= value <= MAX_PORT:
        raise LocalProtocolError(f"{what} must be within {MIN_PORT}..{MAX_PORT}, not {value}")
    return value


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive range of TCP ports, ``start`` to ``end``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        _check_port(self.start, "port range start")
        _check_port(self.end, "port range end")
        if self.start > self.end:
            raise LocalProtocolError(f"port range start {self.start} is above its end {self.end}")

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """Parse the CLI form ``START:END`` (e.g. ``8080:8090``), both ends inclusive."""
        if not isinstance(text, str):
            raise LocalProtocolError(f"port range must be text, not {type(text)!r}")
        match = _RANGE_SYNTAX.fullmatch(text)
        if match is None:
            shown = text if len(text) <= 40 else text[:40] + "..."
            raise LocalProtocolError(
                f"port range {shown!r} is not START:END, two port numbers such as 8080:8090"
            )
        return cls(int(match[1]), int(match[2]))

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def __len__(self) -> int:
        return self.size

    def __contains__(self, port: object) -> bool:
        return (
            isinstance(port, int) and not isinstance(port, bool) and self.start <= port <= self.end
        )

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end + 1))

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


class PortAllocator:
    """Grants ports of a :class:`PortRange`: a preferred one if free, else the lowest free.

    Ports from ``start`` up to a watermark have been handed out at least once; the
    free ones among them wait in a min-heap. Ports at or above the watermark are free
    unless granted as ``preferred``. A preferred grant leaves a stale heap entry that
    is discarded when it surfaces, so every operation is O(log n) amortised (plus the
    size of ``exclude``) and memory is O(ports ever handed out).
    """

    __slots__ = ("_allocated", "_heap", "_in_heap", "_range", "_watermark")

    def __init__(self, port_range: PortRange) -> None:
        if not isinstance(port_range, PortRange):
            raise LocalProtocolError(f"PortAllocator takes a PortRange, not {port_range!r}")
        self._range = port_range
        self._watermark = port_range.start
        self._allocated: set[int] = set()
        # Invariant: every free port below the watermark is in the heap, and _in_heap
        # is exactly the set of heap entries (each port at most once).
        self._heap: list[int] = []
        self._in_heap: set[int] = set()

    @property
    def port_range(self) -> PortRange:
        return self._range

    @property
    def allocated(self) -> frozenset[int]:
        """A snapshot of the granted ports (O(number granted))."""
        return frozenset(self._allocated)

    @property
    def free_count(self) -> int:
        return self._range.size - len(self._allocated)

    def is_allocated(self, port: int) -> bool:
        return port in self._allocated

    def allocate(self, *, preferred: int | None = None, exclude: Collection[int] = ()) -> int:
        """Grant a port and return it.

        ``preferred`` is granted if it is in range, free and not excluded (a tunnel that
        reconnects under the same name gets its port back); otherwise the lowest free
        port not in ``exclude`` (ports the operating system refused to bind).
        Raises :class:`PortsExhausted` when there is none.
        """
        excluded = exclude if isinstance(exclude, set | frozenset) else frozenset(exclude)
        if (
            preferred is not None
            and preferred in self._range
            and preferred not in self._allocated
            and preferred not in excluded
        ):
            self._allocated.add(preferred)
            return preferred
        if self.free_count == 0:
            raise PortsExhausted(f"all {self._range.size} ports of {self._range} are allocated")
        port = self._take_from_heap(excluded)
        if port is None:
            port = self._take_above_watermark(excluded)
        if port is None:
            raise PortsExhausted(
                f"every free port of {self._range} is excluded ({self.free_count} free)"
            )
        self._allocated.add(port)
        return port

    def claim(self, port: int) -> None:
        """Grant exactly ``port`` (e.g. restoring state); :class:`LocalProtocolError` if
        it is outside the range or already granted."""
        if port not in self._range:
            raise LocalProtocolError(f"port {port!r} is outside {self._range}")
        if port in self._allocated:
            raise LocalProtocolError(f"port {port} is already allocated")
        self._allocated.add(port)

    def release(self, port: int) -> None:
        """Return a granted port; :class:`LocalProtocolError` if it was not granted."""
        if port not in self._allocated:
            raise LocalProtocolError(f"port {port!r} is not allocated")
        self._allocated.remove(port)
        if port < self._watermark and port not in self._in_heap:
            heapq.heappush(self._heap, port)
            self._in_heap.add(port)

    def _take_from_heap(self, excluded: Collection[int]) -> int | None:
        heap = self._heap
        skipped: list[int] = []
        found: int | None = None
        while heap:
            port = heap[0]
            if port in self._allocated:  # stale: granted as `preferred` meanwhile
                heapq.heappop(heap)
                self._in_heap.discard(port)
            elif port in excluded:
                skipped.append(heapq.heappop(heap))
            else:
                found = heapq.heappop(heap)
                self._in_heap.discard(found)
                break
        for port in skipped:  # still free, still in _in_heap
            heapq.heappush(heap, port)
        return found

    def _take_above_watermark(self, excluded: Collection[int]) -> int | None:
        # Every port below the watermark is granted or in the heap, and the heap had
        # nothing usable, so the answer (if any) is at or above the watermark.
        port = self._watermark
        end = self._range.end
        while port <= end and (port in self._allocated or port in excluded):
            if port not in self._allocated:
                # An excluded free port falls below the new watermark: keep it findable.
                heapq.heappush(self._heap, port)
                self._in_heap.add(port)
            port += 1
        if port > end:
            self._watermark = end + 1
            return None
        self._watermark = port + 1
        return port


class StickyPorts:
    """Remembers, for ``remember_for`` seconds, the port a tunnel name last released.

    Call :meth:`remember` when a tunnel's port is released and :meth:`recall` when a
    tunnel of that name asks for a port, passing the result as ``preferred`` to
    :meth:`PortAllocator.allocate`. At most ``max_entries`` names are kept; beyond
    that the least recently remembered is forgotten. ``now`` is the caller's clock,
    which must not run backwards.
    """

    __slots__ = ("_entries", "_max_entries", "_remember_for")

    def __init__(self, *, remember_for: float = 60.0, max_entries: int = 1024) -> None:
        if (
            not isinstance(remember_for, int | float)
            or isinstance(remember_for, bool)
            or not math.isfinite(remember_for)
            or remember_for < 0
        ):
            raise LocalProtocolError(
                f"remember_for must be a finite number of seconds >= 0, not {remember_for!r}"
            )
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 1:
            raise LocalProtocolError(f"max_entries must be a positive integer, not {max_entries!r}")
        self._remember_for = float(remember_for)
        self._max_entries = max_entries
        # name -> (port, expires_at), least recently remembered first. With a constant
        # remember_for and a clock that does not run backwards, this is expiry order.
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def remember(self, name: str, port: int, now: float) -> None:
        """``name`` released ``port`` at ``now``; offer it back until ``now + remember_for``."""
        _check_port(port, "remembered port")
        self._entries[name] = (port, now + self._remember_for)
        self._entries.move_to_end(name)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def recall(self, name: str, now: float) -> int | None:
        """The port ``name`` last released, unless that was too long ago."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        port, expires_at = entry
        if now >= expires_at:
            del self._entries[name]
            return None
        return port

    def forget(self, name: str) -> None:
        """Drop what is remembered for ``name`` (no error if nothing is)."""
        self._entries.pop(name, None)

    def get_timer(self) -> float | None:
        """When the oldest memory expires (call :meth:`handle_timer` then), or ``None``."""
        for _port, expires_at in self._entries.values():
            return expires_at
        return None

    def handle_timer(self, now: float) -> None:
        """Forget every memory that has expired by ``now``."""
        while self._entries:
            name, (_port, expires_at) = next(iter(self._entries.items()))
            if now < expires_at:
                break
            del self._entries[name]

    def __len__(self) -> int:
        """How many names are remembered (expired ones linger until touched or timed out)."""
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
