"""Path MTU discovery (DPLPMTUD, RFC 8899 section 5): how large a datagram the path
to the peer carries, found with probes the engine sends.

A tunnel starts at the size every QUIC path carries (1200 B, the BASE_PLPMTU) and
grows only when a probe of a larger size is acknowledged.  A probe is a PING padded
to the size tried (``QuicEngine`` builds it: ordinary PING and PADDING frames,
nothing a peer has to know about).  The search is binary, between the largest size
acknowledged and the smallest one lost ``Limits.path_mtu_probes`` times in a row,
trying the ceiling first (on loopback and on a LAN set with ``--max-datagram-size``
the ceiling is usually what the path carries); it ends once the two are
``Limits.path_mtu_search_resolution`` bytes apart, and starts over after
``Limits.path_mtu_raise_interval`` (PMTU_RAISE_TIMER), in case the path grew.

A path that stops carrying the size in use (a route change, a tunnel on the way) is
a black hole: packets of that size are lost, burst after burst, and none is
acknowledged.  After ``Limits.path_mtu_black_hole_bursts`` such bursts the size goes
back to the base and the search runs again, below the size that failed.

Nothing here reads a clock or touches the engine: every input carries ``now``,
:meth:`PathMtuSearch.get_timer` says when the next probe is due, and the engine asks
:meth:`PathMtuSearch.probe_size` what to send and reads :attr:`PathMtuSearch.size`.
"""

from __future__ import annotations

from enum import Enum

from .errors import LocalProtocolError
from .limits import Limits

__all__ = ["BASE_DATAGRAM_SIZE", "PathMtuSearch", "SearchState"]

#: The datagram size every QUIC path carries (RFC 9000 section 14): BASE_PLPMTU.
BASE_DATAGRAM_SIZE = 1200


class SearchState(Enum):
    """RFC 8899 section 5.2's phases."""

    #: Waiting for the handshake: no probe can be sent before 1-RTT keys.
    BASE = "base"
    #: Probing sizes above the one in use.
    SEARCHING = "searching"
    #: The largest size carried is known (to the resolution); wait for the raise timer.
    SEARCH_COMPLETE = "search_complete"


class Input(Enum):
    START = "start"
    SETTLED = "settled"
    RAISE_TIMER = "raise_timer"
    BLACK_HOLE = "black_hole"


#: ``(state, input) -> next state``.  A pair not listed is a bug of the engine's
#: driving and raises (STYLE.md: one place owns the transitions).
_TRANSITIONS: dict[tuple[SearchState, Input], SearchState] = {
    (SearchState.BASE, Input.START): SearchState.SEARCHING,
    (SearchState.SEARCHING, Input.SETTLED): SearchState.SEARCH_COMPLETE,
    (SearchState.SEARCHING, Input.BLACK_HOLE): SearchState.SEARCHING,
    (SearchState.SEARCH_COMPLETE, Input.RAISE_TIMER): SearchState.SEARCHING,
    (SearchState.SEARCH_COMPLETE, Input.BLACK_HOLE): SearchState.SEARCHING,
}


