"""The tokens file: one ``NAME SECRET`` line per tunnel name, ``NAME SECRET pool`` for a pool.

The server's file lists every tunnel it admits; a client's file holds its one
line.  Blank lines and lines starting with ``#`` are ignored.  Parsing is pure
(text in, mapping out); reading the file is the caller's business.

A third field ``pool`` marks the name as a **pool** (docs/protocol.md 3.14.6): several
clients may hold tunnels of that name at once (no takeover, 3.15), and the visitors
of ``NAME.DOMAIN`` are spread across them.  Its clients share the name's secret.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .._wire.auth import validate_tunnel_name
from .._wire.errors import LocalProtocolError

#: Shortest secret accepted: guessing 16 random characters is out of reach.
MIN_SECRET_LENGTH = 16


#: The third field of a pool's line.
POOL_FLAG = "pool"


@dataclass(frozen=True, slots=True)
class TokenFile:
    """A parsed tokens file: each name's secret, and the names that are pools."""

    tokens: dict[str, bytes]
    pools: frozenset[str]


def parse_tokens(text: str, *, source: str = "tokens file") -> dict[str, bytes]:
    """Map each tunnel name to its secret; a clear error names the bad line."""
    return parse_token_file(text, source=source).tokens


def parse_token_file(text: str, *, source: str = "tokens file") -> TokenFile:
    """The secrets and the pools of a tokens file; a clear error names the bad line."""
    tokens: dict[str, bytes] = {}
    pools: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 3 and parts[2] == POOL_FLAG:
            pools.add(parts[0])
            parts = parts[:2]
        elif len(parts) != 2:
            raise LocalProtocolError(
                f"{source} line {number}: expected 'NAME SECRET' (two fields) or "
                f"'NAME SECRET pool', found {len(parts)} fields"
            )
        name, secret = parts
        try:
            validate_tunnel_name(name)
        except LocalProtocolError as exc:
            raise LocalProtocolError(f"{source} line {number}: {exc.reason}") from None
        if len(secret) < MIN_SECRET_LENGTH:
            raise LocalProtocolError(
                f"{source} line {number}: the secret for {name!r} is shorter than "
                f"{MIN_SECRET_LENGTH} characters"
            )
        if name in tokens:
            raise LocalProtocolError(f"{source} line {number}: {name!r} is listed twice")
        tokens[name] = secret.encode("utf-8")
    return TokenFile(tokens, frozenset(pools))


def parse_single_token(text: str, *, source: str = "token file") -> tuple[str, bytes]:
    """A client's token file: exactly one ``NAME SECRET`` line."""
    tokens = parse_tokens(text, source=source)
    if len(tokens) != 1:
        raise LocalProtocolError(f"{source}: expected exactly one 'NAME SECRET' line")
    ((name, secret),) = tokens.items()
    return name, secret


def format_tokens(tokens: Mapping[str, bytes], pools: Iterable[str] = ()) -> str:
    pooled = frozenset(pools)
    return "".join(
        f"{name} {secret.decode('utf-8')}{' ' + POOL_FLAG if name in pooled else ''}\n"
        for name, secret in tokens.items()
    )
