"""Interop with the snocat 0.8 wire profile, against peers that speak only its bytes.

The peers here use none of snocat's codecs: a plain aioquic ``QuicConnection`` on a
UDP socket in a thread, writing and expecting the exact bytes of the reference's
traces (wire-snocat-0.8.md, "Byte traces").  One plays a snocat 0.8 client against our
SimpleAck aggregator, the other a snocat 0.8 aggregator against our client.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import socket
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from aioquic._buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted, StreamDataReceived
from aioquic.quic.packet import pull_quic_header

from snocat_anyio import TunnelClient, TunnelServer
from snocat_proto._service.config import ClientConfig, ServerConfig
from snocat_proto._service.ports import PortRange
from snocat_proto._wire.auth import ClientCredentials
from snocat_proto._wire.certificates import install_identity
from snocat_proto._wire.targets import ProxyTcpTarget

pytestmark = pytest.mark.anyio

HELLO = b"HELO" + bytes(60)
ANSWER = b"HELO/HELO" + bytes(55)
NYAN = b"NYAN\x00"


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RawPeer(threading.Thread):
    """A QUIC endpoint that hands stream bytes to ``script``; nothing of snocat inside."""

    def __init__(
        self,
        quic: QuicConnection | None,
        sock: socket.socket,
        peer: Any,
        accept: Callable[[bytes], QuicConnection] | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self._quic = quic
        self.accept = accept
        self.sock = sock
        self.peer = peer
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.handshake_done = False
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.script: Callable[[RawPeer], None] = lambda peer: None

    @property
    def quic(self) -> QuicConnection:
        assert self._quic is not None
        return self._quic

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self.quic.send_stream_data(stream_id, data, end_stream=end)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if self._quic is None:  # a server: the first Initial makes the connection
                    select.select([self.sock], [], [], 0.05)
                    try:
                        data, addr = self.sock.recvfrom(65536, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                    assert self.accept is not None
                    header = pull_quic_header(Buffer(data=data), host_cid_length=8)
                    self._quic = self.accept(header.destination_cid)
                    self.peer = addr
                    self.quic.receive_datagram(data, addr, time.monotonic())
                self._transmit()
                timer = self.quic.get_timer()
                timeout = 0.05 if timer is None else max(0.0, min(0.05, timer - time.monotonic()))
                readable, _, _ = select.select([self.sock], [], [], timeout)
                now = time.monotonic()
                if readable:
                    data, addr = self.sock.recvfrom(65536)
                    if self.peer is None:
                        self.peer = addr
                    self.quic.receive_datagram(data, addr, now)
                if timer is not None and timer <= now:
                    self.quic.handle_timer(now)
                while (event := self.quic.next_event()) is not None:
                    if isinstance(event, HandshakeCompleted):
                        self.handshake_done = True
                    elif isinstance(event, StreamDataReceived):
                        self.received[event.stream_id] += event.data
                self.script(self)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _transmit(self) -> None:
        for data, addr in self.quic.datagrams_to_send(time.monotonic()):
            self.sock.sendto(data, addr)


def start_echo_target() -> tuple[socket.socket, int]:
    """A TCP server that answers each connection with the SHA-256 of what it read."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                digest = hashlib.sha256()
                while chunk := conn.recv(65536):
                    digest.update(chunk)
                conn.sendall(digest.hexdigest().encode())

    threading.Thread(target=serve, daemon=True).start()
    return listener, int(listener.getsockname()[1])


