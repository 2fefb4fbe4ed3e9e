"""RefusedVisitors: how long a UDP visitor whose flow the client refused is held off."""

from __future__ import annotations

import pytest

from snocat_proto import LocalProtocolError
from snocat_proto._service.refused_visitors import RefusedVisitors
from snocat_proto._wire.udp_flows import FlowEnd


def test_each_refusal_in_a_row_doubles_the_hold_up_to_the_maximum() -> None:
    held = RefusedVisitors(first=1.0, maximum=8.0, capacity=16)
    assert not held.held("v", 0.0)
    holds = [held.refused("v", float(t)) for t in range(6)]
    assert holds == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert held.held("v", 12.9) and not held.held("v", 13.0)
    for _ in range(2000):  # a long streak neither overflows nor grows
        held.refused("v", 0.0)
    assert len(held) == 1


def test_a_flow_that_opened_starts_the_count_again() -> None:
    held = RefusedVisitors(first=1.0, maximum=30.0, capacity=16)
    held.refused("v", 0.0)
    held.refused("v", 1.0)
    held.opened("v")
    assert not held.held("v", 1.5)
    assert held.refused("v", 2.0) == 1.0


def test_how_a_flow_ended_decides() -> None:
    held = RefusedVisitors(first=1.0, maximum=30.0, capacity=16)
    held.ended("v", FlowEnd.REFUSED, 0.0)
    held.ended("v", FlowEnd.REFUSED, 1.0)
    assert held.held("v", 2.5)  # the second refusal in a row: 2 s
    held.ended("v", FlowEnd.IDLE, 3.0)  # it had opened: the count starts again
    assert not held.held("v", 3.0) and held.refused("v", 4.0) == 1.0


def test_spoofed_sources_cannot_grow_it_past_its_capacity() -> None:
    held = RefusedVisitors(first=1.0, maximum=30.0, capacity=4)
    for source in range(100):
        held.refused(("fd", ("198.51.100.1", source)), 0.0)
    assert len(held) == 4
    assert held.held(("fd", ("198.51.100.1", 99)), 0.5)  # the newest are kept
    assert not held.held(("fd", ("198.51.100.1", 0)), 0.5)


@pytest.mark.parametrize(
    ("first", "maximum", "capacity"), [(2.0, 1.0, 4), (-1.0, 1.0, 4), (1.0, 2.0, 0)]
)
def test_bad_settings_are_refused(first: float, maximum: float, capacity: int) -> None:
    with pytest.raises(LocalProtocolError):
        RefusedVisitors(first=first, maximum=maximum, capacity=capacity)
