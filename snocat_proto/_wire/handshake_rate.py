"""How many full handshakes one client address may make the aggregator pay for.

A QUIC handshake costs the aggregator a few milliseconds of CPU (key exchange,
certificate signature).  Retry proves a client's address before that work, so a
source can be held to a rate: a token bucket per address, IPv6 addresses grouped by
their /64 (one host usually holds a whole /64).  Memory is bounded: past
``max_sources`` addresses the least recently seen one is forgotten, which at worst
gives it a fresh burst.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass

from .network import NetworkAddress

__all__ = ["DEFAULT_HANDSHAKE_RATE", "HandshakeBuckets", "HandshakeRate", "source_of"]


@dataclass(frozen=True)
class HandshakeRate:
    """Full handshakes one source address may start: ``per_second`` on average, up to
    ``burst`` at once (a fleet of clients behind one NAT reconnecting together)."""

    per_second: float = 20.0
    burst: int = 100

    def __post_init__(self) -> None:
        if not (math.isfinite(self.per_second) and self.per_second > 0):
            raise ValueError(f"per_second must be a positive number, not {self.per_second!r}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, not {self.burst!r}")

    @classmethod
    def of(cls, per_second: float) -> HandshakeRate:
        """``per_second`` with a burst of five seconds' worth (the CLI's one knob)."""
        return cls(per_second, burst=max(1, math.ceil(5 * per_second)))


#: 20 a second, 100 at once: a handshake costs the aggregator about 3 ms of CPU
#: (docs/performance.md), so one address can take about 6 % of a core.
DEFAULT_HANDSHAKE_RATE = HandshakeRate()


def source_of(addr: NetworkAddress) -> str:
    """The source a handshake is charged to: the IPv4 address, or the IPv6 /64."""
    host = str(addr[0])
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # a dual-stack socket's view of an IPv4 client
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class HandshakeBuckets:
    """One token bucket per source; :meth:`allow` spends a token if there is one."""

    def __init__(self, rate: HandshakeRate, *, max_sources: int = 65536) -> None:
        self.rate = rate
        self._max_sources = max_sources
        #: source -> (tokens, when they were counted); least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, addr: NetworkAddress, now: float) -> bool:
        source = source_of(addr)
        found = self._buckets.pop(source, None)
        if found is None:
            tokens = float(self.rate.burst)
            if len(self._buckets) >= self._max_sources:
                self._buckets.popitem(last=False)
        else:
            tokens, counted = found
            elapsed = max(0.0, now - counted)
            tokens = min(float(self.rate.burst), tokens + elapsed * self.rate.per_second)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[source] = (tokens, now)
        return allowed
