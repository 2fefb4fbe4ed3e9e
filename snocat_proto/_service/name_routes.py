"""Reaching tunnels by name: what each tunnel publishes, pools, and who gets the next visitor.

This module owns the aggregator's books for the shared listeners (docs/protocol.md
3.14): which tunnel publishes which target as ``http`` or ``tls`` (a ``proxyme``
exchange with the ``by-name`` subject, held open while it lasts), and which of them a
visitor of ``NAME.DOMAIN`` goes to.  The binding asks :meth:`NameRoutes.choose` and
only executes.

* A tunnel is reached only under the name it authenticated as, lower-cased
  (:meth:`~snocat_proto._wire.names.TunnelDomain.name_for` reports hosts lower-case);
  a name that is not a DNS label is never reached (its publication is refused).
* **One name, one tunnel** (3.15), unless the name is a **pool** (the tokens file's
  ``pool`` flag, :mod:`~snocat_proto._service.tokens`): then every tunnel of that
  name serves it, and each new visitor goes to the member with the fewest by-name
  connections in flight, round robin among equals.  A member stops getting visitors
  as soon as it withdraws its publication or its tunnel closes.  Outside a pool the
  newest publisher serves (the older tunnel is being taken over).
* Two different tunnel names that differ only in case would share one host: the
  second to publish is refused, so a host never reaches a tunnel it does not name.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .._wire.names import is_label
from .._wire.proxyme import NAMED_SERVICES
from .._wire.targets import ProxyTcpTarget

__all__ = ["Member", "NameRefusal", "NameRoutes", "host_label"]


class Member(Protocol):
    """What the books need of a tunnel (the aggregator's ``TunnelSession``)."""

    name: str | None
    closed: bool

    @property
    def label(self) -> str: ...


S = TypeVar("S", bound=Member)


def host_label(name: str | None) -> str | None:
    """The host label that reaches the tunnel ``name``: its lower-case form, if that is
    one DNS label (else the tunnel cannot be reached by name)."""
    if name is None:
        return None
    label = name.lower()
    return label if is_label(label) else None


@dataclass(frozen=True, slots=True)
class NameRefusal:
    """Why a tunnel may not publish a target by name (told to the client), and whether
    asking again can help."""

    reason: str
    retry: bool


class NameRoutes(Generic[S]):
    """See the module docstring.  ``pools``: the tunnel names served by several
    tunnels at once."""

    def __init__(self, pools: Iterable[str] = ()) -> None:
        self._pools = frozenset(pools)
        #: By host label: the tunnels that publish under it, oldest first.
        self._members: dict[str, list[S]] = {}
        #: By tunnel: what it publishes, by service.
        self._published: dict[S, dict[str, ProxyTcpTarget]] = {}
        #: By tunnel: the by-name connections it carries now.
        self._active: dict[S, int] = {}
        #: By (label, service): where the round robin goes on.
        self._turn: dict[tuple[str, str], int] = {}

    # Pools ----------------------------------------------------------------------

    @property
    def pools(self) -> frozenset[str]:
        return self._pools

    def set_pools(self, pools: Iterable[str]) -> None:
        """The pools from now on (a tokens reload).  Tunnels already up stay; the rule
        applies to the next tunnel that authenticates."""
        self._pools = frozenset(pools)

    def is_pool(self, name: str | None) -> bool:
        return name is not None and name in self._pools

    # Publications ---------------------------------------------------------------

    def publish(self, session: S, service: str, target: ProxyTcpTarget) -> NameRefusal | None:
        """``session`` publishes ``target`` as ``service``: None, or why not."""
        if service not in NAMED_SERVICES:
            return NameRefusal(f"no such service {service!r}", retry=False)
        label = host_label(session.name)
        if label is None:
            return NameRefusal(
                f"tunnel name {session.label!r} is not a DNS label (letters, digits, inner "
                "hyphens; at most 63), so it cannot be reached by name",
                retry=False,
            )
        published = self._published.setdefault(session, {})
        if service in published:
            return NameRefusal(
                f"this tunnel publishes a {service} target already ({published[service]})",
                retry=False,
            )
        members = self._members.setdefault(label, [])
        others = {member.name for member in members if member is not session}
        if others and others != {session.name}:
            (other,) = others
            return NameRefusal(
                f"the host label {label!r} is served by the tunnel {other!r}", retry=True
            )
        published[service] = target
        if session not in members:
            members.append(session)
        self._active.setdefault(session, 0)
        return None

    def withdraw(self, session: S, service: str) -> bool:
        """``session`` no longer publishes ``service``; whether it did."""
        published = self._published.get(session)
        if published is None or published.pop(service, None) is None:
            return False
        if not published:
            self.forget(session)
        return True

    def forget(self, session: S) -> None:
        """``session`` 's tunnel closed: it publishes nothing any more."""
        self._published.pop(session, None)
        self._active.pop(session, None)
        label = host_label(session.name)
        members = self._members.get(label or "")
        if members is not None and session in members:
            members.remove(session)
            if not members:
                del self._members[label or ""]
                for key in [key for key in self._turn if key[0] == label]:
                    del self._turn[key]

    def services_of(self, session: S) -> tuple[str, ...]:
        """What ``session`` publishes by name (``("http", "tls")``), in that order."""
        published = self._published.get(session, {})
        return tuple(service for service in NAMED_SERVICES if service in published)

    def publishers(self, label: str, service: str | None = None) -> list[S]:
        """The tunnels that publish under ``label`` (``service``, or any), oldest first."""
        return [
            member
            for member in self._members.get(label, ())
            if not member.closed and (service is None or service in self._published[member])
        ]

    # Choosing -------------------------------------------------------------------

    def choose(
        self, label: str, service: str, exclude: Collection[S] = ()
    ) -> tuple[S, ProxyTcpTarget] | None:
        """The tunnel the next visitor of ``label`` 's ``service`` goes to, and the
        target it published; None if no tunnel (but those in ``exclude``) serves it."""
        members = [m for m in self.publishers(label, service) if m not in exclude]
        if not members:
            return None
        if not self.is_pool(members[-1].name):
            chosen = members[-1]  # one name, one tunnel: the newest (3.15)
        else:
            key = (label, service)
            start = self._turn.get(key, 0) % len(members)
            rotated = members[start:] + members[:start]
            chosen = min(rotated, key=lambda member: self._active.get(member, 0))
            self._turn[key] = members.index(chosen) + 1
        return chosen, self._published[chosen][service]

    def opened(self, session: S) -> None:
        """A by-name connection to ``session`` began."""
        if session in self._active:
            self._active[session] += 1

    def finished(self, session: S) -> None:
        """A by-name connection to ``session`` ended."""
        if self._active.get(session, 0) > 0:
            self._active[session] -= 1

    def active(self, session: S) -> int:
        """The by-name connections ``session`` carries now."""
        return self._active.get(session, 0)
