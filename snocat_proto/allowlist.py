"""Which ``proxy-tcp`` targets a client forwards to.

snocat 0.8 clients connect wherever the aggregator says: a compromised or
impersonated aggregator could reach any host on the client's network.  Our
clients forward only to targets they were configured with.
"""

from __future__ import annotations

from collections.abc import Iterable

from .targets import ProxyTcpTarget


def _key(target: ProxyTcpTarget) -> tuple[str, int]:
    return target.connect_host().lower().rstrip("."), target.port


class AllowList:
    """A set of permitted ``host:port`` targets, compared by host text and port.

    The aggregator names a client's target in the form the client itself asked for
    (``/proxy-tcp/dns/<host>/tcp/<port>``), so the kinds need not match: the host
    text and the port must.
    """

    def __init__(self, targets: Iterable[ProxyTcpTarget]) -> None:
        self._allowed = {_key(target) for target in targets}

    def permits(self, target: ProxyTcpTarget) -> bool:
        return _key(target) in self._allowed

    def __len__(self) -> int:
        return len(self._allowed)
