"""The threads a server or client starts for its services, and their end.

Every thread runs its function under a guard: an exception is logged and ends that
thread only, never the pump or the owner.  :meth:`ThreadGroup.join` waits for all of
them, including those started while it waits, within one deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any


class ThreadGroup:
    """A set of guarded threads that can be joined together."""

    def __init__(self, name: str, logger: logging.Logger) -> None:
        self._name = name
        self._logger = logger
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._count = 0

    def spawn(self, fn: Callable[..., object], *args: Any, name: str | None = None) -> None:
        """Run ``fn(*args)`` in a new thread of this group."""
        with self._lock:
            self._count += 1
            label = f"{self._name}-{name or getattr(fn, '__name__', 'task')}-{self._count}"
            thread = threading.Thread(target=self._run, args=(fn, args), name=label, daemon=True)
            self._threads.add(thread)
        thread.start()

    def _run(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            self._logger.exception("%s failed", threading.current_thread().name)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def __len__(self) -> int:
        with self._lock:
            return len(self._threads)

    def __enter__(self) -> ThreadGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Leaving does not wait: :meth:`join` does, within a deadline."""

    def join(self, timeout: float) -> list[threading.Thread]:
        """Wait up to ``timeout`` seconds for every thread; those still running."""
        deadline = time.monotonic() + timeout
        current = threading.current_thread()
        while True:
            with self._lock:
                pending = [t for t in self._threads if t is not current]
            if not pending:
                return []
            for thread in pending:
                thread.join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                with self._lock:
                    return [t for t in self._threads if t is not current and t.is_alive()]
