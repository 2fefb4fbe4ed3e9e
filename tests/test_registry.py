"""The tunnel registry: records, routing, and loss-free event delivery."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import random
from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from snocat_proto._service.registry import (
    SCHEME_SIMPLE_ACK,
    SCHEME_TOKEN,
    RegistryEvent,
    RegistrySubscription,
    TunnelDeregistered,
    TunnelRecord,
    TunnelRegistered,
    TunnelRegistry,
    TunnelUpdated,
)
from snocat_proto._wire.errors import LocalProtocolError


def make(
    tunnel_id: str,
    name: str = "alice",
    *,
    ports: tuple[int, ...] = (),
    at: float = 0.0,
    peer: str = "127.0.0.1:50000",
    scheme: str = SCHEME_TOKEN,
) -> TunnelRecord:
    return TunnelRecord(
        tunnel_id=tunnel_id, name=name, peer=peer, scheme=scheme, registered_at=at, ports=ports
    )


# -- routing ---------------------------------------------------------------------


def test_register_get_deregister() -> None:
    registry = TunnelRegistry()
    record = make("t1", ports=(8080,))
    registry.register(record)
    assert registry.get("t1") is record
    assert "t1" in registry and len(registry) == 1
    assert list(registry) == [record]
    assert registry.names() == frozenset({"alice"})
    assert registry.by_port(8080) is record
    assert registry.deregister("t1", reason="closed") is record
    assert registry.get("t1") is None
    assert registry.route("alice") is None
    assert registry.by_name("alice") == ()
    assert registry.by_port(8080) is None
    assert registry.names() == frozenset()
    assert len(registry) == 0


def test_duplicate_tunnel_id_is_refused_without_change() -> None:
    registry = TunnelRegistry()
    subscription = registry.subscribe()
    first = make("t1", "alice")
    registry.register(first)
    with pytest.raises(LocalProtocolError, match="already registered"):
        registry.register(make("t1", "bob"))
    assert registry.get("t1") is first
    assert registry.route("bob") is None
    assert subscription.drain() == [TunnelRegistered(record=first)]


def test_deregister_is_idempotent() -> None:
    registry = TunnelRegistry()
    subscription = registry.subscribe()
    assert registry.deregister("nope") is None
    registry.register(make("t1"))
    assert registry.deregister("t1") is not None
    assert registry.deregister("t1") is None
    assert [type(event) for event in subscription.drain()] == [
        TunnelRegistered,
        TunnelDeregistered,
    ]


def test_duplicate_names_route_to_newest() -> None:
    registry = TunnelRegistry()
    old = make("t1", "alice", at=10.0)
    other = make("t2", "bob", at=11.0)
    # A clock that stepped back: registration order, not registered_at, decides.
    new = make("t3", "alice", at=5.0)
    for record in (old, other, new):
        registry.register(record)
    assert registry.route("alice") is new
    assert registry.by_name("alice") == (new, old)
    assert registry.route("bob") is other
    assert registry.route("carol") is None
    # The reconnecting client's old tunnel goes away: the new one stays the route.
    registry.deregister("t1")
    assert registry.by_name("alice") == (new,)
    registry.register(make("t4", "alice"))
    registry.deregister("t4")
    assert registry.route("alice") is new
    # Removing the newest falls back to the next newest.
    newest = make("t5", "alice")
    registry.register(newest)
    registry.register(make("t6", "alice"))
    registry.deregister("t6")
    assert registry.route("alice") is newest
    assert [record.tunnel_id for record in registry] == ["t2", "t3", "t5"]


def test_update_keeps_order_and_publishes() -> None:
    registry = TunnelRegistry()
    first = make("t1", "alice")
    second = make("t2", "alice")
    registry.register(first)
    registry.register(second)
    subscription = registry.subscribe()
    changed = first.with_ports((8080, 8081))
    assert registry.update(changed) is first
    assert registry.get("t1") is changed
    assert registry.route("alice") is second  # update does not make it newest
    assert registry.by_port(8081) is changed
    assert registry.update(changed) is changed  # unchanged: no event
    moved = changed.with_ports((8082,))
    registry.update(moved)
    assert registry.by_port(8080) is None and registry.by_port(8082) is moved
    migrated = dataclasses.replace(moved, peer="10.0.0.1:1")  # QUIC migration
    registry.update(migrated)
    assert subscription.drain() == [
        TunnelUpdated(record=changed, previous=first),
        TunnelUpdated(record=moved, previous=changed),
        TunnelUpdated(record=migrated, previous=moved),
    ]


def test_update_refusals() -> None:
    registry = TunnelRegistry()
    registry.register(make("t1", "alice", ports=(1,)))
    registry.register(make("t2", "bob"))
    subscription = registry.subscribe()
    with pytest.raises(LocalProtocolError, match="not registered"):
        registry.update(make("t9"))
    with pytest.raises(LocalProtocolError, match="name or scheme"):
        registry.update(make("t1", "mallory"))
    with pytest.raises(LocalProtocolError, match="name or scheme"):
        registry.update(make("t1", "alice", scheme=SCHEME_SIMPLE_ACK))
    with pytest.raises(LocalProtocolError, match="already belongs"):
        registry.update(make("t2", "bob", ports=(1,)))
    with pytest.raises(LocalProtocolError, match="already belongs"):
        registry.register(make("t3", "carol", ports=(2, 1)))
    with pytest.raises(LocalProtocolError):
        registry.register({"tunnel_id": "x"})  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        registry.update("t1")  # type: ignore[arg-type]
    assert subscription.pending == 0
    assert registry.get("t3") is None
    assert registry.by_port(1) == registry.get("t1")
    assert registry.by_port(2) is None


def test_simple_ack_tunnel_is_named_by_peer() -> None:
    registry = TunnelRegistry()
    peer = "127.0.0.1:51234"
    record = make("t1", peer, peer=peer, scheme=SCHEME_SIMPLE_ACK)
    registry.register(record)
    assert registry.route(peer) is record


# -- subscriptions ---------------------------------------------------------------


def test_subscriber_sees_only_later_events() -> None:
    registry = TunnelRegistry()
    registry.register(make("t1"))
    early = registry.subscribe()
    registry.register(make("t2"))
    late = registry.subscribe()
    registry.deregister("t1", reason="gone")
    assert [type(e) for e in early.drain()] == [TunnelRegistered, TunnelDeregistered]
    (only,) = late.drain()
    assert isinstance(only, TunnelDeregistered)
    assert only.record.tunnel_id == "t1" and only.reason == "gone"
    assert late.next_event() is None


def test_replay_subscription_starts_with_a_snapshot() -> None:
    registry = TunnelRegistry()
    records = [make(f"t{i}", f"n{i % 2}") for i in range(4)]
    for record in records:
        registry.register(record)
    registry.deregister("t1")
    subscription = registry.subscribe(replay=True)
    registry.register(make("t9"))
    events = subscription.drain()
    assert [e.record.tunnel_id for e in events] == ["t0", "t2", "t3", "t9"]
    assert all(isinstance(e, TunnelRegistered) for e in events)


def test_close_stops_delivery_and_frees_queue() -> None:
    registry = TunnelRegistry()
    subscription = registry.subscribe()
    other = registry.subscribe()
    registry.register(make("t1"))
    assert subscription.pending == 1
    subscription.close()
    assert subscription.closed
    assert subscription.pending == 0
    assert subscription.next_event() is None
    registry.register(make("t2"))
    assert subscription.next_event() is None
    subscription.close()  # idempotent
    assert registry.subscriber_count == 1
    assert other.pending == 2
    with registry.subscribe() as scoped:
        registry.deregister("t1")
        assert scoped.pending == 1
    assert scoped.closed
    assert registry.subscriber_count == 1


def test_dropped_subscription_is_forgotten() -> None:
    registry = TunnelRegistry()
    subscription = registry.subscribe()
    assert registry.subscriber_count == 1
    del subscription
    gc.collect()
    assert registry.subscriber_count == 0
    registry.register(make("t1"))  # nobody to deliver to; nothing retained


def test_slow_subscriber_loses_nothing() -> None:
    registry = TunnelRegistry(limit=20_000)
    slow = registry.subscribe()
    fast = registry.subscribe()
    seen: list[RegistryEvent] = []
    for index in range(10_000):
        registry.register(make(f"t{index}", f"n{index % 7}"))
        if index % 3 == 0:
            registry.deregister(f"t{index}", reason=str(index))
        seen.extend(fast.drain())
    assert slow.pending == len(seen) == 10_000 + 3334
    assert slow.drain() == seen
    assert not slow.overflowed and registry.laggards == 0


def test_a_laggard_is_closed_with_what_it_had_and_counted() -> None:
    """Past its backlog limit a subscriber is closed, not left to grow: it reads what
    it had queued, learns that it lost the rest, and the others carry on."""
    registry = TunnelRegistry(limit=100)
    slow = registry.subscribe()
    fast = registry.subscribe()
    seen: list[RegistryEvent] = []
    for index in range(250):
        registry.register(make(f"t{index}"))
        seen.extend(fast.drain())
    assert len(seen) == 250 and not fast.closed
    assert slow.closed and slow.overflowed
    assert slow.drain() == seen[:100]
    assert registry.laggards == 1
    assert registry.subscriber_count == 1
    for index in range(240):
        registry.deregister(f"t{index}")
    again = registry.subscribe(replay=True)  # a laggard catches up by replaying
    assert [e.record.tunnel_id for e in again.drain()] == [f"t{i}" for i in range(240, 250)]
    assert not again.overflowed


def test_a_replay_larger_than_the_limit_overflows_at_once() -> None:
    registry = TunnelRegistry(limit=3)
    for index in range(5):
        registry.register(make(f"t{index}"))
    subscription = registry.subscribe(replay=True)
    assert subscription.overflowed and subscription.pending == 3
    assert registry.subscriber_count == 0


def test_events_validate() -> None:
    with pytest.raises(LocalProtocolError):
        TunnelRegistered(record="nope")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        TunnelUpdated(record=make("a"), previous=make("b"))
    event = TunnelDeregistered(record=make("a"))
    assert event.reason == ""
    with pytest.raises(AttributeError):
        event.reason = "x"  # type: ignore[misc]


class RegistryModel(RuleBasedStateMachine):
    """The registry against a list-based model, with several interleaved subscribers."""

    NAMES = ("alice", "bob", "carol")

    @initialize()
    def setup(self) -> None:
        self.registry = TunnelRegistry()
        self.order: list[str] = []  # tunnel ids, registration order
        self.records: dict[str, TunnelRecord] = {}
        self.subscriptions: list[tuple[RegistrySubscription, deque[RegistryEvent]]] = []
        self.closed: list[RegistrySubscription] = []
        self.next_id = 0

    def _publish(self, event: RegistryEvent) -> None:
        for _subscription, expected in self.subscriptions:
            expected.append(event)

    def _held_ports(self, except_id: str | None = None) -> set[int]:
        return {
            port
            for tunnel_id, record in self.records.items()
            if tunnel_id != except_id
            for port in record.ports
        }

    @rule(name=st.sampled_from(NAMES), ports=st.sets(st.integers(1, 6), max_size=2))
    def register(self, name: str, ports: set[int]) -> None:
        tunnel_id = f"t{self.next_id}"
        self.next_id += 1
        record = make(tunnel_id, name, ports=tuple(sorted(ports)), at=float(self.next_id))
        if ports & self._held_ports():
            with pytest.raises(LocalProtocolError):
                self.registry.register(record)
            return
        self.registry.register(record)
        self.order.append(tunnel_id)
        self.records[tunnel_id] = record
        self._publish(TunnelRegistered(record=record))

    @precondition(lambda self: self.records)
    @rule(data=st.data())
    def register_duplicate_id(self, data: st.DataObject) -> None:
        tunnel_id = data.draw(st.sampled_from(self.order))
        with pytest.raises(LocalProtocolError):
            self.registry.register(make(tunnel_id, "bob"))

    @rule(data=st.data(), reason=st.sampled_from(["", "closed", "timeout"]))
    def deregister(self, data: st.DataObject, reason: str) -> None:
        tunnel_id = data.draw(st.sampled_from([*self.order, "unknown"]))
        result = self.registry.deregister(tunnel_id, reason=reason)
        if tunnel_id not in self.records:
            assert result is None
            return
        record = self.records.pop(tunnel_id)
        self.order.remove(tunnel_id)
        assert result == record
        self._publish(TunnelDeregistered(record=record, reason=reason))

    @precondition(lambda self: self.records)
    @rule(data=st.data(), ports=st.sets(st.integers(1, 6), max_size=2))
    def update_ports(self, data: st.DataObject, ports: set[int]) -> None:
        tunnel_id = data.draw(st.sampled_from(self.order))
        previous = self.records[tunnel_id]
        record = previous.with_ports(tuple(sorted(ports)))
        if ports & self._held_ports(except_id=tunnel_id):
            with pytest.raises(LocalProtocolError):
                self.registry.update(record)
            return
        assert self.registry.update(record) == previous
        self.records[tunnel_id] = record
        if record != previous:
            self._publish(TunnelUpdated(record=record, previous=previous))

    @rule(replay=st.booleans())
    def subscribe(self, replay: bool) -> None:
        subscription = self.registry.subscribe(replay=replay)
        expected: deque[RegistryEvent] = deque()
        if replay:
            expected.extend(TunnelRegistered(record=self.records[i]) for i in self.order)
        self.subscriptions.append((subscription, expected))

    @precondition(lambda self: self.subscriptions)
    @rule(data=st.data(), count=st.integers(0, 5))
    def read(self, data: st.DataObject, count: int) -> None:
        index = data.draw(st.integers(0, len(self.subscriptions) - 1))
        subscription, expected = self.subscriptions[index]
        for _ in range(count):
            want = expected.popleft() if expected else None
            assert subscription.next_event() == want

    @precondition(lambda self: self.subscriptions)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.subscriptions) - 1))
        subscription, _expected = self.subscriptions.pop(index)
        subscription.close()
        self.closed.append(subscription)

    @invariant()
    def agrees(self) -> None:
        registry = self.registry
        assert len(registry) == len(self.records)
        assert [r.tunnel_id for r in registry] == self.order
        for name in self.NAMES:
            newest_first = [self.records[i] for i in reversed(self.order)]
            of_name = tuple(r for r in newest_first if r.name == name)
            assert registry.by_name(name) == of_name
            assert registry.route(name) == (of_name[0] if of_name else None)
        assert registry.names() == {r.name for r in self.records.values()}
        for port in range(1, 7):
            holders = [r for r in self.records.values() if port in r.ports]
            assert registry.by_port(port) == (holders[0] if holders else None)
        for subscription, expected in self.subscriptions:
            assert subscription.pending == len(expected)
        for subscription in self.closed:
            assert subscription.pending == 0 and subscription.next_event() is None
        assert registry.subscriber_count == len(self.subscriptions)

    def teardown(self) -> None:
        # Every subscriber receives the rest of its events, in order.
        for subscription, expected in getattr(self, "subscriptions", []):
            assert subscription.drain() == list(expected)


RegistryModel.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestRegistryModel = RegistryModel.TestCase


def test_randomized_interleaving_many_subscribers() -> None:
    """A long random run: every subscriber gets exactly the events after it subscribed."""
    rng = random.Random(8)
    registry = TunnelRegistry()
    reference = registry.subscribe()  # reads everything at once: defines the log
    log: list[RegistryEvent] = []
    subscribers: list[tuple[RegistrySubscription, int, list[RegistryEvent]]] = []
    live: list[str] = []
    for step in range(5000):
        roll = rng.random()
        if roll < 0.4 or not live:
            tunnel_id = f"t{step}"
            registry.register(make(tunnel_id, rng.choice("abcd")))
            live.append(tunnel_id)
        elif roll < 0.7:
            registry.deregister(live.pop(rng.randrange(len(live))), reason="r")
        elif roll < 0.8:
            record = registry.get(rng.choice(live))
            assert record is not None
            # Port numbers derived from the step are never held by another tunnel.
            registry.update(record.with_ports((step % 65535 + 1,)))
        elif roll < 0.85:
            # `log` is current up to the previous step; catch it up before recording
            # where this subscriber's stream begins.
            log.extend(reference.drain())
            subscribers.append((registry.subscribe(), len(log), []))
        for subscription, _start, received in subscribers:
            for _ in range(rng.randrange(0, 4)):
                event = subscription.next_event()
                if event is not None:
                    received.append(event)
        log.extend(reference.drain())
    assert len(subscribers) > 100
    for subscription, start, received in subscribers:
        received.extend(subscription.drain())
        assert received == log[start:]


# -- records ---------------------------------------------------------------------

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
records = st.builds(
    TunnelRecord,
    tunnel_id=st.text(min_size=1),
    name=st.text(min_size=1),
    peer=st.text(),
    scheme=st.sampled_from([SCHEME_TOKEN, SCHEME_SIMPLE_ACK]) | st.text(min_size=1),
    registered_at=finite_floats,
    ports=st.lists(st.integers(1, 65535), unique=True, max_size=5).map(tuple),
)


@given(records)
def test_record_round_trips(record: TunnelRecord) -> None:
    assert TunnelRecord.from_dict(record.to_dict()) == record
    text = record.to_json()
    assert TunnelRecord.from_json(text) == record
    assert TunnelRecord.from_json(text.encode()) == record
    # to_dict is really JSON-ready.
    assert TunnelRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_record_to_dict_shape() -> None:
    record = make("t1", "alice", ports=(8080, 8081), at=3)
    assert isinstance(record.registered_at, float)
    assert record.to_dict() == {
        "tunnel_id": "t1",
        "name": "alice",
        "peer": "127.0.0.1:50000",
        "scheme": "token",
        "registered_at": 3.0,
        "ports": [8080, 8081],
    }
    assert json.loads(record.to_json())["ports"] == [8080, 8081]


VALID: dict[str, Any] = make("t1", ports=(8080,)).to_dict()


@pytest.mark.parametrize(
    "change",
    [
        {"tunnel_id": ""},
        {"tunnel_id": 5},
        {"name": ""},
        {"name": None},
        {"peer": b"x"},
        {"scheme": ""},
        {"scheme": ["token"]},
        {"registered_at": "1.0"},
        {"registered_at": True},
        {"registered_at": None},
        {"registered_at": math.inf},
        {"registered_at": math.nan},
        {"registered_at": 10**400},
        {"ports": 8080},
        {"ports": "8080"},
        {"ports": [0]},
        {"ports": [65536]},
        {"ports": [True]},
        {"ports": [8080.0]},
        {"ports": [8080, 8080]},
        {"ports": {"8080": 1}},
        {"extra": 1},
    ],
)
def test_from_dict_rejects(change: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        TunnelRecord.from_dict({**VALID, **change})


@pytest.mark.parametrize("key", sorted(VALID))
def test_from_dict_requires_every_key(key: str) -> None:
    data = dict(VALID)
    del data[key]
    with pytest.raises(LocalProtocolError, match="missing"):
        TunnelRecord.from_dict(data)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        "null",
        '"record"',
        "[" * 100_000,
        '{"tunnel_id": "t", "registered_at": NaN}',
        json.dumps({**VALID, "registered_at": "Infinity"}),
        json.dumps(VALID).replace("0.0", "1e999"),
        json.dumps(VALID).replace("0.0", "1" * 5000),
        b"\xff\xfe{",
    ],
)
def test_from_json_rejects(text: str | bytes) -> None:
    with pytest.raises(LocalProtocolError):
        TunnelRecord.from_json(text)


def test_from_json_rejects_non_text() -> None:
    with pytest.raises(LocalProtocolError):
        TunnelRecord.from_json(None)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        TunnelRecord.from_dict([("tunnel_id", "t")])  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
field_values = st.dictionaries(
    st.sampled_from(sorted(VALID)) | st.text(max_size=8), json_values, max_size=8
)


def _valid_or_local_error(data: object) -> None:
    try:
        record = TunnelRecord.from_dict(data)  # type: ignore[arg-type]
    except LocalProtocolError:
        return
    # Anything accepted survives a round trip.
    assert TunnelRecord.from_json(record.to_json()) == record


@given(field_values)
def test_from_dict_arbitrary(data: dict[str, object]) -> None:
    _valid_or_local_error(data)


@given(st.sampled_from(sorted(VALID)), json_values)
def test_from_dict_one_field_changed(key: str, value: object) -> None:
    _valid_or_local_error({**VALID, key: value})


@given(json_values | field_values)
def test_from_json_arbitrary_documents(document: object) -> None:
    try:
        text = json.dumps(document)
    except ValueError:
        return
    try:
        record = TunnelRecord.from_json(text)
    except LocalProtocolError:
        return
    assert TunnelRecord.from_json(record.to_json()) == record


@given(st.text() | st.binary())
def test_from_json_arbitrary_text(text: str | bytes) -> None:
    with contextlib.suppress(LocalProtocolError):
        TunnelRecord.from_json(text)


@settings(max_examples=50)
@given(records, st.integers(0, 200))
def test_from_json_truncated(record: TunnelRecord, cut: int) -> None:
    text = record.to_json()
    try:
        parsed = TunnelRecord.from_json(text[:cut])
    except LocalProtocolError:
        return
    assert parsed == record
