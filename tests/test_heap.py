"""LongLivedHeap: full collections walk only what came since the last one; a deep one
comes once the frozen objects grew by the configured share, and frees what closed
tunnels left in cycles; objects freed by reference counting (an idle tunnel's packets)
never bring one about.  These run the process's real garbage collector."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from snocat_proto import LocalProtocolError, LongLivedHeap


class Node:
    """An object in a reference cycle (as a closed tunnel's connection is)."""

    def __init__(self) -> None:
        self.peer: Node | None = None


def cycle() -> tuple[Node, weakref.ref[Node]]:
    a, b = Node(), Node()
    a.peer, b.peer = b, a
    return a, weakref.ref(a)


@pytest.fixture
def heap() -> Iterator[LongLivedHeap]:
    heap = LongLivedHeap(growth=0.25, minimum=0)
    heap.install()
    try:
        yield heap
    finally:
        heap.uninstall()
        gc.collect()


def test_install_freezes_and_uninstall_gives_everything_back(heap: LongLivedHeap) -> None:
    assert heap.installed and gc.get_freeze_count() > 1_000
    heap.install()  # twice is once
    assert gc.callbacks.count(heap._after_collection) == 1
    heap.uninstall()
    assert not heap.installed and gc.get_freeze_count() == 0
    assert heap._after_collection not in gc.callbacks


def test_a_full_collection_freezes_its_survivors(heap: LongLivedHeap) -> None:
    before = heap.counts()
    kept = [Node() for _ in range(5_000)]
    gc.collect()
    after = heap.counts()
    assert after.shallow == before.shallow + 1 and after.deep == before.deep
    assert after.frozen >= before.frozen + len(kept)
    assert gc.get_count()[0] < 100  # the young generations were frozen too


def test_freed_by_reference_counting_leaves_the_frozen_set(heap: LongLivedHeap) -> None:
    # An idle tunnel: packets that outlive a collection, then die without a cycle.
    baseline = heap.counts().frozen
    for _ in range(20):
        packets = [[Node()] for _ in range(2_000)]
        gc.collect()
        del packets
    counts = heap.counts()
    assert counts.deep == 0
    assert counts.frozen < baseline + 1_000


def test_frozen_cyclic_garbage_waits_for_the_deep_collection(heap: LongLivedHeap) -> None:
    closed, alive = cycle()
    gc.collect()  # survived: frozen
    del closed
    gc.collect()
    assert alive() is not None, "a shallow collection walked a frozen object"
    assert heap.counts().deep == 0

    # The frozen set grows by more than a quarter: the next full collection is deep.
    growth: list[list[int]] = [[] for _ in range(int(heap.counts().frozen * 0.3))]
    gc.collect()
    assert heap.counts().deep == 0 and gc.get_freeze_count() == 0  # handed back
    gc.collect()
    counts = heap.counts()
    assert counts.deep == 1
    assert alive() is None, "the deep collection freed the closed cycle"
    assert counts.frozen >= len(growth)  # and froze what survived it


def test_the_minimum_keeps_a_small_heap_from_thawing() -> None:
    heap = LongLivedHeap(growth=0.25, minimum=10_000_000)
    heap.install()
    try:
        growth: list[list[int]] = [[] for _ in range(int(heap.counts().frozen * 0.5))]
        gc.collect()
        gc.collect()
        assert heap.counts().deep == 0 and gc.get_freeze_count() >= len(growth)
    finally:
        heap.uninstall()


@pytest.mark.parametrize(("growth", "minimum"), [(0.0, 0), (-1.0, 0), (0.25, -1)])
def test_bad_settings_are_refused(growth: float, minimum: int) -> None:
    with pytest.raises(LocalProtocolError, match="growth > 0"):
        LongLivedHeap(growth=growth, minimum=minimum)
