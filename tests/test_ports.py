"""Port range parsing, the public-port allocator and sticky ports."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from snocat_proto._service.ports import PortAllocator, PortRange, PortsExhausted, StickyPorts
from snocat_proto._wire.errors import LocalProtocolError

# -- PortRange -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("8080:8090", 8080, 8090),
        ("8080:8080", 8080, 8080),
        ("1:65535", 1, 65535),
        ("08080:08081", 8080, 8081),
    ],
)
def test_parse_valid(text: str, start: int, end: int) -> None:
    parsed = PortRange.parse(text)
    assert parsed == PortRange(start, end)
    assert (parsed.start, parsed.end) == (start, end)
    assert len(parsed) == parsed.size == end - start + 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8090:8080", "above its end"),
        ("abc", "START:END"),
        ("0:5", "within 1..65535"),
        ("1:70000", "within 1..65535"),
        ("8080 :8090", "START:END"),
        (" 8080:8090", "START:END"),
        ("8080:8090 ", "START:END"),
        ("8080: 8090", "START:END"),
        ("8080:8090\n", "START:END"),
        ("", "START:END"),
        (":", "START:END"),
        ("8080", "START:END"),
        ("8080:", "START:END"),
        (":8090", "START:END"),
        ("8080-8090", "START:END"),
        ("8080:8090:9000", "START:END"),
        ("-1:5", "START:END"),
        ("+1:5", "START:END"),
        ("1.5:6", "START:END"),
        ("100000:100001", "START:END"),
        ("\u0668\u0660:\u0669\u0660", "START:END"),  # Arabic-Indic digits
        ("1_000:2_000", "START:END"),
    ],
)
def test_parse_invalid(text: str, message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        PortRange.parse(text)


@given(st.text(max_size=20))
def test_parse_arbitrary_text_is_range_or_local_error(text: str) -> None:
    try:
        parsed = PortRange.parse(text)
    except LocalProtocolError:
        return
    assert str(parsed) == f"{parsed.start}:{parsed.end}"
    assert 1 <= parsed.start <= parsed.end <= 65535


@given(st.integers(1, 65535), st.integers(1, 65535))
def test_parse_str_round_trip(a: int, b: int) -> None:
    start, end = min(a, b), max(a, b)
    port_range = PortRange(start, end)
    assert PortRange.parse(str(port_range)) == port_range


@pytest.mark.parametrize(
    ("start", "end"), [(0, 5), (5, 4), (1, 65536), (-3, 10), (True, 5), (1.0, 5), ("1", 5)]
)
def test_range_constructor_validates(start: object, end: object) -> None:
    with pytest.raises(LocalProtocolError):
        PortRange(start, end)  # type: ignore[arg-type]


def test_range_contains_and_iter() -> None:
    port_range = PortRange(10, 12)
    assert list(port_range) == [10, 11, 12]
    assert 10 in port_range and 12 in port_range
    assert 9 not in port_range and 13 not in port_range
    assert True not in PortRange(1, 2)
    assert "10" not in port_range


# -- PortAllocator ---------------------------------------------------------------


def test_allocates_lowest_free() -> None:
    allocator = PortAllocator(PortRange(8080, 8090))
    assert [allocator.allocate() for _ in range(3)] == [8080, 8081, 8082]
    allocator.release(8081)
    assert allocator.allocate() == 8081
    assert allocator.allocate() == 8083
    allocator.release(8080)
    allocator.release(8082)
    assert allocator.allocate() == 8080
    assert allocator.allocate() == 8082
    assert allocator.allocated == frozenset({8080, 8081, 8082, 8083})
    assert allocator.free_count == 7


def test_preferred_port() -> None:
    allocator = PortAllocator(PortRange(8080, 8090))
    assert allocator.allocate(preferred=8085) == 8085
    # The lowest-free scan walks over a preferred grant above the watermark.
    assert [allocator.allocate() for _ in range(6)] == [8080, 8081, 8082, 8083, 8084, 8086]
    # Taken preferred port: fall back to the lowest free one.
    assert allocator.allocate(preferred=8085) == 8087
    # Out of range preferred port: ignored.
    assert allocator.allocate(preferred=80) == 8088
    allocator.release(8082)
    assert allocator.allocate(preferred=8082) == 8082
    assert allocator.is_allocated(8082)


def test_preferred_below_watermark_leaves_no_duplicates() -> None:
    allocator = PortAllocator(PortRange(1, 3))
    assert [allocator.allocate() for _ in range(3)] == [1, 2, 3]
    allocator.release(2)
    for _ in range(1000):  # preferred grant + release of a heap port, repeatedly
        assert allocator.allocate(preferred=2) == 2
        allocator.release(2)
    assert len(allocator._heap) <= 3
    assert allocator.allocate() == 2
    with pytest.raises(PortsExhausted):
        allocator.allocate()


def test_exclude() -> None:
    allocator = PortAllocator(PortRange(8080, 8090))
    assert allocator.allocate(exclude={8080, 8081}) == 8082
    # Excluded ports stay free and are found later.
    assert allocator.allocate() == 8080
    assert allocator.allocate(exclude=[8081, 8083]) == 8084
    assert allocator.allocate() == 8081
    assert allocator.allocate() == 8083
    # exclude beats preferred.
    assert allocator.allocate(preferred=8086, exclude=(8086,)) == 8085
    # Ports already granted or out of range in exclude are harmless.
    assert allocator.allocate(exclude={8080, 1, 99999}) == 8086


def test_exhaustion() -> None:
    allocator = PortAllocator(PortRange(5000, 5002))
    assert [allocator.allocate() for _ in range(3)] == [5000, 5001, 5002]
    with pytest.raises(PortsExhausted, match="all 3 ports"):
        allocator.allocate()
    with pytest.raises(PortsExhausted):
        allocator.allocate(preferred=5001)
    assert isinstance(PortsExhausted("x"), LocalProtocolError)
    allocator.release(5001)
    with pytest.raises(PortsExhausted, match="excluded"):
        allocator.allocate(exclude={5001})
    assert allocator.allocate() == 5001


def test_exhaustion_by_exclude_above_watermark() -> None:
    allocator = PortAllocator(PortRange(1, 4))
    with pytest.raises(PortsExhausted):
        allocator.allocate(exclude=range(1, 5))
    assert allocator.free_count == 4
    assert [allocator.allocate() for _ in range(4)] == [1, 2, 3, 4]


def test_release_and_claim_errors() -> None:
    allocator = PortAllocator(PortRange(10, 20))
    with pytest.raises(LocalProtocolError, match="not allocated"):
        allocator.release(10)
    port = allocator.allocate()
    allocator.release(port)
    with pytest.raises(LocalProtocolError, match="not allocated"):
        allocator.release(port)
    with pytest.raises(LocalProtocolError, match="not allocated"):
        allocator.release(99)
    allocator.claim(15)
    with pytest.raises(LocalProtocolError, match="already allocated"):
        allocator.claim(15)
    with pytest.raises(LocalProtocolError, match="outside"):
        allocator.claim(21)
    assert allocator.allocate(preferred=15) == 10
    with pytest.raises(LocalProtocolError):
        PortAllocator("10:20")  # type: ignore[arg-type]


def test_single_port_range() -> None:
    allocator = PortAllocator(PortRange(65535, 65535))
    assert allocator.allocate() == 65535
    with pytest.raises(PortsExhausted):
        allocator.allocate()
    allocator.release(65535)
    assert allocator.allocate(preferred=65535) == 65535


def test_sixty_thousand_ports_is_fast() -> None:
    port_range = PortRange(2000, 61999)
    allocator = PortAllocator(port_range)
    begun = time.perf_counter()
    ports = [allocator.allocate() for _ in range(60_000)]
    assert ports == list(port_range)
    with pytest.raises(PortsExhausted):
        allocator.allocate()
    for port in reversed(ports):
        allocator.release(port)
    assert allocator.free_count == 60_000
    again = [allocator.allocate() for _ in range(60_000)]
    assert again == ports
    for port in ports[::2]:
        allocator.release(port)
    assert [allocator.allocate() for _ in range(30_000)] == ports[::2]
    for port in ports:
        allocator.release(port)
    # Preferred grants scattered over a fresh range, then lowest-free fills the gaps.
    fresh = PortAllocator(port_range)
    for port in ports[::3]:
        assert fresh.allocate(preferred=port) == port
    rest = [fresh.allocate() for _ in range(60_000 - len(ports[::3]))]
    assert sorted(rest + ports[::3]) == ports
    elapsed = time.perf_counter() - begun
    assert elapsed < 3.0, f"60,000-port workload took {elapsed:.2f}s"


class AllocatorModel(RuleBasedStateMachine):
    """The allocator against a plain set: every answer must match the obvious one."""

    allocated_ports = Bundle("allocated_ports")

    @initialize(start=st.integers(1, 65530), size=st.integers(1, 12))
    def setup(self, start: int, size: int) -> None:
        self.port_range = PortRange(start, min(65535, start + size - 1))
        self.allocator = PortAllocator(self.port_range)
        self.model: set[int] = set()

    @rule(
        target=allocated_ports,
        preferred=st.none() | st.integers(-2, 14),
        exclude=st.sets(st.integers(-2, 14), max_size=6),
    )
    def allocate(self, preferred: int | None, exclude: set[int]) -> int:
        # Offsets keep generated ports near the range wherever it starts.
        base = self.port_range.start
        want = None if preferred is None else base + preferred
        excluded = {base + offset for offset in exclude}
        free = set(self.port_range) - self.model
        if want is not None and want in free and want not in excluded:
            expected: int | None = want
        else:
            candidates = free - excluded
            expected = min(candidates) if candidates else None
        if expected is None:
            with pytest.raises(PortsExhausted):
                self.allocator.allocate(preferred=want, exclude=excluded)
            return -1  # never allocated: releasing it must fail
        got = self.allocator.allocate(preferred=want, exclude=excluded)
        assert got == expected
        self.model.add(got)
        return got

    @rule(port=consumes(allocated_ports))
    def release_allocated(self, port: int) -> None:
        if port in self.model:
            self.allocator.release(port)
            self.model.remove(port)
        else:
            with pytest.raises(LocalProtocolError):
                self.allocator.release(port)

    @rule(offset=st.integers(-2, 14))
    def release_any(self, offset: int) -> None:
        port = self.port_range.start + offset
        if port in self.model:
            self.allocator.release(port)
            self.model.remove(port)
        else:
            with pytest.raises(LocalProtocolError):
                self.allocator.release(port)

    @rule(offset=st.integers(-2, 14))
    def claim(self, offset: int) -> None:
        port = self.port_range.start + offset
        if port in self.port_range and port not in self.model:
            self.allocator.claim(port)
            self.model.add(port)
        else:
            with pytest.raises(LocalProtocolError):
                self.allocator.claim(port)

    @invariant()
    def agrees(self) -> None:
        assert self.allocator.allocated == self.model
        assert self.allocator.free_count == self.port_range.size - len(self.model)
        for port in range(self.port_range.start - 1, self.port_range.end + 2):
            assert self.allocator.is_allocated(port) == (port in self.model)
        # The heap never holds a port twice, so its size is bounded by the range.
        heap = self.allocator._heap
        assert len(heap) == len(set(heap)) == len(self.allocator._in_heap)
        assert len(heap) <= self.port_range.size


AllocatorModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestAllocatorModel = AllocatorModel.TestCase


# -- StickyPorts -----------------------------------------------------------------


def test_sticky_remember_and_expire() -> None:
    sticky = StickyPorts(remember_for=30.0, max_entries=8)
    assert sticky.recall("alice", 0.0) is None
    assert sticky.get_timer() is None
    sticky.remember("alice", 8081, now=100.0)
    assert sticky.recall("alice", 100.0) == 8081
    assert sticky.recall("alice", 129.9) == 8081
    assert sticky.recall("alice", 130.0) is None
    assert "alice" not in sticky
    # Remembering again overwrites and restarts the clock.
    sticky.remember("alice", 8082, now=200.0)
    sticky.remember("alice", 8083, now=210.0)
    assert sticky.recall("alice", 235.0) == 8083
    sticky.forget("alice")
    sticky.forget("alice")  # idempotent
    assert sticky.recall("alice", 211.0) is None


def test_sticky_timer() -> None:
    sticky = StickyPorts(remember_for=10.0)
    sticky.remember("a", 1, now=0.0)
    sticky.remember("b", 2, now=5.0)
    sticky.remember("c", 3, now=7.0)
    assert sticky.get_timer() == 10.0
    sticky.handle_timer(10.0)
    assert len(sticky) == 2 and "a" not in sticky
    assert sticky.get_timer() == 15.0
    sticky.handle_timer(16.9)
    assert len(sticky) == 1 and "c" in sticky
    sticky.handle_timer(100.0)
    assert len(sticky) == 0 and sticky.get_timer() is None


def test_sticky_bound_evicts_least_recently_remembered() -> None:
    sticky = StickyPorts(remember_for=1000.0, max_entries=3)
    for index, name in enumerate("abcd"):
        sticky.remember(name, 9000 + index, now=float(index))
    assert len(sticky) == 3
    assert sticky.recall("a", 5.0) is None
    sticky.remember("b", 9100, now=6.0)  # "b" becomes the most recent
    sticky.remember("e", 9004, now=7.0)  # so "c" is evicted
    assert sticky.recall("c", 8.0) is None
    assert [sticky.recall(name, 8.0) for name in "bde"] == [9100, 9003, 9004]


@given(
    st.lists(
        st.tuples(st.sampled_from("abcdefgh"), st.integers(1, 65535), st.floats(0, 5)),
        max_size=60,
    ),
    st.integers(1, 5),
)
def test_sticky_never_exceeds_bound(
    operations: list[tuple[str, int, float]], max_entries: int
) -> None:
    sticky = StickyPorts(remember_for=3.0, max_entries=max_entries)
    now = 0.0
    model: dict[str, tuple[int, float]] = {}
    for name, port, step in operations:
        now += step
        sticky.remember(name, port, now)
        model.pop(name, None)
        model[name] = (port, now + 3.0)
        while len(model) > max_entries:
            del model[next(iter(model))]
        assert len(sticky) <= max_entries
    for name in "abcdefgh":
        entry = model.get(name)
        expected = entry[0] if entry is not None and now < entry[1] else None
        assert sticky.recall(name, now) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"remember_for": -1.0},
        {"remember_for": float("inf")},
        {"remember_for": float("nan")},
        {"remember_for": True},
        {"max_entries": 0},
        {"max_entries": 2.0},
    ],
)
def test_sticky_validates_config(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        StickyPorts(**kwargs)  # type: ignore[arg-type]


def test_sticky_validates_port() -> None:
    sticky = StickyPorts()
    with pytest.raises(LocalProtocolError):
        sticky.remember("a", 0, now=0.0)
    with pytest.raises(LocalProtocolError):
        sticky.remember("a", 65536, now=0.0)


def test_sticky_with_allocator_gives_port_back() -> None:
    allocator = PortAllocator(PortRange(8080, 8090))
    sticky = StickyPorts(remember_for=60.0)
    first = allocator.allocate()
    second = allocator.allocate()
    assert (first, second) == (8080, 8081)
    allocator.release(second)
    sticky.remember("bob", second, now=10.0)
    allocator.release(first)
    # "bob" reconnects: it gets 8081 back though 8080 is lower and free.
    assert allocator.allocate(preferred=sticky.recall("bob", now=20.0)) == 8081
    assert allocator.allocate(preferred=sticky.recall("carol", now=20.0)) == 8080
