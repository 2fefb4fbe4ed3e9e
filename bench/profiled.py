"""Run the ``snocat`` command under cProfile.

    python -m bench.profiled OUT.prof server|client|demo ...

The statistics (wall-clock; time spent waiting in ``epoll`` is idle, not work) are written
when the command exits (SIGTERM makes ``snocat`` stop gracefully).
"""

from __future__ import annotations

import cProfile
import sys

from snocat_anyio.cli import main as snocat_main


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["snocat", *sys.argv[2:]]
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        snocat_main()
    except SystemExit:
        pass
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
