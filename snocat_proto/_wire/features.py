"""Wire additions two snocat peers agree on in the authentication exchange.

A token-scheme Connect side lists the additions it supports in its token response
(``"features": [...]``); the Listen side answers, in its ``{"ok": true}`` result,
with those it supports too; both use exactly that set on this tunnel (docs/protocol.md
3.12).  A snocat 0.8 peer speaks only SimpleAck, which carries no list, so it is never
sent an addition; a peer of ours that lists nothing gets the exact 0.8 bytes.
"""

from __future__ import annotations

from typing import Final

__all__ = ["FEATURES", "PROXYME_OPTIONS", "parse_features"]

#: The ``proxyme`` subject may be a JSON object asking for a public port
#: (``{"port": 8085}``), and a denial may say why (``{"denied": REASON, "retry": BOOL}``).
PROXYME_OPTIONS: Final = "proxyme-options"
#: Every addition this implementation speaks (what a side offers by default).
FEATURES: Final = frozenset({PROXYME_OPTIONS})

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
