"""What snocat_sync's stream errors subclass: the built-in ``ConnectionError`` family
(so ``OSError``), as a socket's would, so code written for sockets handles them
without knowing snocat.  Timeouts are the built-in ``TimeoutError`` (``socket.timeout``).

The errors themselves (:mod:`._errors`) are generated from snocat_anyio's; this
module is the blocking twin of ``snocat_anyio/_error_bases.py``.
"""

from __future__ import annotations

TunnelClosedBase = ConnectionAbortedError
StreamResetBase = ConnectionResetError
StreamRefusedBase = ConnectionRefusedError
