"""The tokens file: one ``NAME SECRET`` line per tunnel name.

The server's file lists every tunnel it admits; a client's file holds its one
line.  Blank lines and lines starting with ``#`` are ignored.  Parsing is pure
(text in, mapping out); reading the file is the caller's business.
"""

from __future__ import annotations

from collections.abc import Mapping

from .._wire.auth import validate_tunnel_name
from .._wire.errors import LocalProtocolError

#: Shortest secret accepted: guessing 16 random characters is out of reach.
MIN_SECRET_LENGTH = 16


def parse_tokens(text: str, *, source: str = "tokens file") -> dict[str, bytes]:
    """Map each tunnel name to its secret; a clear error names the bad line."""
    tokens: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise LocalProtocolError(
                f"{source} line {number}: expected 'NAME SECRET' (two fields), found {len(parts)}"
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
    return tokens


def parse_single_token(text: str, *, source: str = "token file") -> tuple[str, bytes]:
    """A client's token file: exactly one ``NAME SECRET`` line."""
    tokens = parse_tokens(text, source=source)
    if len(tokens) != 1:
        raise LocalProtocolError(f"{source}: expected exactly one 'NAME SECRET' line")
    ((name, secret),) = tokens.items()
    return name, secret


def format_tokens(tokens: Mapping[str, bytes]) -> str:
    return "".join(f"{name} {secret.decode('utf-8')}\n" for name, secret in tokens.items())
