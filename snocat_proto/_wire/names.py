"""Reaching tunnels by name: DNS host names, and the rule ``NAME.DOMAIN`` -> ``NAME``.

This module owns two pure rules, and nothing about where a host name comes from
(the TLS SNI of :mod:`~snocat_proto._wire.sni`, the HTTP ``Host`` of
:mod:`~snocat_proto._wire.http_host`) or which tunnels exist:

* **What a host name is** (:func:`check_host_name`): ASCII letters, digits and
  hyphens in dot-separated labels of 1 to 63 characters, no label starting or
  ending with a hyphen, at most 253 characters, and a last label that is not all
  digits (so no IPv4 literal passes).  One trailing dot (the DNS root) is allowed
  and is not part of the name; case does not matter.  Internationalized names take
  part in their ``xn--`` (A-label) form.
* **Which tunnel a host names** (:meth:`TunnelDomain.name_for`): with the domain
  ``tunnels.example.com``, ``office-1.tunnels.example.com`` names the tunnel
  ``office-1``.  A name is exactly one label under the domain: ``a.b.tunnels.example.com``
  names no tunnel, nor does the bare domain.  Names come back lower-cased: tunnel
  names are matched without regard to case, and a tunnel whose name is not a DNS
  label (an underscore, a space, more than 63 characters) cannot be reached by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import LocalProtocolError

__all__ = [
    "MAX_HOST_NAME_LENGTH",
    "MAX_LABEL_LENGTH",
    "TunnelDomain",
    "check_host_name",
    "is_label",
    "normalize_host_name",
    "tunnel_name",
]

#: The longest label (RFC 1035, 2.3.4).
MAX_LABEL_LENGTH = 63
#: The longest host name in text form, without the trailing dot (RFC 1035: 255
#: octets on the wire, two of them the first length byte and the root).
MAX_HOST_NAME_LENGTH = 253

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)


def is_label(text: str) -> bool:
    """Whether ``text`` is one lower-case DNS label (letters, digits, inner hyphens)."""
    return _LABEL.fullmatch(text) is not None


def check_host_name(host: str) -> str | None:
    """Why ``host`` is not a DNS host name, or ``None`` if it is (any case, one
    trailing dot allowed)."""
    if not isinstance(host, str):
        return f"a host name must be str, not {type(host).__name__}"
    name = host[:-1] if host.endswith(".") else host
    if not name:
        return "the host name is empty"
    if len(name) > MAX_HOST_NAME_LENGTH:
        return f"the host name is {len(name)} characters; the limit is {MAX_HOST_NAME_LENGTH}"
    if not name.isascii():
        return "the host name is not ASCII (use its xn-- form)"
    labels = name.lower().split(".")
    for label in labels:
        if not label:
            return "the host name has an empty label"
        if len(label) > MAX_LABEL_LENGTH:
            return f"a label of the host name is {len(label)} characters; the limit is 63"
        if not is_label(label):
            return f"the label {label!r} is not letters, digits and inner hyphens"
    if labels[-1].isdigit():
        return "the host name ends in an all-digit label (an IP address is not a host name)"
    return None


def normalize_host_name(host: str) -> str | None:
    """``host`` lower-cased without its trailing dot, or ``None`` if it is no host name."""
    if check_host_name(host) is not None:
        return None
    return host.lower().removesuffix(".")


@dataclass(frozen=True, slots=True)
class TunnelDomain:
    """The domain under which each tunnel's name is a host: ``--domain`` of the
    aggregator.  Build it with :meth:`parse`; ``domain`` is normalized (lower-case,
    no trailing dot)."""

    domain: str

    def __post_init__(self) -> None:
        problem = check_host_name(self.domain)
        if problem is not None:
            raise LocalProtocolError(f"--domain {self.domain[:300]!r}: {problem}")
        if self.domain != normalize_host_name(self.domain):
            raise LocalProtocolError(
                f"TunnelDomain takes a normalized domain; use TunnelDomain.parse({self.domain!r})"
            )
        if len(self.domain) + 2 > MAX_HOST_NAME_LENGTH:
            raise LocalProtocolError(
                f"--domain is {len(self.domain)} characters: no name under it fits in "
                f"{MAX_HOST_NAME_LENGTH}"
            )

    @classmethod
    def parse(cls, text: str) -> TunnelDomain:
        """The domain an operator typed (any case, a trailing dot allowed);
        :class:`LocalProtocolError` naming the problem if it is no host name."""
        if not isinstance(text, str):
            raise LocalProtocolError(f"--domain must be text, not {type(text).__name__}")
        problem = check_host_name(text)
        if problem is not None:
            raise LocalProtocolError(f"--domain {text[:300]!r}: {problem}")
        return cls(text.lower().removesuffix("."))

    def name_for(self, host: str) -> str | None:
        """The tunnel name ``host`` asks for, or ``None`` if it names none (another
        domain, the bare domain, more than one label under it, not a host name)."""
        name = normalize_host_name(host)
        if name is None:
            return None
        label, dot, rest = name.partition(".")
        if not dot or rest != self.domain:
            return None
        return label

    def host_for(self, name: str) -> str:
        """The host that reaches the tunnel ``name``: ``NAME.DOMAIN`` (lower-cased);
        :class:`LocalProtocolError` if ``name`` is not a DNS label."""
        label = name.lower() if isinstance(name, str) else name
        if not isinstance(label, str) or not is_label(label):
            raise LocalProtocolError(f"tunnel name {str(name)[:128]!r} is not a DNS label")
        host = f"{label}.{self.domain}"
        if len(host) > MAX_HOST_NAME_LENGTH:
            raise LocalProtocolError(
                f"{host[:64]}... is longer than a host name may be ({MAX_HOST_NAME_LENGTH})"
            )
        return host


def tunnel_name(domain: str, host: str) -> str | None:
    """The tunnel name ``host`` asks for under ``domain`` (see :class:`TunnelDomain`);
    :class:`LocalProtocolError` if ``domain`` itself is not valid."""
    return TunnelDomain.parse(domain).name_for(host)
