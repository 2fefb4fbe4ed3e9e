"""UDP visitors whose flow the client refused, held off for a while.

A UDP visitor has no connection to refuse: its next datagram would open a new flow,
the client would refuse it again, and a visitor sending to a target the client does
not allow (or that is down) turned every round trip into a flow setup over the
tunnel, two activity records and two log lines.  Instead, a refused visitor's
datagrams are dropped (counted as ``refused``) for ``first`` seconds, twice as long
after each further refusal in a row, at most ``maximum``; a flow that opens resets
its count.  At most ``capacity`` visitors are remembered per port (the oldest is
forgotten first), so spoofed source addresses cannot grow it.

Pure: the caller passes ``now``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from .._wire.errors import LocalProtocolError
from .._wire.udp_flows import FlowEnd

__all__ = ["RefusedVisitors"]


@dataclass(slots=True)
class _Hold:
    until: float
    refusals: int


class RefusedVisitors:
    """The visitors of one UDP port that are held off after a refusal, by key."""

    def __init__(self, *, first: float, maximum: float, capacity: int) -> None:
        if not 0 <= first <= maximum or capacity < 1:
            raise LocalProtocolError("refusal holds need 0 <= first <= maximum, capacity >= 1")
        self._first = first
        self._maximum = maximum
        self._capacity = capacity
        self._holds: dict[Hashable, _Hold] = {}

    def __len__(self) -> int:
        return len(self._holds)

    def ended(self, key: Hashable, cause: FlowEnd, now: float) -> None:
        """``key`` 's flow ended: held off if the client refused it, else (it had
        opened) its next refusal starts from ``first`` again."""
        if cause is FlowEnd.REFUSED:
            self.refused(key, now)
        else:
            self.opened(key)

    def refused(self, key: Hashable, now: float) -> float:
        """The client refused ``key`` 's flow: hold it off; returns for how long."""
        hold = self._holds.pop(key, None)
        refusals = 1 if hold is None else hold.refusals + 1
        seconds = min(self._maximum, self._first * 2.0 ** min(refusals - 1, 32))
        while len(self._holds) >= self._capacity:
            del self._holds[next(iter(self._holds))]  # the oldest refusal
        self._holds[key] = _Hold(now + seconds, refusals)
        return seconds

    def held(self, key: Hashable, now: float) -> bool:
        """Whether ``key`` 's datagrams are dropped now (its hold not over yet)."""
        hold = self._holds.get(key)
        return hold is not None and now < hold.until

    def opened(self, key: Hashable) -> None:
        """``key`` 's flow was accepted: its next refusal starts from ``first`` again."""
        self._holds.pop(key, None)
