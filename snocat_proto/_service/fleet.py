"""The fleet's shared state on Valkey/Redis: keys, records, leases, fencing, events.

Nothing here talks to a store: this module says *what* is stored, *which* atomic
operations change it (Lua scripts, which the store runs as one step), how to read
back what they return, and what a node makes of the fleet's changes
(:class:`FleetView`).  The binding executes it (docs/fleet.md has the design).

Every claim a node makes (a tunnel name, a public port) is a key with a lease
(``PX``) that the node renews every third of it; a node that dies loses them within
one lease.  Each claim carries a fencing token, a number from one counter that only
grows: a renewal succeeds only if the key still holds the node's own token, so a node
that was paused past its lease and resumes finds that another node has claimed the
name or port since (another token), stops serving it, and its clients reconnect.  A
key that vanished (the store restarted) is set again by its holder's next renewal,
which also moves the counter past the holder's token: the state is rebuilt from what
the nodes hold, and tokens still only grow.

Conflict rules: a port is claimed only if free (of two nodes racing for one, exactly
one wins), except that a tunnel of the same name and target takes its port over (one
name, one tunnel: the client came back through another node).  A name is always taken
by the newest tunnel (last registration wins); the node that held it learns from the
event stream or its next renewal, and closes its tunnel.

Every change is appended to one stream (``XADD`` in the same script), so every node
sees them in order, and resumes after a disconnect from the last entry it read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from .._wire.errors import LocalProtocolError
from .._wire.network import parse_host_port
from .name_routes import host_label

__all__ = [
    "CLAIM_NAME",
    "CLAIM_PORT",
    "EVENTS_KEPT",
    "NODE_LEFT",
    "RELEASE",
    "RENEW",
    "UPDATE",
    "EventKind",
    "FleetEvent",
    "FleetKeys",
    "FleetView",
    "NameClaim",
    "NodeRecord",
    "PortClaim",
    "Stored",
    "ViewChange",
    "renew_interval",
]

#: How many stream entries the store keeps (``MAXLEN ~``, so a few more): a node
#: that was away for more changes than this rebuilds its view from the keys.
EVENTS_KEPT: Final = 10_000


class EventKind(StrEnum):
    """What an entry of the fleet's event stream says happened."""

    NODE_JOINED = "node_joined"
    NODE_LEFT = "node_left"
    TUNNEL_REGISTERED = "tunnel_registered"
    TUNNEL_UPDATED = "tunnel_updated"
    TUNNEL_DEREGISTERED = "tunnel_deregistered"
    PORT_CLAIMED = "port_claimed"
    PORT_RELEASED = "port_released"


