"""Both ends of one tunnel in memory, on a fake clock: the core's CPU cost, alone.

:func:`tunnel_transfer` moves ``size`` bytes over one stream between a
:class:`ServerEndpoint` and a Connect-side :class:`TunnelConnection` with no socket,
no event loop and no other process; :func:`raw_transfer` does the same between two
bare aioquic connections.  The process CPU time of each is what the core costs per
byte over aioquic's own cost, unaffected by whatever else the machine is doing.
"""

from __future__ import annotations

import datetime
import ssl
import time
from typing import Any

from aioquic.quic.configuration import QuicConfiguration as AioquicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived

from bench.common import PATTERN
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import (
    SCHEME_SIMPLE_ACK,
    ClientCredentials,
    connect_authenticator,
    listen_authenticator,
)
from snocat_proto._wire.certificates import generate_self_signed, install_identity
from snocat_proto._wire.endpoint import ServerEndpoint
from snocat_proto._wire.engine import handshake_complete, quic_configuration, send_buffered
from snocat_proto._wire.events import (
    AuthenticationCompleted,
    DataReceived,
    StreamAccepted,
    StreamRequested,
    StreamWritable,
)
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.tunnel import TunnelConnection

SERVER = ("10.0.0.1", 4433)
CLIENT = ("10.0.0.2", 50000)
TICK = 0.0002
CHUNK = 64 * 1024

_IDENTITY = generate_self_signed(["localhost"], now=datetime.datetime.now(datetime.UTC))


def tunnel_transfer(size: int, *, datagram: int = 1200, limits: Limits | None = None) -> float:
    """CPU seconds to send ``size`` bytes client -> server through a tunnel."""
    limits = limits or Limits()
    server_config = quic_configuration(is_client=False, limits=limits, max_datagram_size=datagram)
    install_identity(server_config, *_IDENTITY)
    endpoint = ServerEndpoint(
        server_config,
        authenticator_factory=lambda peer: listen_authenticator(
            SCHEME_SIMPLE_ACK, peer_name=peer, nonce=bytes(32), limits=limits
        ),
        limits=limits,
        retry=False,
    )
    client_config = quic_configuration(
        is_client=True, limits=limits, server_name="localhost", max_datagram_size=datagram
    )
    client_config.verify_mode = ssl.CERT_NONE
    now = 0.0
    client = TunnelConnection.connect(
        client_config,
        address=SERVER,
        authenticator=connect_authenticator(ClientCredentials.simple_ack(), limits=limits),
        limits=limits,
        now=now,
    )
    state: dict[str, Any] = {
        "stream": None,
        "received": 0,
        "accepted": False,
        "authenticated": False,
    }

    def server_events() -> None:
        while (item := endpoint.next_event()) is not None:
            tunnel, event = item
            if isinstance(event, StreamRequested):
                tunnel.accept_stream(event.stream_id)
                endpoint.mark_dirty(tunnel)
            elif isinstance(event, DataReceived):
                state["received"] += len(event.data)
                tunnel.acknowledge_received_data(event.stream_id, len(event.data))
                endpoint.mark_dirty(tunnel)

    def client_events() -> None:
        while (event := client.next_event()) is not None:
            if isinstance(event, AuthenticationCompleted):
                state["authenticated"] = True
            elif isinstance(event, StreamAccepted):
                state["accepted"] = True
            elif isinstance(event, StreamWritable):
                pass

    sent = 0
    view = memoryview(PATTERN)
    start = time.process_time()
    while state["received"] < size:
        now += TICK
        client_events()
        if state["authenticated"] and state["stream"] is None:
            state["stream"] = client.open_stream(RouteAddress.of("bench"))
        stream_id = state["stream"]
        if state["accepted"] and stream_id is not None:
            while sent < size:
                room = client.send_capacity(stream_id)
                if room < 16 * 1024 and room < size - sent:
                    break
                offset = sent % len(PATTERN)
                chunk = bytes(view[offset : offset + min(room, CHUNK, size - sent)])
                client.send_data(stream_id, chunk)
                sent += len(chunk)
        for data, _ in client.datagrams_to_send(now):
            endpoint.receive_datagram(data, CLIENT, now)
        server_events()
        for data, _ in endpoint.datagrams_to_send(now):
            client.receive_datagram(data, SERVER, now)
        for timer_owner in (client, endpoint):
            timer = timer_owner.get_timer()
            if timer is not None and timer <= now:
                timer_owner.handle_timer(now)
    return time.process_time() - start


def raw_transfer(size: int, *, datagram: int = 1200, send_buffer: int = 256 * 1024) -> float:
    """CPU seconds to send ``size`` bytes between two bare aioquic connections."""
    server_config = AioquicConfiguration(
        is_client=False, alpn_protocols=["bench"], max_datagram_size=datagram
    )
    install_identity(server_config, *_IDENTITY)
    client_config = AioquicConfiguration(
        is_client=True, alpn_protocols=["bench"], max_datagram_size=datagram
    )
    client_config.verify_mode = ssl.CERT_NONE
    now = 0.0
    client = QuicConnection(configuration=client_config)
    server = QuicConnection(
        configuration=server_config,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    client.connect(SERVER, now=now)
    received = sent = 0
    stream_id = client.get_next_available_stream_id()
    view = memoryview(PATTERN)
    start = time.process_time()
    while received < size:
        now += TICK
        while client.next_event() is not None:
            pass
        if handshake_complete(client):
            while sent < size:
                buffered = send_buffered(client, stream_id)
                room = send_buffer - buffered
                if room < 16 * 1024 and room < size - sent:
                    break
                offset = sent % len(PATTERN)
                chunk = bytes(view[offset : offset + min(room, CHUNK, size - sent)])
                client.send_stream_data(stream_id, chunk)
                sent += len(chunk)
        for data, _ in client.datagrams_to_send(now):
            server.receive_datagram(data, CLIENT, now)
        while (event := server.next_event()) is not None:
            if isinstance(event, StreamDataReceived):
                received += len(event.data)
        for data, _ in server.datagrams_to_send(now):
            client.receive_datagram(data, SERVER, now)
        for connection in (client, server):
            timer = connection.get_timer()
            if timer is not None and timer <= now:
                connection.handle_timer(now)
    return time.process_time() - start
