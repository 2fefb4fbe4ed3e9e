"""Path MTU discovery (snocat_proto/_wire/path_mtu.py, driven by the engine).

First the search on its own, on a fake clock: what it probes, when it grows, when it
gives a size up, the raise timer, black holes.  Then two peers on the in-memory
network (tests/netsim.py): datagrams grow to what the path carries and no further,
a lost probe is no congestion signal, a path that starts dropping the size in use is
found out and data keeps flowing, and transfers through a lossy path arrive intact.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netsim import Link, Simulation, Writer, digest, payload, pump_all
from test_tunnel import both_authenticated, open_stream, simple_sim

from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.path_mtu import BASE_DATAGRAM_SIZE, PathMtuSearch, SearchState
from snocat_proto._wire.tunnel import TunnelConnection

LIMITS = Limits()
PMTUD = {"max_datagram_size": 9000, "path_mtu_discovery": True}


# The search alone -------------------------------------------------------------------


def carried(search: PathMtuSearch, mtu: int, now: float = 0.0) -> list[int]:
    """Run the search against a path carrying ``mtu``: every probe is settled at once.
    Returns the sizes probed."""
    probed = []
    for _ in range(200):
        size = search.probe_size(now)
        if size is None:
            break
        probed.append(size)
        search.probe_sent(size, now)
        if size <= mtu:
            search.probe_acked(size, now)
        else:
            search.probe_lost(size, now)
    return probed


def test_nothing_is_probed_before_the_handshake() -> None:
    search = PathMtuSearch(ceiling=9000, limits=LIMITS)
    assert search.state is SearchState.BASE
    assert search.probe_size(0.0) is None
    assert search.size == BASE_DATAGRAM_SIZE


def test_the_ceiling_is_tried_first_and_taken_when_acknowledged() -> None:
    search = PathMtuSearch(ceiling=9000, limits=LIMITS)
    search.start()
    assert carried(search, 65535) == [9000]
    assert search.size == 9000
    assert search.state is SearchState.SEARCH_COMPLETE


def test_one_probe_at_a_time() -> None:
    search = PathMtuSearch(ceiling=9000, limits=LIMITS)
    search.start()
    search.probe_sent(9000, 0.0)
    assert search.probe_size(0.0) is None


def test_binary_search_settles_just_under_the_path_mtu() -> None:
    search = PathMtuSearch(ceiling=9000, limits=LIMITS)
    search.start()
    probed = carried(search, 1500)
    assert probed[:3] == [9000, 9000, 9000]  # MAX_PROBES losses before giving a size up
    assert 1500 - LIMITS.path_mtu_search_resolution <= search.size <= 1500
    assert search.state is SearchState.SEARCH_COMPLETE
    assert max(probed) == 9000 and all(size > BASE_DATAGRAM_SIZE for size in probed)


def test_a_random_loss_does_not_give_a_size_up() -> None:
    search = PathMtuSearch(ceiling=9000, limits=LIMITS)
    search.start()
    search.probe_sent(9000, 0.0)
    search.probe_lost(9000, 0.0)
    assert search.probe_size(0.0) == 9000  # once lost, tried again
    search.probe_sent(9000, 0.0)
    search.probe_acked(9000, 0.0)
    assert search.size == 9000


def test_never_above_the_ceiling_or_the_peer_limit() -> None:
    search = PathMtuSearch(ceiling=9000, limits=LIMITS)
    search.limit_to_peer(1452)
    search.start()
    assert carried(search, 65535) == [1452]
    assert search.size == 1452
    search.probe_acked(8000, 0.0)  # a stray, larger acknowledgement changes nothing
    assert search.size == 1452


def test_the_raise_timer_searches_again() -> None:
    search = PathMtuSearch(ceiling=9000, limits=LIMITS)
    search.start()
    carried(search, 1500, now=10.0)
    settled = search.size
    assert search.get_timer() == 10.0 + LIMITS.path_mtu_raise_interval
    assert search.probe_size(11.0) is None
    # The path grew meanwhile.
    later = 10.0 + LIMITS.path_mtu_raise_interval
    assert carried(search, 9000, now=later) == [9000]
    assert search.size == 9000 > settled


def test_black_hole_goes_back_to_the_base_and_searches_below() -> None:
    search = PathMtuSearch(ceiling=9000, limits=LIMITS)
    search.start()
    carried(search, 9000)
    assert search.size == 9000
    # Bursts of full-size losses, nothing acknowledged: the path shrank.
    number = 100
    for _ in range(LIMITS.path_mtu_black_hole_bursts):
        search.packet_lost(9000, number)
        search.packet_lost(9000, number + 1)  # the same burst
        number += 10
    assert search.size == BASE_DATAGRAM_SIZE
    assert search.black_holes == 1
    assert search.state is SearchState.SEARCHING
    probed = carried(search, 1400)
    assert max(probed) < 9000
    assert 1400 - LIMITS.path_mtu_search_resolution <= search.size <= 1400


def test_losses_between_acknowledged_full_size_packets_are_congestion() -> None:
    search = PathMtuSearch(ceiling=9000, limits=LIMITS)
    search.start()
    carried(search, 9000)
    for burst in range(20):
        search.packet_lost(9000, burst * 10)
        search.packet_acked(9000)
    assert search.size == 9000 and search.black_holes == 0


def test_smaller_packets_lost_do_not_count_towards_a_black_hole() -> None:
    search = PathMtuSearch(ceiling=9000, limits=LIMITS)
    search.start()
    carried(search, 9000)
    for burst in range(20):
        search.packet_lost(5000, burst * 10)  # sent before the size grew
    assert search.size == 9000


def test_unexpected_transitions_raise() -> None:
    search = PathMtuSearch(ceiling=9000, limits=LIMITS)
    with pytest.raises(LocalProtocolError):
        search._settle(0.0)
    with pytest.raises(LocalProtocolError):
        PathMtuSearch(ceiling=1000, limits=LIMITS)


# Two peers on the in-memory network --------------------------------------------------


def engine(tunnel: TunnelConnection) -> Any:
    return tunnel._quic


def transfer(sim: Simulation, size: int = 2_000_000, seed: int = 1) -> None:
    """One stream each way at once, checksummed."""
    up = open_stream(sim, sim.client, RouteAddress.of("up"))
    server = sim.server_tunnel
    data = {(sim.client, up): payload(size, seed=seed), (server, up): payload(size, seed=seed + 1)}
    pump_all(sim, [Writer(sim, t, sid, blob) for (t, sid), blob in data.items()], timeout=300)
    sim.run_until(lambda: up in sim.server_app.ended and up in sim.client_app.ended, timeout=300)
    assert digest(sim.server_app.received[up]) == digest(data[sim.client, up])
    assert digest(sim.client_app.received[up]) == digest(data[server, up])
    for app in (sim.client_app, sim.server_app):
        assert app.closed is None


def pmtud_sim(link: Link | None = None, **options: Any) -> Simulation:
    sim = simple_sim(link=link or Link(), quic_options={**PMTUD, **options})
    sim.run_until(lambda: both_authenticated(sim), timeout=10)
    return sim


def test_datagrams_grow_to_the_ceiling_on_a_clean_path() -> None:
    sim = pmtud_sim()
    sim.run_for(1.0)
    for tunnel in (sim.client, sim.server_tunnel):
        assert engine(tunnel).path_mtu.size == 9000
        assert engine(tunnel)._max_datagram_size == 9000
    sim.sent_log = []
    transfer(sim)
    assert max(size for _, _, size in sim.sent_log) == 9000


def test_off_every_datagram_is_the_fixed_size() -> None:
    sim = simple_sim(quic_options={"max_datagram_size": 1452})
    sim.run_until(lambda: both_authenticated(sim), timeout=10)
    assert engine(sim.client).path_mtu is None
    sim.sent_log = []
    transfer(sim, 300_000)
    assert max(size for _, _, size in sim.sent_log) == 1452


def test_the_search_settles_under_a_narrow_path_and_data_flows() -> None:
    sim = pmtud_sim(Link(mtu=4000))
    transfer(sim)
    sim.run_for(2.0)
    for tunnel in (sim.client, sim.server_tunnel):
        size = engine(tunnel).path_mtu.size
        assert 4000 - LIMITS.path_mtu_search_resolution <= size <= 4000
    assert sim.too_big > 0  # the probes over 4000 B, nothing else:
    assert sim.too_big == sum(
        engine(t).path_mtu.probes_lost for t in (sim.client, sim.server_tunnel)
    )


def test_a_lost_probe_does_not_shrink_the_congestion_window() -> None:
    sim = pmtud_sim(Link(mtu=1300))
    quic = engine(sim.client)
    window = quic._loss.congestion_window
    sim.run_for(5.0)
    assert quic.path_mtu.probes_lost >= LIMITS.path_mtu_probes
    assert quic._loss.congestion_window >= window  # grown on acknowledged pings, if at all
    assert quic.path_mtu.size <= 1300


def test_black_hole_recovery_when_the_path_shrinks_mid_transfer() -> None:
    sim = pmtud_sim()
    sim.run_for(1.0)
    assert engine(sim.client).path_mtu.size == 9000
    up = open_stream(sim, sim.client, RouteAddress.of("up"))
    blob = payload(4_000_000, seed=7)
    writer = Writer(sim, sim.client, up, blob)
    # A quarter of the way, the route changes: datagrams over 1500 B now vanish.
    while writer.offset < len(blob) // 4:
        writer.pump()
        sim.step()
    sim.link.mtu = 1500
    pump_all(sim, [writer], timeout=300)
    sim.run_until(lambda: up in sim.server_app.ended, timeout=300)
    assert digest(sim.server_app.received[up]) == digest(blob)
    search = engine(sim.client).path_mtu
    assert search.black_holes >= 1
    assert search.size <= 1500
    assert sim.client_app.closed is None


@pytest.mark.parametrize("seed", [1, 2])
def test_transfer_through_a_lossy_path_with_discovery_on(seed: int) -> None:
    sim = pmtud_sim(Link(loss=0.03, jitter=0.01, duplicate=0.03))
    sim.rng.seed(seed)
    transfer(sim, 1_000_000, seed=seed)
    for tunnel in (sim.client, sim.server_tunnel):
        assert BASE_DATAGRAM_SIZE < engine(tunnel).path_mtu.size <= 9000


def test_the_peer_max_udp_payload_size_bounds_the_search() -> None:
    sim = pmtud_sim()
    sim.run_for(1.0)
    quic = engine(sim.client)
    quic.path_mtu.limit_to_peer(2000)  # as if its transport parameters said so
    quic._apply_path_mtu()
    assert quic._max_datagram_size == 2000


# Invariants over any sequence of inputs ----------------------------------------------


@given(
    ceiling=st.integers(BASE_DATAGRAM_SIZE, 65527),
    mtu=st.integers(BASE_DATAGRAM_SIZE, 65535),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["probe", "lose-probe", "ack", "lose", "peer", "time"]),
            st.integers(0, 70000),
        ),
        max_size=80,
    ),
)
@settings(max_examples=300, deadline=None)
def test_the_size_stays_between_the_base_and_the_ceiling(
    ceiling: int, mtu: int, steps: list[tuple[str, int]]
) -> None:
    search = PathMtuSearch(ceiling=ceiling, limits=LIMITS)
    search.start()
    now, number = 0.0, 0
    for action, value in steps:
        before = search.size
        if action == "probe":
            size = search.probe_size(now)
            if size is not None:
                assert search.size < size <= search.ceiling
                search.probe_sent(size, now)
                if size <= mtu:
                    search.probe_acked(size, now)
                else:
                    search.probe_lost(size, now)
        elif action == "lose-probe":
            search.probe_lost(value, now)
            assert search.size == before  # a lost probe never shrinks anything
        elif action == "ack":
            search.packet_acked(value)
        elif action == "lose":
            number += 1 + value % 3
            search.packet_lost(value, number)
        elif action == "peer":
            search.limit_to_peer(value)
        else:
            now += value
        assert BASE_DATAGRAM_SIZE <= search.size <= search.ceiling <= ceiling


def test_a_probe_ends_its_flush() -> None:
    """Datagrams of the size in use come first, so a GSO run never has the probe's
    size as its segment size (a size the interface may not carry)."""
    sim = simple_sim(quic_options=PMTUD)
    quic = engine(sim.client)
    flushes: list[list[int]] = []
    original = quic.datagrams_to_send

    def recording(now: float) -> list[tuple[bytes, Any]]:
        datagrams: list[tuple[bytes, Any]] = original(now)
        flushes.append([len(data) for data, _ in datagrams])
        return datagrams

    quic.datagrams_to_send = recording
    sim.run_until(lambda: both_authenticated(sim), timeout=10)
    sim.run_for(0.5)
    with_probe = [sizes for sizes in flushes if 9000 in sizes]
    assert with_probe
    for sizes in with_probe:
        assert sizes[-1] == 9000 and sizes.count(9000) == 1
