"""Reconnect delays: capped exponential backoff with full jitter.

Pure: the caller supplies the random source and decides when to sleep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .._wire.errors import LocalProtocolError


@dataclass(slots=True)
class Backoff:
    """Delay before each attempt: ``uniform(base/2, base)`` with ``base`` doubling
    from ``initial`` up to ``maximum``; :meth:`reset` after a success."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.multiplier < 1:
            raise LocalProtocolError("backoff needs 0 < initial <= maximum and multiplier >= 1")

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * self.multiplier**self.attempt)
        self.attempt += 1
        return self.rng.uniform(base / 2, base)

    def reset(self) -> None:
        self.attempt = 0
