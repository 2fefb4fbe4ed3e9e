"""Which ``proxy-tcp`` targets a client forwards to.

snocat 0.8 clients connect wherever the aggregator says: a compromised or
impersonated aggregator could reach any host on the client's network.  Our
clients forward only to targets they were configured with.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._wire.address import RouteAddress
from .._wire.errors import RemoteProtocolError
from .._wire.targets import ProxyTcpTarget


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

    def check(self, address: RouteAddress) -> ProxyTcpTarget | str:
        """The target a stream the aggregator opened to ``address`` may be forwarded to,
        or why the stream is refused (not ``proxy-tcp``, malformed, not allowed)."""
        try:
            target = ProxyTcpTarget.from_address(address)
        except RemoteProtocolError as exc:
            return f"malformed proxy-tcp address: {exc.reason}"
        if target is None:
            return "no service for this address (only proxy-tcp is served)"
        if not self.permits(target):
            return f"target {target} is not in this client's allow-list"
        return target

    def __len__(self) -> int:
        return len(self._allowed)
