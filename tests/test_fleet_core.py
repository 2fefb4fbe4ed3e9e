"""The fleet's rules in the core (snocat_proto/_service/fleet.py): the records and
their codecs, what a node makes of each change (FleetView), and the atomic scripts,
run on a real valkey-server through the binding's FleetStore."""

from __future__ import annotations

import dataclasses

import anyio
import pytest
from store_harness import Store, store_fixture  # noqa: F401 (fixtures)

from snocat_anyio._fleet import FleetStore
from snocat_proto import FleetConfig
from snocat_proto._service.fleet import (
    EventKind,
    FleetEvent,
    FleetKeys,
    FleetView,
    NameClaim,
    NodeRecord,
    PortClaim,
    Stored,
)
from snocat_proto._wire.errors import LocalProtocolError

KEYS = FleetKeys()


def node(name: str, group: str = "") -> NodeRecord:
    return NodeRecord(
        node=name, advertise="127.0.0.1:9090", tcp="127.0.0.1", group=group, started=1.0
    )


def port_claim(
    port: int, holder: str, name: str = "office", target: str = "127.0.0.1:80"
) -> PortClaim:
    return PortClaim(port=port, node=holder, tunnel_id=f"t-{holder}", name=name, target=target)


def event(kind: EventKind, fence: int, record: object, who: str = "b") -> FleetEvent:
    return FleetEvent(id="1-0", kind=kind, node=who, fence=fence, record=record)  # type: ignore[arg-type]


# Records ---------------------------------------------------------------------------


def test_records_round_trip_and_refuse_what_snocat_did_not_write() -> None:
    claim = NameClaim(
        name="office", node="a", tunnel_id="t1", scheme="token", since=5.0, ports=(8080,)
    )
    assert NameClaim.decode(claim.encode()) == claim
    assert PortClaim.decode(port_claim(8080, "a").encode()) == port_claim(8080, "a")
    assert NodeRecord.decode(node("a").encode()) == node("a")
    stored = Stored(7, claim.encode())
    assert Stored.parse(stored.value) == stored
    for bad in (b"", b"7", b"x|{}", b"0|{}", b"-1|{}"):
        with pytest.raises(LocalProtocolError):
            Stored.parse(bad)
    for bad in (b"{}", b"[]", b"not json", b'{"port": 0}', b'{"port": true}'):
        with pytest.raises(LocalProtocolError):
            PortClaim.decode(bad)
    with pytest.raises(LocalProtocolError, match="advertise"):
        NodeRecord.decode(node("a").encode().replace(b"127.0.0.1:9090", b"nowhere"))


def test_an_event_this_version_cannot_read_is_skipped() -> None:
    assert FleetEvent.decode("1-0", {b"kind": b"from_the_future"}) is None
    assert FleetEvent.decode("1-0", {b"kind": b"port_claimed", b"body": b"garbage"}) is None
    good = Stored(3, port_claim(8080, "b").encode()).value
    decoded = FleetEvent.decode("1-0", {b"kind": b"port_claimed", b"node": b"b", b"body": good})
    assert decoded is not None and decoded.fence == 3 and decoded.record == port_claim(8080, "b")


# The view --------------------------------------------------------------------------


def test_a_node_listens_for_the_ports_others_hold_and_stops_when_it_holds_them() -> None:
    view = FleetView(node("a"), KEYS)
    view.rebuild([node("b")], {}, {})
    change = view.apply(event(EventKind.PORT_CLAIMED, 5, port_claim(8080, "b")))
    assert change.listen == {8080} and not change.unlisten
    assert view.relay_to(8080) == (node("b"), 5)
    # The tunnel came back through this node: it claims the port, stops relaying it.
    change = view.claimed_port(9, port_claim(8080, "a"))
    assert change.unlisten == {8080} and not change.listen
    assert view.relay_to(8080) is None
    # An older event about the port changes nothing.
    change = view.apply(event(EventKind.PORT_CLAIMED, 5, port_claim(8080, "b")))
    assert view.holder_of(8080) == port_claim(8080, "a") and not change.listen