@dataclass(frozen=True, slots=True)
class FleetKeys:
    """The key layout under one prefix (one fleet per prefix and database)."""

    prefix: str = "snocat"

    def node(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    def name(self, name: str) -> str:
        return f"{self.prefix}:name:{name}"

    def pool_member(self, name: str, tunnel_id: str) -> str:
        """A pool's names are shared: each member tunnel has a key of its own."""
        return f"{self.prefix}:pool:{name}:{tunnel_id}"

    def of_tunnel(self, record: NameClaim) -> str:
        """The key of a tunnel's record: its name's, or its own in a pool."""
        if record.pool:
            return self.pool_member(record.name, record.tunnel_id)
        return self.name(record.name)

    def port(self, port: int, protocol: str = "tcp") -> str:
        """A public port's key: TCP and UDP ports are separate ranges."""
        kind = "port" if protocol == "tcp" else "udp"
        return f"{self.prefix}:{kind}:{port}"

    def port_pattern_of(self, protocol: str) -> str:
        return self.port_pattern if protocol == "tcp" else f"{self.prefix}:udp:*"

    def sticky(self, name: str, target: str, protocol: str = "tcp") -> str:
        """The port ``name`` last had for ``target`` (a UDP port's apart)."""
        kind = "sticky" if protocol == "tcp" else "udp-sticky"
        return f"{self.prefix}:{kind}:{name} {target}"

    def gone(self, node: str, started: float) -> str:
        return f"{self.prefix}:gone:{node}:{started!r}"

    @property
    def fence(self) -> str:
        return f"{self.prefix}:fence"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def node_pattern(self) -> str:
        return f"{self.prefix}:node:*"

    @property
    def name_pattern(self) -> str:
        return f"{self.prefix}:name:*"

    @property
    def port_pattern(self) -> str:
        return f"{self.prefix}:port:*"

    @property
    def pool_pattern(self) -> str:
        return f"{self.prefix}:pool:*"


def renew_interval(lease: float) -> float:
    """Claims are renewed every third of their lease: two renewals may fail (a store
    that is briefly away, a slow round trip) before a claim lapses."""
    return lease / 3


# Records ---------------------------------------------------------------------------


def _json(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _fields(value: bytes, what: str) -> dict[str, Any]:
    try:
        fields = json.loads(value)
    except (ValueError, RecursionError):
        fields = None
    if not isinstance(fields, dict):
        raise LocalProtocolError(f"not a snocat {what}: {value[:64]!r}")
    return fields


def _text(fields: Mapping[str, Any], key: str, what: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str):
        raise LocalProtocolError(f"a snocat {what} without {key!r}")
    return value


def _port(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise LocalProtocolError(f"a snocat {what} with a bad port {value!r}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class NameClaim:
    """An authenticated tunnel, as the fleet knows it (the value of its name's key)."""

    name: str
    node: str
    tunnel_id: str
    scheme: str
    #: When it authenticated (seconds since the epoch).
    since: float
    ports: tuple[int, ...] = ()
    #: What it publishes by name (``"http"``, ``"tls"``: docs/protocol.md 3.14.6).
    services: tuple[str, ...] = ()
    #: One member of a pool (several tunnels serve the name; none takes it over).
    pool: bool = False

    @property
    def slot(self) -> str:
        """Where a view keeps it: by name, or for a pool member, by name and tunnel."""
        return f"{self.name}@{self.tunnel_id}" if self.pool else self.name

    def encode(self) -> bytes:
        fields: dict[str, Any] = {
            "name": self.name,
            "node": self.node,
            "tunnel": self.tunnel_id,
            "scheme": self.scheme,
            "since": self.since,
            "ports": list(self.ports),
        }
        if self.services:
            fields["services"] = list(self.services)
        if self.pool:
            fields["pool"] = True
        return _json(fields)

    @classmethod
    def decode(cls, value: bytes) -> NameClaim:
        what = "tunnel record"
        fields = _fields(value, what)
        since, ports = fields.get("since"), fields.get("ports", [])
        services, pool = fields.get("services", []), fields.get("pool", False)
        if not isinstance(since, int | float) or not isinstance(ports, list):
            raise LocalProtocolError(f"a snocat {what} with a bad 'since' or 'ports'")
        if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
            raise LocalProtocolError(f"a snocat {what} with bad 'services'")
        return cls(
            name=_text(fields, "name", what),
            node=_text(fields, "node", what),
            tunnel_id=_text(fields, "tunnel", what),
            scheme=_text(fields, "scheme", what),
            since=float(since),
            ports=tuple(_port(port, what) for port in ports),
            services=tuple(services),
            pool=pool is True,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PortClaim:
    """Who holds a public port: the node, the tunnel, and the name and target it
    serves (the value of the port's key)."""

    port: int
    node: str
    tunnel_id: str
    name: str
    target: str
    #: ``"tcp"`` or ``"udp"`` (a ``--udp-ports`` port: docs/protocol.md 3.17).
    protocol: str = "tcp"

    def encode(self) -> bytes:
        fields: dict[str, Any] = {
            "port": self.port,
            "node": self.node,
            "tunnel": self.tunnel_id,
            "name": self.name,
            "target": self.target,
        }
        if self.protocol != "tcp":
            fields["protocol"] = self.protocol
        return _json(fields)

    @classmethod
    def decode(cls, value: bytes) -> PortClaim:
        what = "port claim"
        fields = _fields(value, what)
        return cls(
            port=_port(fields.get("port"), what),
            node=_text(fields, "node", what),
            tunnel_id=_text(fields, "tunnel", what),
            name=_text(fields, "name", what),
            target=_text(fields, "target", what),
            protocol="udp" if fields.get("protocol") == "udp" else "tcp",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeRecord:
    """What a node tells the fleet about itself (its key, and node_joined events)."""

    node: str
    #: Where other nodes reach it (``HOST:PORT``, the node-to-node QUIC address).
    advertise: str
    #: The address its public ports bind to.
    tcp: str
    #: Nodes with one non-empty group (the workers of one ``--workers`` server) share
    #: the public ports of one address: only the holder of a port listens on it.
    group: str
    started: float

    def encode(self) -> bytes:
        return _json(
            {
                "node": self.node,
                "advertise": self.advertise,
                "tcp": self.tcp,
                "group": self.group,
                "started": self.started,
            }
        )

    @classmethod
    def decode(cls, value: bytes) -> NodeRecord:
        what = "node record"
        fields = _fields(value, what)
        started = fields.get("started")
        if not isinstance(started, int | float):
            raise LocalProtocolError(f"a snocat {what} without 'started'")
        record = cls(
            node=_text(fields, "node", what),
            advertise=_text(fields, "advertise", what),
            tcp=_text(fields, "tcp", what),
            group=_text(fields, "group", what),
            started=float(started),
        )
        try:
            parse_host_port(record.advertise)
        except ValueError as exc:
            raise LocalProtocolError(f"node {record.node!r}: advertise {exc}") from None
        return record


@dataclass(frozen=True, slots=True)
class Stored:
    """A claim's stored value, ``FENCE|JSON``: what renewals compare."""

    fence: int
    body: bytes

    @property
    def value(self) -> bytes:
        return str(self.fence).encode("ascii") + b"|" + self.body

    @classmethod
    def parse(cls, value: bytes) -> Stored:
        fence_text, sep, body = value.partition(b"|")
        if not sep or not fence_text.isdigit() or int(fence_text) <= 0:
            raise LocalProtocolError(f"not a snocat claim: {value[:64]!r}")
        return cls(int(fence_text), body)


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetEvent:
    """One entry of the event stream: what changed, where, by whom."""

    id: str
    kind: EventKind
    node: str
    #: The fencing token of the claim (names and ports), else 0.
    fence: int = 0
    record: NameClaim | PortClaim | NodeRecord | None = None

    @classmethod
    def decode(cls, entry_id: str, fields: Mapping[bytes, bytes]) -> FleetEvent | None:
        """A stream entry, or None for one this version does not read (skipped)."""
        try:
            kind = EventKind(fields.get(b"kind", b"").decode("ascii", "replace"))
            node = fields.get(b"node", b"").decode("utf-8")
            body = fields.get(b"body", b"")
            fence = 0
            record: NameClaim | PortClaim | NodeRecord | None = None
            if kind in (EventKind.NODE_JOINED, EventKind.NODE_LEFT):
                record = NodeRecord.decode(body) if body else None
            else:
                stored = Stored.parse(body)
                fence = stored.fence
                if kind in (EventKind.PORT_CLAIMED, EventKind.PORT_RELEASED):
                    record = PortClaim.decode(stored.body)
                else:
                    record = NameClaim.decode(stored.body)
        except (ValueError, LocalProtocolError):
            return None
        return cls(id=entry_id, kind=kind, node=node, fence=fence, record=record)


# The atomic operations -------------------------------------------------------------
#
# KEYS[1] is the key claimed, KEYS[2] the fence counter, KEYS[3] the event stream;
# every script that changes something appends its event (kind, node, body).

#: Claim a port: ARGV = body, lease ms, name, target, node, events kept, event kind,
#: "1" if a holder of the same name and target may be taken over (not for a pool's
#: members, which share their name).  Returns ``{1, fence}`` if it is ours now (free,
#: or so held: a tunnel that came back through another node takes its port over),
#: else ``{0, holder's value}``.
CLAIM_PORT: Final = """
local current = redis.call('GET', KEYS[1])
if current then
  local sep = string.find(current, '|', 1, true)
  local ok, holder = pcall(cjson.decode, string.sub(current, (sep or 0) + 1))
  if ARGV[8] ~= '1' or not ok or holder['name'] ~= ARGV[3] or holder['target'] ~= ARGV[4] then
    return {0, current}
  end
end
local fence = redis.call('INCR', KEYS[2])
local value = fence .. '|' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*',
  'kind', ARGV[7], 'node', ARGV[5], 'body', value)
return {1, fence}
"""

#: Take a name (the newest tunnel wins): ARGV = body, lease ms, node, events kept,
#: event kind.  Returns ``{fence, previous value or false}``.
CLAIM_NAME: Final = """
local previous = redis.call('GET', KEYS[1])
local fence = redis.call('INCR', KEYS[2])
local value = fence .. '|' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*',
  'kind', ARGV[5], 'node', ARGV[3], 'body', value)
return {fence, previous}
"""

#: Change a claim's record, keeping its fence and lease, if it is still ours (or
#: gone: the store restarted, and it is set again as a renewal would):
#: KEYS[1], KEYS[2] the fence counter, KEYS[3] the event stream; ARGV = our value,
#: the new value, node, events kept, event kind, lease ms, our fence.  Returns 1 if
#: changed, 0 if another claim holds the key.
UPDATE: Final = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  return 0
end
if current then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[6])
  if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[7]) then
    redis.call('SET', KEYS[2], ARGV[7])
  end
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*',
  'kind', ARGV[5], 'node', ARGV[3], 'body', ARGV[2])
return 1
"""

#: Renew claims: KEYS[1] the fence counter, then the claimed keys; ARGV = lease ms,
#: then for each key its value, then the highest fence among them.  A key holding
#: that value is extended; a key gone (the store restarted, or the node was away past
#: its lease and nobody took it) is set again, and the counter moved past our fence;
#: a key holding another value was taken.  Returns the indexes (1-based) of the keys
#: taken: the node has lost them.
RENEW: Final = """
local lost = {}
local restored = false
for i = 2, #KEYS do
  local mine = ARGV[i]
  local current = redis.call('GET', KEYS[i])
  if current == mine then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  elseif not current then
    redis.call('SET', KEYS[i], mine, 'PX', ARGV[1])
    restored = true
  else
    table.insert(lost, i - 1)
  end
end
if restored and tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[#KEYS + 1]) then
  redis.call('SET', KEYS[1], ARGV[#KEYS + 1])
end
return lost
"""

#: Release a claim if it is still ours: KEYS[1], KEYS[2] the event stream; ARGV = our
#: value, node, events kept, event kind.  Returns 1 if released, 0 if not ours.
RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
    'kind', ARGV[4], 'node', ARGV[2], 'body', ARGV[1])
  return 1
end
return 0
"""

#: Say once that a node whose key lapsed has left: KEYS = its node key, its "gone"
#: marker, the event stream; ARGV = the node, its record, lease ms, events kept, event
#: kind.  Every node that notices runs it; only the first appends the event.
NODE_LEFT: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then
  return 0
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*',
  'kind', ARGV[5], 'node', ARGV[1], 'body', ARGV[2])
return 1
"""


# A node's view of the fleet ---------------------------------------------------------


@dataclass(slots=True)
class ViewChange:
    """What a node must do after the view changed."""

    #: Ports held by another node that this one should now listen on (and relay).
    listen: set[int] = field(default_factory=set)
    #: Ports it listened on for another node that it should stop listening on.
    unlisten: set[int] = field(default_factory=set)
    #: Keys of claims this node held that another node has since taken.
    lost: list[str] = field(default_factory=list)
    #: Nodes that joined, and nodes whose records lapsed (with their records).
    joined: list[NodeRecord] = field(default_factory=list)
    left: list[NodeRecord] = field(default_factory=list)


class FleetView:
    """One node's view of the fleet (from the events, and rebuilt from the keys):
    which nodes exist, which node holds each port and name, which claims are this
    node's own (with their fences), and so what it should listen on and relay.

    A view follows the ports of one ``protocol``: a node has one for TCP (which also
    follows the names) and one for UDP."""

    def __init__(self, me: NodeRecord, keys: FleetKeys, protocol: str = "tcp") -> None:
        self.me = me
        self.keys = keys
        self.protocol = protocol
        self.nodes: dict[str, NodeRecord] = {me.node: me}
        #: port -> (fence, claim)
        self.ports: dict[int, tuple[int, PortClaim]] = {}
        #: slot (the name; a pool member's name@tunnel) -> (fence, record)
        self.tunnels: dict[str, tuple[int, NameClaim]] = {}
        #: Keys of this node's own claims -> their fence.
        self.held: dict[str, int] = {}
        #: The ports this node listens on for other nodes.
        self.listening: set[int] = set()

    # This node's claims ------------------------------------------------------------

    def hold(self, key: str, fence: int) -> None:
        self.held[key] = fence

    def drop(self, key: str) -> None:
        self.held.pop(key, None)

    def claimed_port(self, fence: int, claim: PortClaim) -> ViewChange:
        """This node claimed ``claim.port``: it listens on it as the holder now."""
        self.hold(self.keys.port(claim.port, self.protocol), fence)
        self.ports[claim.port] = (fence, claim)
        return self._relisten()

    # Changes ----------------------------------------------------------------------

    def apply(self, event: FleetEvent) -> ViewChange:
        """Take one event of the stream into the view."""
        record = event.record
        if isinstance(record, NodeRecord):
            if event.kind is EventKind.NODE_JOINED:
                known = record.node in self.nodes
                self.nodes[record.node] = record if record.node != self.me.node else self.me
                change = self._relisten()
                if not known:
                    change.joined.append(record)
                return change
            gone = self.nodes.pop(record.node, None) if record.node != self.me.node else None
            change = self._relisten()
            if gone is not None:
                change.left.append(gone)
            return change
        change = ViewChange()
        if isinstance(record, PortClaim):
            if record.protocol != self.protocol:
                return change
            key = self.keys.port(record.port, self.protocol)
            if event.kind is EventKind.PORT_CLAIMED:
                self._newer(key, event.fence, record.node, change)
                held_port = self.ports.get(record.port)
                if held_port is None or held_port[0] <= event.fence:
                    self.ports[record.port] = (event.fence, record)
            elif self.ports.get(record.port, (0,))[0] == event.fence:
                del self.ports[record.port]
        elif isinstance(record, NameClaim) and self.protocol == "tcp":
            slot = record.slot
            if event.kind is EventKind.TUNNEL_DEREGISTERED:
                if self.tunnels.get(slot, (0,))[0] == event.fence:
                    del self.tunnels[slot]
            else:
                if not record.pool:  # a pool's members never take the name over
                    self._newer(self.keys.name(record.name), event.fence, record.node, change)
                held_name = self.tunnels.get(slot)
                if held_name is None or held_name[0] <= event.fence:
                    self.tunnels[slot] = (event.fence, record)
        relisten = self._relisten()
        change.listen, change.unlisten = relisten.listen, relisten.unlisten
        return change

    def rebuild(
        self,
        nodes: Iterable[NodeRecord],
        ports: Mapping[int, Stored],
        tunnels: Mapping[str, Stored],
        *,
        keep_missing: bool = False,
    ) -> ViewChange:
        """Replace the view with what the keys hold now (at start, after a store
        disconnect, and periodically: a dead node's claims lapse without an event).

        ``keep_missing``: the store lost its keys (it restarted empty), so what it lacks
        may be a live node's that has not set it again yet (within a renewal): keep
        what the view knows of it (nodes, ports, tunnels) instead of forgetting it;
        the store's own records still win.  A later rebuild without it drops whatever
        nobody set again."""
        old_nodes = self.nodes
        old_ports, old_tunnels = self.ports, self.tunnels
        self.nodes = {record.node: record for record in nodes if record.node != self.me.node}
        if keep_missing:
            self.nodes = old_nodes | self.nodes
        self.nodes[self.me.node] = self.me
        change = ViewChange(
            joined=[r for n, r in self.nodes.items() if n not in old_nodes],
            left=[r for n, r in old_nodes.items() if n not in self.nodes],
        )
        self.ports = dict(old_ports) if keep_missing else {}
        for port, stored in ports.items():
            try:
                claim = PortClaim.decode(stored.body)
            except LocalProtocolError:
                continue
            if claim.port == port and claim.protocol == self.protocol:
                self.ports[port] = (stored.fence, claim)
                self._newer(self.keys.port(port, self.protocol), stored.fence, claim.node, change)
        self.tunnels = dict(old_tunnels) if keep_missing else {}
        for slot, stored in tunnels.items() if self.protocol == "tcp" else ():
            try:
                record = NameClaim.decode(stored.body)
            except LocalProtocolError:
                continue
            if record.slot == slot:
                self.tunnels[slot] = (stored.fence, record)
                if not record.pool:
                    self._newer(self.keys.name(record.name), stored.fence, record.node, change)
        relisten = self._relisten()
        change.listen, change.unlisten = relisten.listen, relisten.unlisten
        return change

    def _newer(self, key: str, fence: int, node: str, change: ViewChange) -> None:
        mine = self.held.get(key)
        if mine is not None and node != self.me.node and fence > mine:
            del self.held[key]
            change.lost.append(key)

    # Decisions --------------------------------------------------------------------

    def should_listen(self, port: int) -> bool:
        """Whether this node listens on ``port`` for the node that holds it: yes,
        unless the holder is this node, unknown, or shares this node's address
        (workers of one server: only the holder listens there)."""
        held = self.ports.get(port)
        if held is None:
            return False
        holder = self.nodes.get(held[1].node)
        if holder is None or holder.node == self.me.node:
            return False
        return not (self.me.group and holder.group == self.me.group)

    def relay_to(self, port: int) -> tuple[NodeRecord, int] | None:
        """The node to relay a visitor on ``port`` to, and the claim's fence."""
        held = self.ports.get(port)
        if held is None:
            return None
        holder = self.nodes.get(held[1].node)
        if holder is None or holder.node == self.me.node:
            return None
        return holder, held[0]

    def is_sibling(self, node: str) -> bool:
        """Whether ``node`` is a worker of the same server as this one."""
        record = self.nodes.get(node)
        return bool(self.me.group) and record is not None and record.group == self.me.group

    def port_candidates(
        self,
        name: str,
        target: str,
        sticky: int | None,
        port_range: Iterable[int],
        refused: set[int],
    ) -> list[int]:
        """The ports to try for ``name``'s ``target``, best first: the one it had
        (sticky), those the fleet shows it holding, then the free ones in range."""
        in_range = set(port_range)
        first = [sticky] if sticky is not None else []
        first += [p for p, (_, c) in self.ports.items() if c.name == name and c.target == target]
        seen: set[int] = set()
        candidates = []
        for port in first + [p for p in sorted(in_range) if p not in self.ports]:
            if port not in seen and port not in refused and port in in_range:
                seen.add(port)
                candidates.append(port)
        return candidates

    def publishers(self, name: str, service: str) -> list[NodeRecord]:
        """The other nodes with a tunnel of ``name`` that publishes ``service`` by
        name, oldest tunnel first (host names match without regard to case)."""
        found = sorted(
            (
                r
                for _, r in self.tunnels.values()
                if host_label(r.name) == name and service in r.services
            ),
            key=lambda r: r.since,
        )
        nodes = [self.nodes.get(r.node) for r in found if r.node != self.me.node]
        return list({n.node: n for n in nodes if n is not None}.values())

    def has_name(self, name: str) -> bool:
        """Whether a tunnel of ``name`` is registered anywhere in the fleet."""
        return any(host_label(r.name) == name for _, r in self.tunnels.values())

    def holder_of(self, port: int) -> PortClaim | None:
        held = self.ports.get(port)
        return None if held is None else held[1]

    def _relisten(self) -> ViewChange:
        wanted = {port for port in self.ports if self.should_listen(port)}
        change = ViewChange(listen=wanted - self.listening, unlisten=self.listening - wanted)
        self.listening = wanted
        return change
