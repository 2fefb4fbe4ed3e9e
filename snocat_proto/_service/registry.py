"""Which authenticated tunnels exist, and where outbound streams are routed.

A :class:`TunnelRecord` is the serializable description of one authenticated tunnel.
:class:`TunnelRegistry` is the embedded, in-memory registry of them: every operation
is synchronous, atomic and returns its result, so an async adapter (or a later
registry on a distributed store) can wrap it without re-entrancy surprises.

Changes are published as :class:`RegistryEvent` values through a
:class:`~snocat_proto._service.fanout.Fanout`.  Unlike the snocat 0.8 reference, whose
lagging broadcast channel silently drops events for slow readers, every
:class:`RegistrySubscription` has its own FIFO: a subscriber sees every event published
after it subscribed, in order, and one that falls ``limit`` events behind is closed
with :attr:`~snocat_proto._service.fanout.Subscription.overflowed` set, never silently
skipped; it can subscribe again with ``replay=True``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from .._wire.errors import LocalProtocolError
from .._wire.limits import Limits
from .fanout import Fanout, Subscription

__all__ = [
    "SCHEME_SIMPLE_ACK",
    "SCHEME_TOKEN",
    "RegistryEvent",
    "RegistrySubscription",
    "TunnelDeregistered",
    "TunnelRecord",
    "TunnelRegistered",
    "TunnelRegistry",
    "TunnelUpdated",
]

#: A tunnel whose name was proven with a token.
SCHEME_TOKEN: Final = "token"
#: A tunnel authenticated by the credential-free snocat 0.8 "SimpleAck" exchange;
#: its name is the peer's socket address text.
SCHEME_SIMPLE_ACK: Final = "simple-ack"

_RECORD_KEYS: Final = frozenset({"tunnel_id", "name", "peer", "scheme", "registered_at", "ports"})
DEFAULT_LIMITS: Final = Limits()
_MIN_PORT: Final = 1
_MAX_PORT: Final = 65535


def _is_int(value: object) -> bool:
    # bool is an int subclass; True is not a port number.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelRecord:
    """One authenticated tunnel, as the registry (and a shared store) keeps it.

    Validated at construction: a record that exists is a record that serializes.
    ``registered_at`` is normalised to ``float``; ``ports`` must hold distinct ports.
    """

    #: Unique per tunnel connection; chosen by the caller (never reused while registered).
    tunnel_id: str
    #: The authenticated identity; outbound routing looks tunnels up by it.
    name: str
    #: The peer's socket address text, for logs and for the SimpleAck scheme.
    peer: str
    #: How the name was authenticated, e.g. :data:`SCHEME_TOKEN` or :data:`SCHEME_SIMPLE_ACK`.
    scheme: str
    #: The caller's clock when the tunnel was authenticated.
    registered_at: float
    #: Public ports granted to this tunnel.
    ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for key in ("tunnel_id", "name", "scheme"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise LocalProtocolError(
                    f"TunnelRecord.{key} must be a non-empty string, not {value!r}"
                )
        if not isinstance(self.peer, str):
            raise LocalProtocolError(f"TunnelRecord.peer must be a string, not {self.peer!r}")
        at = self.registered_at
        if not (_is_int(at) or isinstance(at, float)):
            raise LocalProtocolError(f"TunnelRecord.registered_at must be a number, not {at!r}")
        try:
            at_float = float(at)
        except OverflowError:
            at_float = math.inf
        if not math.isfinite(at_float):
            raise LocalProtocolError(f"TunnelRecord.registered_at must be finite, not {at!r}")
        object.__setattr__(self, "registered_at", at_float)
        if not isinstance(self.ports, tuple):
            raise LocalProtocolError(f"TunnelRecord.ports must be a tuple, not {self.ports!r}")
        for port in self.ports:
            if not _is_int(port) or not _MIN_PORT <= port <= _MAX_PORT:
                raise LocalProtocolError(
                    f"TunnelRecord.ports must hold ports in {_MIN_PORT}..{_MAX_PORT}, not {port!r}"
                )
        if len(set(self.ports)) != len(self.ports):
            raise LocalProtocolError(f"TunnelRecord.ports repeats a port: {self.ports!r}")

    def with_ports(self, ports: tuple[int, ...]) -> TunnelRecord:
        """This record with its granted ports replaced (for :meth:`TunnelRegistry.update`)."""
        return TunnelRecord(
            tunnel_id=self.tunnel_id,
            name=self.name,
            peer=self.peer,
            scheme=self.scheme,
            registered_at=self.registered_at,
            ports=tuple(ports),
        )

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready mapping (ports become a list)."""
        return {
            "tunnel_id": self.tunnel_id,
            "name": self.name,
            "peer": self.peer,
            "scheme": self.scheme,
            "registered_at": self.registered_at,
            "ports": list(self.ports),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> TunnelRecord:
        """Rebuild a record from :meth:`to_dict` output.

        Strict: every key must be present, no other key may be, and every value must
        have the right type; anything else raises :class:`LocalProtocolError`.
        """
        if not isinstance(data, Mapping):
            raise LocalProtocolError(f"a tunnel record must be a mapping, not {type(data)!r}")
        keys = set(data.keys())
        missing = _RECORD_KEYS - keys
        if missing:
            raise LocalProtocolError(f"tunnel record is missing {sorted(missing)!r}")
        unknown = keys - _RECORD_KEYS
        if unknown:
            raise LocalProtocolError(
                f"tunnel record has unknown keys {sorted(map(repr, unknown))!r}"
            )
        ports = data["ports"]
        if not isinstance(ports, list | tuple):
            raise LocalProtocolError(f"tunnel record ports must be a list, not {ports!r}")
        # The other values are still `object` here: __post_init__ type-checks them all.
        fields: dict[str, object] = dict(data)
        fields["ports"] = tuple(ports)
        return cls(**fields)  # type: ignore[arg-type]

    def to_json(self) -> str:
        """Compact JSON text of :meth:`to_dict`, with sorted keys."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes | bytearray) -> TunnelRecord:
        """Parse :meth:`to_json` output; malformed input raises :class:`LocalProtocolError`."""
        if not isinstance(text, str | bytes | bytearray):
            raise LocalProtocolError(f"tunnel record JSON must be text, not {type(text)!r}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            # ValueError covers JSONDecodeError, UnicodeDecodeError and over-long ints.
            raise LocalProtocolError(f"tunnel record is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise LocalProtocolError("tunnel record JSON must be an object")
        return cls.from_dict(data)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryEvent:
    """Base class of everything a :class:`RegistrySubscription` delivers."""

    record: TunnelRecord

    def __post_init__(self) -> None:
        if not isinstance(self.record, TunnelRecord):
            raise LocalProtocolError(f"{type(self).__name__}.record must be a TunnelRecord")


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelRegistered(RegistryEvent):
    """A tunnel was added; it is now the newest tunnel of its name."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelDeregistered(RegistryEvent):
    """A tunnel was removed; ``record`` is its last state (so its ports may be freed)."""

    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelUpdated(RegistryEvent):
    """A tunnel's record changed (e.g. its ports); ``previous`` is the state it replaced."""

    previous: TunnelRecord

    def __post_init__(self) -> None:
        super(TunnelUpdated, self).__post_init__()
        if not isinstance(self.previous, TunnelRecord):
            raise LocalProtocolError("TunnelUpdated.previous must be a TunnelRecord")
        if self.previous.tunnel_id != self.record.tunnel_id:
            raise LocalProtocolError("TunnelUpdated must describe a single tunnel")


#: One reader's FIFO of registry events (see :mod:`~snocat_proto._service.fanout`).
RegistrySubscription = Subscription[RegistryEvent]


class TunnelRegistry:
    """The embedded, in-memory registry of authenticated tunnels.

    "Newest" means most recently passed to :meth:`register` (not the largest
    ``registered_at``: the caller's clock may step, the call order cannot).
    Several tunnels may share a name (a reconnecting client briefly has two);
    :meth:`route` picks the newest. A public port belongs to at most one tunnel.
    """

    def __init__(self, *, limit: int = DEFAULT_LIMITS.max_subscriber_backlog) -> None:
        self._records: dict[str, TunnelRecord] = {}
        # name -> its tunnel ids as dict keys, which keep insertion (= registration)
        # order: the last key is the newest tunnel, and removal is O(1).
        self._names: dict[str, dict[str, None]] = {}
        self._ports: dict[int, str] = {}
        self._events: Fanout[RegistryEvent] = Fanout(limit)

    # -- queries ----------------------------------------------------------------

    def get(self, tunnel_id: str) -> TunnelRecord | None:
        return self._records.get(tunnel_id)

    def by_name(self, name: str) -> tuple[TunnelRecord, ...]:
        """Every tunnel with ``name``, most recently registered first."""
        tunnel_ids = self._names.get(name, {})
        return tuple(self._records[tunnel_id] for tunnel_id in reversed(tunnel_ids))

    def route(self, name: str) -> TunnelRecord | None:
        """The tunnel an outbound stream for ``name`` goes to: the newest of that name."""
        tunnel_ids = self._names.get(name)
        if tunnel_ids is None:
            return None
        return self._records[next(reversed(tunnel_ids))]

    def by_port(self, port: int) -> TunnelRecord | None:
        """The tunnel that holds public ``port``, if any."""
        tunnel_id = self._ports.get(port)
        return None if tunnel_id is None else self._records[tunnel_id]

    def names(self) -> frozenset[str]:
        """The names that have at least one tunnel."""
        return frozenset(self._names)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[TunnelRecord]:
        """Records in registration order (oldest first), over a snapshot."""
        return iter(tuple(self._records.values()))

    def __contains__(self, tunnel_id: object) -> bool:
        return tunnel_id in self._records

    # -- changes ----------------------------------------------------------------

    def register(self, record: TunnelRecord) -> None:
        """Add a tunnel; it becomes the newest of its name. Publishes :class:`TunnelRegistered`.

        Raises :class:`LocalProtocolError` if the ``tunnel_id`` is registered already or
        one of its ports belongs to another tunnel (and then changes nothing).
        """
        if not isinstance(record, TunnelRecord):
            raise LocalProtocolError(f"register() takes a TunnelRecord, not {type(record)!r}")
        if record.tunnel_id in self._records:
            raise LocalProtocolError(f"tunnel {record.tunnel_id!r} is already registered")
        self._check_ports_free(record)
        self._records[record.tunnel_id] = record
        self._names.setdefault(record.name, {})[record.tunnel_id] = None
        for port in record.ports:
            self._ports[port] = record.tunnel_id
        self._publish(TunnelRegistered(record=record))

    def deregister(self, tunnel_id: str, reason: str = "") -> TunnelRecord | None:
        """Remove a tunnel and return its last record; publishes :class:`TunnelDeregistered`.

        Idempotent: an unknown ``tunnel_id`` returns ``None`` and publishes nothing.
        """
        record = self._records.pop(tunnel_id, None)
        if record is None:
            return None
        tunnel_ids = self._names[record.name]
        del tunnel_ids[tunnel_id]
        if not tunnel_ids:
            del self._names[record.name]
        for port in record.ports:
            del self._ports[port]
        self._publish(TunnelDeregistered(record=record, reason=reason))
        return record

    def update(self, record: TunnelRecord) -> TunnelRecord:
        """Replace a registered tunnel's record and return the previous one.

        Publishes :class:`TunnelUpdated` unless the record is unchanged. The tunnel
        keeps its place in the registration order. ``name`` and ``scheme`` are the
        tunnel's authenticated identity and may not change (``peer`` may: QUIC
        connections migrate). Raises :class:`LocalProtocolError` for an unknown
        tunnel, an identity change, or a port held by another tunnel.
        """
        if not isinstance(record, TunnelRecord):
            raise LocalProtocolError(f"update() takes a TunnelRecord, not {type(record)!r}")
        previous = self._records.get(record.tunnel_id)
        if previous is None:
            raise LocalProtocolError(f"tunnel {record.tunnel_id!r} is not registered")
        if record.name != previous.name or record.scheme != previous.scheme:
            raise LocalProtocolError(
                f"tunnel {record.tunnel_id!r} may not change its name or scheme; "
                "deregister it and register a new tunnel instead"
            )
        if record == previous:
            return previous
        self._check_ports_free(record)
        for port in previous.ports:
            del self._ports[port]
        for port in record.ports:
            self._ports[port] = record.tunnel_id
        self._records[record.tunnel_id] = record
        self._publish(TunnelUpdated(record=record, previous=previous))
        return previous

    # -- events -----------------------------------------------------------------

    def subscribe(self, *, replay: bool = False) -> RegistrySubscription:
        """A new subscription that receives every event published from now on.

        With ``replay=True`` its queue starts with a :class:`TunnelRegistered` for each
        current tunnel (oldest first), so snapshot and stream are consistent.
        """
        initial = [TunnelRegistered(record=r) for r in self._records.values()] if replay else []
        return self._events.subscribe(initial)

    @property
    def subscriber_count(self) -> int:
        return self._events.subscriber_count

    @property
    def laggards(self) -> int:
        """Subscriptions closed because their reader fell too far behind."""
        return self._events.laggards

    def _publish(self, event: RegistryEvent) -> None:
        self._events.publish(event)

    def _check_ports_free(self, record: TunnelRecord) -> None:
        for port in record.ports:
            holder = self._ports.get(port)
            if holder is not None and holder != record.tunnel_id:
                raise LocalProtocolError(f"port {port} already belongs to tunnel {holder!r}")