def test_a_newer_claim_by_another_node_is_a_loss_an_older_one_is_not() -> None:
    view = FleetView(node("a"), KEYS)
    view.hold(KEYS.name("office"), 10)
    record = NameClaim(name="office", node="b", tunnel_id="t2", scheme="token", since=1.0)
    assert view.apply(event(EventKind.TUNNEL_REGISTERED, 9, record)).lost == []
    assert view.apply(event(EventKind.TUNNEL_REGISTERED, 11, record)).lost == [KEYS.name("office")]
    # Our own claims are never a loss.
    view.hold(KEYS.port(8080), 12)
    assert view.apply(event(EventKind.PORT_CLAIMED, 13, port_claim(8080, "a"), who="a")).lost == []


def test_workers_of_one_server_do_not_listen_for_each_other() -> None:
    view = FleetView(node("a-w1", group="box"), KEYS)
    view.rebuild([node("a-w2", group="box"), node("c")], {}, {})
    view.apply(event(EventKind.PORT_CLAIMED, 1, port_claim(8080, "a-w2")))
    change = view.apply(event(EventKind.PORT_CLAIMED, 2, port_claim(8081, "c")))
    assert view.listening == {8081} and change.listen == {8081}
    assert view.is_sibling("a-w2") and not view.is_sibling("c")


def test_a_rebuild_reports_nodes_that_left_and_forgets_their_ports() -> None:
    view = FleetView(node("a"), KEYS)
    port = Stored(4, port_claim(8080, "b").encode())
    first = view.rebuild([node("b")], {8080: port}, {})
    assert [r.node for r in first.joined] == ["b"] and first.listen == {8080}
    second = view.rebuild([], {}, {})
    assert [r.node for r in second.left] == ["b"] and second.unlisten == {8080}


def test_a_rebuild_from_an_emptied_store_keeps_what_it_lacks_until_the_next() -> None:
    # The store restarted empty: b is alive and sets its claim again within a renewal.
    # Meanwhile a keeps relaying b's port and does not offer it to a new tunnel.
    view = FleetView(node("a"), KEYS)
    view.rebuild([node("b")], {8080: Stored(4, port_claim(8080, "b").encode())}, {})
    kept = view.rebuild([], {}, {}, keep_missing=True)
    assert kept.left == [] and kept.unlisten == set() and view.listening == {8080}
    assert 8080 not in view.port_candidates("office", "t", None, range(8080, 8082), set())
    # What the store holds still wins: c's claim of 8081 comes in beside b's kept one.
    view.rebuild(
        [node("c")], {8081: Stored(1, port_claim(8081, "c").encode())}, {}, keep_missing=True
    )
    assert view.listening == {8080, 8081}
    # One lease later, b never came back (it died with the store): forgotten.
    later = view.rebuild([node("c")], {8081: Stored(1, port_claim(8081, "c").encode())}, {})
    assert [r.node for r in later.left] == ["b"] and later.unlisten == {8080}


def test_port_candidates_put_the_sticky_and_held_ports_first() -> None:
    view = FleetView(node("a"), KEYS)
    view.rebuild([node("b")], {8081: Stored(1, port_claim(8081, "b", name="other").encode())}, {})
    ports = range(8080, 8085)
    assert view.port_candidates("office", "t", 8083, ports, set()) == [8083, 8080, 8082, 8084]
    assert view.port_candidates("office", "t", 9999, ports, {8080}) == [8082, 8083, 8084]


# The scripts, on a real store ------------------------------------------------------


def fleet_config(store: Store, name: str) -> FleetConfig:
    return FleetConfig(
        registry_url=store.url, node=name, advertise=("127.0.0.1", 9), secret=b"0123456789abcdef"
    )


