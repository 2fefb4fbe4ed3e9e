"""Keeping the garbage collector's full collections off long-lived tunnels.

CPython's oldest generation is collected whenever the objects promoted into it since
the last full collection reach a quarter of its size, and every full collection walks
every tracked object.  An aggregator holds ~270 tracked objects per tunnel, so at
10,000 tunnels one full collection stops the event loop (every tunnel's traffic) for
1.3 to 2.5 s.  And an idle tunnel promotes without growing: each ACK-only packet waits
in aioquic's sent-packet book for the peer's next ACK (seconds), is promoted, and is
then freed by reference counting, yet still counts towards the next full collection.

:class:`LongLivedHeap` moves what survives a full collection into CPython's permanent
generation (``gc.freeze()``), so the next one walks only what came after it: the
pauses shrink to the objects made since, however many tunnels are held.  What is
frozen and later becomes cyclic garbage (a closed tunnel's connection, a finished
stream's task) is freed only by a *deep* collection: once the frozen set has grown by
``growth`` (a quarter, as CPython's own rule) over its size after the last deep one,
it is handed back (``gc.unfreeze()``) and the next full collection is deep.  Growth
is what a deep collection finds: tunnels added, or garbage left by closed ones; an
idle aggregator stays level (the promoted packets die by reference counting, which
takes them out of the frozen set too) and never pays for a deep collection.

No clock, no thread: it works from CPython's own collection triggers, through
``gc.callbacks``.  The garbage collector is the process's, so the program that owns
the process installs it (``snocat server`` does); a library embedding a
``TunnelServer`` decides for itself.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

from .._wire.errors import LocalProtocolError

__all__ = ["HeapCounts", "LongLivedHeap"]

#: The oldest generation's number, as ``gc.callbacks`` reports it.
OLDEST = 2


@dataclass(frozen=True, slots=True)
class HeapCounts:
    """What :class:`LongLivedHeap` has done, for metrics."""

    frozen: int  # objects in the permanent generation now
    shallow: int  # full collections that walked only objects made since the last one
    deep: int  # full collections that walked every object (after ``gc.unfreeze()``)


class LongLivedHeap:
    """Freeze what survives each full collection; thaw once the frozen set grew by
    ``growth`` over its size after the last deep collection."""

    def __init__(self, *, growth: float = 0.25, minimum: int = 100_000) -> None:
        if growth <= 0 or minimum < 0:
            raise LocalProtocolError("LongLivedHeap needs growth > 0 and minimum >= 0")
        self._growth = growth
        self._minimum = minimum  # below this many frozen objects, never thaw
        self._baseline = 0  # frozen objects after the last deep collection
        self._deep_next = False
        self._shallow = 0
        self._deep = 0
        self._installed = False

    @property
    def installed(self) -> bool:
        return self._installed

    def counts(self) -> HeapCounts:
        return HeapCounts(frozen=gc.get_freeze_count(), shallow=self._shallow, deep=self._deep)

    def install(self) -> None:
        """Collect once, freeze what is left (modules, configuration), and follow every
        full collection from now on."""
        if self._installed:
            return
        gc.collect()
        gc.freeze()
        self._baseline = gc.get_freeze_count()
        self._deep_next = False
        gc.callbacks.append(self._after_collection)
        self._installed = True

    def uninstall(self) -> None:
        """Stop, and give every frozen object back to the collector."""
        if not self._installed:
            return
        gc.callbacks.remove(self._after_collection)
        gc.unfreeze()
        self._installed = False

    def _after_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info["generation"] != OLDEST:
            return
        # The collection is over: the younger generations are empty and the oldest
        # holds just its survivors, all long-lived now.
        if self._deep_next:
            self._deep += 1
            self._deep_next = False
            gc.freeze()
            self._baseline = gc.get_freeze_count()
            return
        self._shallow += 1
        gc.freeze()
        frozen = gc.get_freeze_count()
        if frozen > self._minimum and frozen > self._baseline * (1 + self._growth):
            # CPython's next trigger of a full collection makes it a deep one.
            gc.unfreeze()
            self._deep_next = True
