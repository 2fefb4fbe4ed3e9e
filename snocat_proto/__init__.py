"""snocat's protocol core: a sans-IO state machine for snocat tunnels.

Bytes, datagrams and ``now`` go in; bytes, datagrams and events come out.  No
sockets, threads, clocks or event loops live here: see ``snocat_anyio`` and
``snocat_sync`` for the adapters that do the I/O.
"""