@pytest.mark.anyio
async def test_two_nodes_racing_for_a_port_exactly_one_wins(store: Store) -> None:
    stores = [FleetStore(fleet_config(store, f"n{i}"), lambda *_: None) for i in range(2)]
    async with anyio.create_task_group() as tg:
        for fleet_store in stores:
            fleet_store.prepare()
            await tg.start(fleet_store.run)
        for round_ in range(50):
            port = 20000 + round_
            results: list[Stored | None] = []

            async def claim(
                index: int, port: int = port, results: list[Stored | None] = results
            ) -> None:
                won, _ = await stores[index].claim_port(
                    port_claim(port, f"n{index}", name=f"name-{index}")
                )
                results.append(won)

            async with anyio.create_task_group() as race:
                race.start_soon(claim, 0)
                race.start_soon(claim, 1)
            assert sum(result is not None for result in results) == 1, round_
        # The same name and target takes its port over (the tunnel came back elsewhere).
        won, holder = await stores[1].claim_port(port_claim(20000, "n1", name="stranger"))
        assert won is None and holder is not None
        won, _ = await stores[1].claim_port(port_claim(20000, "n1", name=holder.name))
        assert won is not None
        # Not so for a pool's members, which share a name.
        won, _ = await stores[0].claim_port(
            port_claim(20000, "n0", name=holder.name), take_over=False
        )
        assert won is None
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_renewal_sets_lost_keys_again_and_moves_the_fence_past_them(store: Store) -> None:
    fleet_store = FleetStore(fleet_config(store, "n0"), lambda *_: None)
    fleet_store.prepare()
    async with anyio.create_task_group() as tg:
        await tg.start(fleet_store.run)
        record = NameClaim(name="office", node="n0", tunnel_id="t", scheme="token", since=1.0)
        for index in range(5):
            await fleet_store.claim_name(dataclasses.replace(record, name=f"x{index}"))
        held, _ = await fleet_store.claim_name(record)
        assert held.fence == 6
        tg.cancel_scope.cancel()
    store.restart()  # empty
    fleet_store = FleetStore(fleet_config(store, "n0"), lambda *_: None)
    fleet_store.prepare()
    async with anyio.create_task_group() as tg:
        await tg.start(fleet_store.run)
        assert await fleet_store.wait_healthy(10)
        assert await fleet_store.renew([(KEYS.name("office"), held)]) == []
        assert store.get(KEYS.name("office")) == held.value.decode()
        # Every later claim gets a fence above the restored one.
        newer, previous = await fleet_store.claim_name(dataclasses.replace(record, node="n1"))
        assert previous == record and newer.fence == held.fence + 1
        # Now the key is another's: the old holder's renewal reports it lost.
        assert await fleet_store.renew([(KEYS.name("office"), held)]) == [0]
        # An update of a claim that is not ours any more changes nothing.
        changed = Stored(held.fence, dataclasses.replace(record, ports=(1,)).encode())
        assert not await fleet_store.update(
            KEYS.name("office"), held, changed, EventKind.TUNNEL_UPDATED
        )
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_the_store_gone_is_store_unavailable_not_a_crash(store: Store) -> None:
    from snocat_anyio._fleet import StoreUnavailable

    changes: list[bool] = []
    fleet_store = FleetStore(fleet_config(store, "n0"), lambda healthy, _: changes.append(healthy))
    fleet_store.prepare()
    async with anyio.create_task_group() as tg:
        await tg.start(fleet_store.run)
        assert await fleet_store.wait_healthy(10)
        store.kill()
        with pytest.raises(StoreUnavailable):
            await fleet_store.sticky("office", "t")
        with pytest.raises(StoreUnavailable):  # at once, without waiting for a timeout
            await fleet_store.sticky("office", "t")
        store.start()
        assert await fleet_store.wait_healthy(20)
        assert await fleet_store.sticky("office", "t") is None
        tg.cancel_scope.cancel()
    assert changes == [True, False, True]


def test_tcp_and_udp_ports_are_separate_ranges() -> None:
    tcp, udp = FleetView(node("a"), KEYS), FleetView(node("a"), KEYS, protocol="udp")
    udp_claim = dataclasses.replace(port_claim(8080, "b"), protocol="udp")
    assert PortClaim.decode(udp_claim.encode()) == udp_claim
    assert KEYS.port(8080) != KEYS.port(8080, "udp")
    for view in (tcp, udp):
        view.rebuild([node("b")], {}, {})
        view.apply(event(EventKind.PORT_CLAIMED, 3, udp_claim))
    assert udp.listening == {8080} and tcp.listening == set()
    assert udp.holder_of(8080) == udp_claim and tcp.holder_of(8080) is None
