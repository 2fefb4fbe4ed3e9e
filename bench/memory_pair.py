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
from aioquic.quic.events import DatagramFrameReceived, StreamDataReceived

from bench.common import PATTERN
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import (
    SCHEME_SIMPLE_ACK,
    ClientCredentials,
    TokenConnector,
    TokenListener,
    connect_authenticator,
    listen_authenticator,
)
from snocat_proto._wire.certificates import generate_self_signed, install_identity
from snocat_proto._wire.endpoint import ServerEndpoint
from snocat_proto._wire.engine import (
    datagrams_queued,
    handshake_complete,
    quic_configuration,
    send_buffered,
)
from snocat_proto._wire.events import (
    AuthenticationCompleted,
    CredentialRequired,
    DataReceived,
    FlowDatagramReceived,
    FlowOpened,
    FlowRequested,
    StreamAccepted,
    StreamRequested,
    StreamWritable,
)
from snocat_proto._wire.features import FEATURES, UDP_DATAGRAMS
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.targets import TargetKind
from snocat_proto._wire.tunnel import TunnelConnection
from snocat_proto._wire.udp_flows import UdpTarget

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


def datagram_transfer(count: int, *, size: int = 1000, batch: int = 32) -> float:
    """CPU seconds to move ``count`` datagrams of ``size`` bytes
    over one UDP flow, aggregator -> client, through a token tunnel in memory (both
    ends' CPU; ``batch`` datagrams per flush, as a pump reads them).  The rate limits
    are lifted: this measures the core, not the bucket."""
    limits = Limits(udp_datagrams_per_second=1e9, udp_bytes_per_second=1e12)
    features = FEATURES | {UDP_DATAGRAMS}
    secret = b"bench-secret-0123456789"
    server_config = quic_configuration(is_client=False, limits=limits, datagrams=True)
    install_identity(server_config, *_IDENTITY)
    endpoint = ServerEndpoint(
        server_config,
        authenticator_factory=lambda peer: TokenListener(
            bytes(32), limits=limits, features=features
        ),
        limits=limits,
        retry=False,
    )
    client_config = quic_configuration(
        is_client=True, limits=limits, server_name="localhost", datagrams=True
    )
    client_config.verify_mode = ssl.CERT_NONE
    now = 0.0
    client = TunnelConnection.connect(
        client_config,
        address=SERVER,
        authenticator=TokenConnector("bench", secret, limits=limits, features=features),
        limits=limits,
        now=now,
    )
    state: dict[str, Any] = {"tunnel": None, "flow": None, "open": False, "received": 0}

    def drain() -> None:
        while (item := endpoint.next_event()) is not None:
            tunnel, event = item
            if isinstance(event, CredentialRequired):
                tunnel.supply_credential(secret)
            elif isinstance(event, AuthenticationCompleted):
                state["tunnel"] = tunnel
            elif isinstance(event, FlowOpened):
                state["open"] = True
            endpoint.mark_dirty(tunnel)
        while (client_event := client.next_event()) is not None:
            if isinstance(client_event, FlowRequested):
                client.accept_flow(client_event.flow_id, now)
            elif isinstance(client_event, FlowDatagramReceived):
                state["received"] += 1

    def exchange() -> None:
        for data, _ in endpoint.datagrams_to_send(now):
            client.receive_datagram(data, SERVER, now)
        for data, _ in client.datagrams_to_send(now):
            endpoint.receive_datagram(data, CLIENT, now)
        for timer_owner in (client, endpoint):
            timer = timer_owner.get_timer()
            if timer is not None and timer <= now:
                timer_owner.handle_timer(now)

    while not state["open"]:
        now += TICK
        drain()
        tunnel = state["tunnel"]
        if tunnel is not None and state["flow"] is None:
            state["flow"] = tunnel.open_flow(
                UdpTarget(TargetKind.LOCAL, None, 53), ("192.0.2.1", 5353), now
            )
            endpoint.mark_dirty(tunnel)
        for data, _ in client.datagrams_to_send(now):
            endpoint.receive_datagram(data, CLIENT, now)
        exchange()
    tunnel, flow_id, datagram = state["tunnel"], state["flow"], bytes(size)
    sent = 0
    start, started_at = time.process_time(), now
    while state["received"] < count:
        now += TICK
        for _ in range(min(batch, count - sent)):
            if tunnel.send_flow_datagram(flow_id, datagram, now) is not None:
                break  # CONGESTED: the window is full until acknowledgements come
            sent += 1
        endpoint.mark_dirty(tunnel)
        exchange()
        drain()
        if sent >= count and state["received"] < count and now - started_at > 60:
            raise RuntimeError(f"only {state['received']} of {count} datagrams arrived")
    return time.process_time() - start


def raw_datagram_transfer(count: int, *, size: int = 1000, batch: int = 32) -> float:
    """CPU seconds to move ``count`` DATAGRAM frames of ``size`` bytes between two bare
    aioquic connections (the same batches and queue bound as :func:`datagram_transfer`)."""
    configs = []
    for is_client in (False, True):
        config = AioquicConfiguration(
            is_client=is_client, alpn_protocols=["bench"], max_datagram_frame_size=65535
        )
        configs.append(config)
    install_identity(configs[0], *_IDENTITY)
    configs[1].verify_mode = ssl.CERT_NONE
    now = 0.0
    client = QuicConnection(configuration=configs[1])
    server = QuicConnection(
        configuration=configs[0],
        original_destination_connection_id=client.original_destination_connection_id,
    )
    client.connect(SERVER, now=now)
    limit = Limits().udp_send_queue
    received = sent = 0
    datagram = bytes(size)
    start = time.process_time()
    while received < count:
        now += TICK
        for data, _ in client.datagrams_to_send(now):
            server.receive_datagram(data, CLIENT, now)
        while server.next_event() is not None:
            pass
        if handshake_complete(server):
            for _ in range(min(batch, count - sent)):
                if datagrams_queued(server) >= limit:
                    break
                server.send_datagram_frame(datagram)
                sent += 1
        for data, _ in server.datagrams_to_send(now):
            client.receive_datagram(data, SERVER, now)
        while (event := client.next_event()) is not None:
            if isinstance(event, DatagramFrameReceived):
                received += 1
        for connection in (client, server):
            timer = connection.get_timer()
            if timer is not None and timer <= now:
                connection.handle_timer(now)
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
