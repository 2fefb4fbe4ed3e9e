"""Wire additions two snocat peers agree on in the authentication exchange.

A token-scheme Connect side lists the additions it supports in its token response
(``"features": [...]``); the Listen side answers, in its ``{"ok": true}`` result,
with those it supports too; both use exactly that set on this tunnel (docs/protocol.md
3.12).  A snocat 0.8 peer speaks only SimpleAck, which carries no list, so it is never
sent an addition; a peer of ours that lists nothing gets the exact 0.8 bytes.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BY_NAME",
    "FEATURES",
    "PROXYME_OPTIONS",
    "UDP_DATAGRAMS",
    "VISITOR_ADDRESS",
    "parse_features",
]

#: The ``proxyme`` subject may be a JSON object asking for a public port
#: (``{"port": 8085}``), and a denial may say why (``{"denied": REASON, "retry": BOOL}``).
PROXYME_OPTIONS: Final = "proxyme-options"
#: UDP flows over QUIC DATAGRAM frames (docs/protocol.md 3.17): a ``proxyme`` subject
#: may ask for a UDP port (``{"udp": true}``, with ``proxyme-options``), and flows are
#: set up on ``/proxy-udp/...`` streams.  Not offered by default: only a side that
#: serves UDP lists it, and it needs the QUIC transport parameter
#: ``max_datagram_frame_size`` in the handshake (``udp_flows.advertise_datagrams``).
UDP_DATAGRAMS: Final = "udp-datagrams"
#: Each ``proxy-tcp`` stream the Listen side opens for a visitor's connection names the
#: visitor's address and the public address it came to, as a suffix of the route
#: address (``.../from/ip4/203.0.113.7/tcp/40000/to/ip4/198.51.100.1/tcp/443``,
#: docs/protocol.md 3.18; :mod:`~snocat_proto._wire.visitor`).
VISITOR_ADDRESS: Final = "visitor-address"
#: A ``proxyme`` subject may publish a target by name on the aggregator's shared
#: listeners instead of asking for a port: ``{"http": true}`` or ``{"tls": true}``
#: (with ``proxyme-options``; docs/protocol.md 3.14.6).
BY_NAME: Final = "by-name"
#: The additions a side offers by default.  ``udp-datagrams`` is left out: a side offers
#: it when it serves UDP (an aggregator with a UDP port range, a client with UDP
#: targets), as it also costs a transport parameter in every handshake.
FEATURES: Final = frozenset({PROXYME_OPTIONS, VISITOR_ADDRESS, BY_NAME})

#: A peer listing more than this many names, or longer ones, lists junk: ignored.
_MAX_FEATURES = 32
_MAX_FEATURE_LENGTH = 64


def parse_features(value: object) -> frozenset[str]:
    """The names a ``features`` member lists; anything malformed counts as none
    (readers ignore members they do not understand, and a bad list is one)."""
    if not isinstance(value, list) or len(value) > _MAX_FEATURES:
        return frozenset()
    names = frozenset(v for v in value if isinstance(v, str) and 0 < len(v) <= _MAX_FEATURE_LENGTH)
    return names if len(names) == len(value) else frozenset()
