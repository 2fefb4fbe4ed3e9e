"""aioquic's private names that snocat relies on still exist in the installed aioquic.

snocat_proto/_wire/engine.py is the one module that reaches into aioquic's internals
(receive credit only for consumed data, memory per connection, the loss-timer fix);
it lists every name it uses in ``AIOQUIC_PRIVATES``.  This test checks each on live
objects after a real in-memory handshake, so an aioquic release that renames one
fails here with the name, not somewhere deep in a transfer.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

import aioquic
from aioquic.asyncio.protocol import QuicConnectionProtocol

from snocat_proto._wire.certificates import install_identity, install_trust
from snocat_proto._wire.engine import AIOQUIC_PRIVATES, QuicEngine, quic_configuration
from snocat_proto._wire.limits import Limits

LIMITS = Limits()


def _handshaken_pair(identity: Any) -> tuple[QuicEngine, QuicEngine]:
    client_config = quic_configuration(is_client=True, limits=LIMITS, server_name="localhost")
    install_trust(client_config, authority_pem=identity.certificate_pem, pinned=None)
    server_config = quic_configuration(is_client=False, limits=LIMITS)
    install_identity(server_config, identity.certificate_pem, identity.private_key_pem)
    client = QuicEngine(configuration=client_config, limits=LIMITS)
    server = QuicEngine(
        configuration=server_config,
        limits=LIMITS,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    client.connect(("10.0.0.2", 4433), now=0.0)
    now = 0.0
    for _ in range(20):
        now += 0.01
        for data, _ in client.datagrams_to_send(now):
            server.receive_datagram(data, ("10.0.0.1", 1234), now)
        for data, _ in server.datagrams_to_send(now):
            client.receive_datagram(data, ("10.0.0.2", 4433), now)
    return client, server


def _live_objects(identity: Any) -> dict[str, Any]:
    client, _ = _handshaken_pair(identity)
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, b"data")
    loop = asyncio.new_event_loop()
    try:
        protocol = loop.run_until_complete(_protocol(client))
    finally:
        loop.close()
    return {
        "aioquic.quic.connection.QuicConnection": client,
        "aioquic.quic.connection.QuicConnection.tls": client.tls,
        "aioquic.quic.recovery.QuicPacketRecovery": getattr(client, "_loss", None),
        "aioquic.quic.recovery.QuicPacketPacer": getattr(
            getattr(client, "_loss", None), "_pacer", None
        ),
        "aioquic.quic.congestion.base.QuicCongestionControl": getattr(
            getattr(client, "_loss", None), "_cc", None
        ),
        "aioquic.quic.stream.QuicStreamSender": client._streams[stream_id].sender,
        "aioquic.asyncio.protocol.QuicConnectionProtocol": protocol,
        "aioquic._buffer": importlib.import_module("aioquic._buffer"),
    }


async def _protocol(quic: QuicEngine) -> QuicConnectionProtocol:
    return QuicConnectionProtocol(quic)


def test_every_private_name_the_engine_uses_exists(server_identity: Any) -> None:
    live = _live_objects(server_identity)
    assert set(live) == set(AIOQUIC_PRIVATES), "a new owner in AIOQUIC_PRIVATES needs a live object"
    missing = [
        f"{owner}.{name}"
        for owner, names in AIOQUIC_PRIVATES.items()
        for name in names
        if live[owner] is None or not hasattr(live[owner], name)
    ]
    assert not missing, (
        f"aioquic {aioquic.__version__} no longer has {', '.join(missing)}, which "
        "snocat_proto/_wire/engine.py relies on: adapt the engine, or keep aioquic at a "
        "release that has them (pyproject.toml)"
    )


def test_the_handshake_left_what_the_engine_reads(server_identity: Any) -> None:
    """The names exist *and* hold what the engine expects after a handshake."""
    client, server = _handshaken_pair(server_identity)
    assert client.peer_certificate is not None, "the peer's certificate is not where it was"
    assert server.peer_certificate is None  # the client presented none
    assert client.is_terminated is False and client.close_reason is None
    assert client.send_buffered(client.get_next_available_stream_id()) == 0