class PathMtuSearch:
    """The search of one tunnel's path; see the module docstring."""

    # One per tunnel: slots keep it small (docs/performance.md, memory per tunnel).
    __slots__ = (
        "_black_hole_bursts",
        "_bursts",
        "_candidate",
        "_high",
        "_in_flight",
        "_last_lost",
        "_losses_at",
        "_probes",
        "_raise_at",
        "_raise_interval",
        "_resolution",
        "_tried_ceiling",
        "base",
        "black_holes",
        "ceiling",
        "probes_acked",
        "probes_lost",
        "probes_sent",
        "size",
        "state",
    )

    def __init__(self, *, ceiling: int, limits: Limits, base: int = BASE_DATAGRAM_SIZE) -> None:
        if ceiling < base:
            raise LocalProtocolError(f"the datagram size ceiling {ceiling} is below {base}")
        self.state = SearchState.BASE
        self.base = base
        #: The datagram size to send now (the PLPMTU).
        self.size = base
        #: The configured ceiling, lowered by the peer's ``max_udp_payload_size``.
        self.ceiling = ceiling
        #: Probes sent, acknowledged and lost; black holes found (for tests and stats).
        self.probes_sent = 0
        self.probes_acked = 0
        self.probes_lost = 0
        self.black_holes = 0
        self._probes = limits.path_mtu_probes
        self._raise_interval = limits.path_mtu_raise_interval
        self._resolution = limits.path_mtu_search_resolution
        self._black_hole_bursts = limits.path_mtu_black_hole_bursts
        #: The smallest size known not to pass, minus one: the search's upper bound.
        self._high = ceiling
        self._tried_ceiling = False
        #: The size being probed, until it is acknowledged or given up.
        self._candidate: int | None = None
        self._in_flight: int | None = None
        self._losses_at: tuple[int, int] = (0, 0)  # (size, probes of it lost in a row)
        self._raise_at: float | None = None
        self._bursts = 0
        self._last_lost: int | None = None

    # What the engine asks --------------------------------------------------------

    def probe_size(self, now: float) -> int | None:
        """The size of a probe to send now, or None (not searching, or one is out)."""
        if self._raise_at is not None and now >= self._raise_at:
            self._raise_at = None
            self._move(Input.RAISE_TIMER)
            self._high = self.ceiling
            self._tried_ceiling = False
            self._candidate = None
        if self.state is not SearchState.SEARCHING or self._in_flight is not None:
            return None
        if self._high - self.size < self._resolution or self._high <= self.size:
            self._settle(now)
            return None
        if self._candidate is None:
            # Tried until acknowledged or lost ``path_mtu_probes`` times in a row.
            self._candidate = (
                self._high if not self._tried_ceiling else (self.size + self._high + 1) // 2
            )
            self._tried_ceiling = True
        return self._candidate

    def get_timer(self) -> float | None:
        """When :meth:`probe_size` may have something new to say without any other
        input: the raise timer (probes are otherwise sent as the previous one is
        settled, which the engine learns from acknowledgements and losses)."""
        return self._raise_at

    # What the engine tells -------------------------------------------------------

    def start(self) -> None:
        """1-RTT keys are there: probing may begin."""
        if self.state is SearchState.BASE:
            self._move(Input.START)

    def limit_to_peer(self, max_udp_payload_size: int) -> None:
        """The peer's ``max_udp_payload_size`` transport parameter bounds every size."""
        limit = max(self.base, max_udp_payload_size)
        if limit < self.ceiling:
            self.ceiling = limit
            self._high = min(self._high, limit)
            self.size = min(self.size, limit)
            if self._candidate is not None and self._candidate > limit:
                self._candidate = None  # picked for the old ceiling: pick again

    def probe_sent(self, size: int, now: float) -> None:
        self._in_flight = size
        self.probes_sent += 1

    def probe_acked(self, size: int, now: float) -> None:
        """The peer acknowledged a probe of ``size``: the path carries it."""
        self._probe_done(size)
        self.probes_acked += 1
        if size > self.size and size <= self.ceiling:
            self.size = size
        if size == self._candidate:
            self._candidate = None
        self._losses_at = (0, 0)
        self._bursts = 0

    def probe_lost(self, size: int, now: float) -> None:
        """A probe of ``size`` was declared lost (not a congestion signal)."""
        self._probe_done(size)
        self.probes_lost += 1
        previous, count = self._losses_at
        count = count + 1 if previous == size else 1
        self._losses_at = (size, count)
        if count >= self._probes:
            self._high = min(self._high, size - 1)
            self._losses_at = (0, 0)
            if size == self._candidate:
                self._candidate = None

    def packet_acked(self, size: int) -> None:
        """A packet of ``size`` (larger than the base) was acknowledged."""
        if size >= self.size:
            self._bursts = 0
            self._last_lost = None

    def packet_lost(self, size: int, packet_number: int) -> None:
        """A packet of ``size`` (larger than the base) was declared lost.  Losses of
        consecutive packet numbers are one burst; enough bursts of full-size packets
        with no full-size packet acknowledged in between make a black hole."""
        burst_goes_on = self._last_lost is not None and packet_number == self._last_lost + 1
        self._last_lost = packet_number
        if burst_goes_on or size < self.size or self.size <= self.base:
            return
        self._bursts += 1
        if self._bursts >= self._black_hole_bursts:
            self._black_hole()

    # Inside ------------------------------------------------------------------------

    def _probe_done(self, size: int) -> None:
        if self._in_flight == size:
            self._in_flight = None

    def _settle(self, now: float) -> None:
        self._move(Input.SETTLED)
        self._raise_at = now + self._raise_interval

    def _black_hole(self) -> None:
        self.black_holes += 1
        self._move(Input.BLACK_HOLE)
        self._raise_at = None
        self._high = self.size - 1
        self._tried_ceiling = True  # the ceiling (or more) failed: search below it
        self._candidate = None
        self.size = self.base
        self._bursts = 0
        self._last_lost = None
        self._losses_at = (0, 0)

    def _move(self, event: Input) -> None:
        try:
            self.state = _TRANSITIONS[self.state, event]
        except KeyError:
            raise LocalProtocolError(
                f"path MTU search: {event.value} is not expected in {self.state.value}"
            ) from None