def fetch_digest(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return reply


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    with anyio.fail_after(timeout, shield=False):
        while not condition():
            await anyio.sleep(0.02)


async def test_a_snocat_0_8_client_is_served_by_our_simple_ack_aggregator(
    server_identity: Any,
) -> None:
    target, target_port = start_echo_target()
    public = free_port()
    server = TunnelServer(
        ServerConfig(
            certificate_pem=server_identity.certificate_pem,
            private_key_pem=server_identity.private_key_pem,
            quic_port=0,
            auth="simple-ack",
            port_range=PortRange(public, public),
        )
    )
    address = f"/proxyme/0.0.1/127.0.0.1/{target_port}".encode()
    steps: dict[str, Any] = {}

    def client_script(peer: RawPeer) -> None:
        # Exactly the reference client: answer the hello, then ask for a port.
        if "answered" not in steps and len(peer.received[1]) >= 64:
            steps["hello"] = bytes(peer.received[1][:64])
            peer.send(1, ANSWER, end=True)
            peer.send(0, NYAN + frame(address))
            steps["answered"] = True
        if "asked" not in steps and len(peer.received[0]) >= 6:
            steps["nyan"] = bytes(peer.received[0][:6])
            peer.send(0, frame(b'""'))
            steps["asked"] = True
        grant = peer.received[0][6:]
        if (
            "grant" not in steps
            and len(grant) >= 4
            and len(grant) >= 4 + int.from_bytes(grant[:4], "big")
        ):
            steps["grant"] = json.loads(bytes(grant[4:]))
        # Each forwarded connection: the server's stream, answered like the reference.
        for stream_id in [s for s in peer.received if s % 4 == 1 and s != 1]:
            data = peer.received[stream_id]
            key = f"forward-{stream_id}"
            expected = frame(f"/proxy-tcp/dns/127.0.0.1/tcp/{target_port}".encode())
            if key not in steps and len(data) >= len(NYAN) + len(expected):
                steps[key] = bytes(data[: len(NYAN) + len(expected)])
                peer.send(stream_id, NYAN + b"\x00")
                steps[key + "-conn"] = socket.create_connection(("127.0.0.1", target_port))
                steps[key + "-sent"] = len(NYAN) + len(expected)
            if key + "-conn" in steps:
                conn = steps[key + "-conn"]
                body = bytes(data[steps[key + "-sent"] :])
                if body:
                    conn.sendall(body)
                    steps[key + "-sent"] += len(body)
                stream = peer.quic._streams.get(stream_id)
                if stream is not None and stream.receiver.is_finished and key + "-eof" not in steps:
                    conn.shutdown(socket.SHUT_WR)
                    reply = b""
                    while chunk := conn.recv(65536):
                        reply += chunk
                    peer.send(stream_id, reply, end=True)
                    steps[key + "-eof"] = True

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        configuration = QuicConfiguration(
            is_client=True, alpn_protocols=["ms-snocat-1"], verify_mode=ssl.CERT_NONE
        )
        quic = QuicConnection(configuration=configuration)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        quic.connect(server.quic_address, now=time.monotonic())
        peer = RawPeer(quic, sock, server.quic_address)
        peer.script = client_script
        peer.start()
        try:
            await wait_for(lambda: "grant" in steps or peer.error is not None, "grant")
            assert peer.error is None
            assert steps["hello"] == HELLO
            assert steps["nyan"] == NYAN + b"\x00"  # header, then "accepted"
            assert steps["grant"] == [f"127.0.0.1:{public}"]
            payload = os.urandom(300_000)
            reply = await anyio.to_thread.run_sync(fetch_digest, public, payload)
            assert reply == hashlib.sha256(payload).hexdigest().encode()
            forwards = [k for k in steps if k.startswith("forward-") and k.count("-") == 1]
            assert forwards and all(
                steps[k] == NYAN + frame(f"/proxy-tcp/dns/127.0.0.1/tcp/{target_port}".encode())
                for k in forwards
            )
        finally:
            peer.stop.set()
            await anyio.to_thread.run_sync(peer.join, 5)
            sock.close()
            target.close()
            await server.shutdown()
            tg.cancel_scope.cancel()


async def test_our_client_works_against_a_snocat_0_8_aggregator(server_identity: Any) -> None:
    target, target_port = start_echo_target()
    public_text = "127.0.0.1:18080"  # what the reference aggregator grants; nothing listens
    steps: dict[str, Any] = {}
    payload = os.urandom(200_000)

    def aggregator_script(peer: RawPeer) -> None:
        if not peer.handshake_done:
            return
        if "hello" not in steps:
            peer.send(1, HELLO)  # the Listen side's first stream is the auth channel
            steps["hello"] = True
        if "answer" not in steps and len(peer.received[1]) >= 64:
            steps["answer"] = bytes(peer.received[1][:64])
            # Drop the channel; the client may have stopped it already (STOP_SENDING 0).
            with contextlib.suppress(RuntimeError):
                peer.send(1, b"", end=True)
        request = peer.received[0]
        if "request" not in steps and len(request) >= 9:
            length = int.from_bytes(request[5:9], "big")
            if len(request) >= 9 + length:
                steps["request"] = bytes(request[: 9 + length])
                peer.send(0, NYAN + b"\x00")
                steps["subject_at"] = 9 + length
        if "request" in steps and "subject" not in steps:
            rest = request[steps["subject_at"] :]
            if len(rest) >= 4 and len(rest) >= 4 + int.from_bytes(rest[:4], "big"):
                steps["subject"] = bytes(rest)
                peer.send(0, frame(json.dumps([public_text]).encode()))
                # Forward "a TCP connection": a server-opened stream, as the reference does.
                peer.send(5, NYAN + frame(f"/proxy-tcp/dns/127.0.0.1/tcp/{target_port}".encode()))
        forward = peer.received[5]
        if "accepted" not in steps and len(forward) >= 6:
            steps["accepted"] = bytes(forward[:6])
            peer.send(5, payload, end=True)
        stream = peer.quic._streams.get(5)
        if "accepted" in steps and stream is not None and stream.receiver.is_finished:
            steps["reply"] = bytes(forward[6:])

    configuration = QuicConfiguration(is_client=False, alpn_protocols=["ms-snocat-1"])
    install_identity(
        configuration, server_identity.certificate_pem, server_identity.private_key_pem
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    quic_port = int(sock.getsockname()[1])

    def accept(original_cid: bytes) -> QuicConnection:
        return QuicConnection(
            configuration=configuration, original_destination_connection_id=original_cid
        )

    peer = RawPeer(None, sock, None, accept)
    peer.script = aggregator_script
    peer.start()
    client = TunnelClient(
        ClientConfig(
            server_host="127.0.0.1",
            server_port=quic_port,
            server_name="localhost",
            targets=(ProxyTcpTarget.parse_host_port(f"127.0.0.1:{target_port}"),),
            credentials=ClientCredentials.simple_ack(),
            authority_pem=server_identity.certificate_pem,
            reconnect=False,
        )
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await wait_for(lambda: "reply" in steps or peer.error is not None, "reply", 20)
            assert peer.error is None
            assert steps["answer"] == ANSWER
            assert steps["request"] == NYAN + frame(
                f"/proxyme/0.0.1/127.0.0.1/{target_port}".encode()
            )
            assert steps["subject"] == frame(b'""')
            assert await client.wait_granted() == (public_text,)
            assert steps["accepted"] == NYAN + b"\x00"
            assert steps["reply"] == hashlib.sha256(payload).hexdigest().encode()
            tg.cancel_scope.cancel()
    finally:
        peer.stop.set()
        await anyio.to_thread.run_sync(peer.join, 5)
        sock.close()
        target.close()
