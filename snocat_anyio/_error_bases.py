"""What snocat_anyio's stream errors subclass: anyio's own, so code written for any
anyio ``ByteStream`` handles them without knowing snocat.

The errors themselves (:mod:`._errors`) are written once for both bindings;
``snocat_sync`` has a twin of this module that names the built-in ``ConnectionError``
family instead.
"""

from __future__ import annotations

import anyio

#: The tunnel carrying a stream closed / the stream was reset: the stream is broken.
TunnelClosedBase = anyio.BrokenResourceError
StreamResetBase = anyio.BrokenResourceError
#: anyio has no refusal of its own.
StreamRefusedBase = Exception
