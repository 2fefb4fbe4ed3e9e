"""Raw QUIC stream throughput between two processes: the baseline the tunnel is held to.

``python -m bench.raw_quic receive --port P --cert C --key K`` hashes one stream per
connection and answers the SHA-256; ``python -m bench.raw_quic send --port P --bytes N``
writes the pattern (keeping at most ``--send-buffer`` bytes queued, as the tunnel
does), waits for the digest and prints ``{"seconds": ..., "bytes": ..., "cpu": ...}`` (its
own CPU seconds during the transfer).

``--engine aioquic`` (default) or ``qh3`` picks the library; both use their own asyncio
adapters, as an application would.  Windows are each library's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import json
import ssl
import sys
import time
from typing import Any

from bench.common import PATTERN, pattern_digest
from snocat_proto._wire.engine import protocol_connection, send_buffered


def _engine(name: str) -> dict[str, Any]:
    base = {"aioquic": "aioquic", "qh3": "qh3"}[name]
    return {
        "asyncio": importlib.import_module(f"{base}.asyncio"),
        "protocol": importlib.import_module(f"{base}.asyncio.protocol"),
        "configuration": importlib.import_module(f"{base}.quic.configuration"),
        "events": importlib.import_module(f"{base}.quic.events"),
    }


def _send_buffered(quic: Any, stream_id: int) -> int:
    if hasattr(quic, "get_send_buffer_size"):  # qh3
        return int(quic.get_send_buffer_size(stream_id))
    return send_buffered(quic, stream_id)  # aioquic: unacknowledged bytes


async def receive(args: argparse.Namespace) -> None:
    lib = _engine(args.engine)
    events = lib["events"]

    class Receiver(lib["protocol"].QuicConnectionProtocol):  # type: ignore[misc]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self._digests: dict[int, Any] = {}

        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, events.StreamDataReceived):
                digest = self._digests.setdefault(event.stream_id, hashlib.sha256())
                digest.update(event.data)
                if event.end_stream:
                    self._quic.send_stream_data(event.stream_id, digest.digest(), end_stream=True)
                    self.transmit()

    config = lib["configuration"].QuicConfiguration(
        is_client=False, alpn_protocols=["bench"], max_datagram_size=args.max_datagram_size
    )
    config.load_cert_chain(args.cert, args.key)
    await lib["asyncio"].serve(
        "127.0.0.1", args.port, configuration=config, create_protocol=Receiver
    )
    print("ready", flush=True)
    await asyncio.Event().wait()


async def send(args: argparse.Namespace) -> None:
    lib = _engine(args.engine)
    events = lib["events"]

    class Sender(lib["protocol"].QuicConnectionProtocol):  # type: ignore[misc]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.progress = asyncio.Event()
            self.answer = bytearray()
            self.done = asyncio.Event()

        def datagram_received(self, data: Any, addr: Any) -> None:
            super().datagram_received(data, addr)
            self.progress.set()

        def datagrams_received(self, data: Any, addr: Any) -> None:  # qh3 batches
            super().datagrams_received(data, addr)
            self.progress.set()

        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, events.StreamDataReceived):
                self.answer += event.data
                if event.end_stream:
                    self.done.set()

    config = lib["configuration"].QuicConfiguration(
        is_client=True, alpn_protocols=["bench"], max_datagram_size=args.max_datagram_size
    )
    config.verify_mode = ssl.CERT_NONE
    async with lib["asyncio"].connect(
        "127.0.0.1", args.port, configuration=config, create_protocol=Sender
    ) as client:
        quic = protocol_connection(client)
        stream_id = quic.get_next_available_stream_id()
        view = memoryview(PATTERN)
        remaining = args.bytes
        start = time.perf_counter()
        cpu_start = time.process_time()
        while remaining:
            while _send_buffered(quic, stream_id) >= args.send_buffer:
                client.progress.clear()
                await client.progress.wait()
            size = min(remaining, args.chunk, args.send_buffer)
            offset = (args.bytes - remaining) % len(PATTERN)
            chunk = bytes(view[offset : offset + size])
            quic.send_stream_data(stream_id, chunk)
            client.transmit()
            remaining -= len(chunk)
        quic.send_stream_data(stream_id, b"", end_stream=True)
        client.transmit()
        await client.done.wait()
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    if bytes(client.answer) != pattern_digest(args.bytes):
        sys.exit("checksum mismatch")
    print(json.dumps({"seconds": seconds, "bytes": args.bytes, "cpu": cpu}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["receive", "send"])
    parser.add_argument("--engine", choices=["aioquic", "qh3"], default="aioquic")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--bytes", type=int, default=50_000_000)
    parser.add_argument("--chunk", type=int, default=64 * 1024)
    parser.add_argument("--send-buffer", type=int, default=256 * 1024)
    parser.add_argument("--max-datagram-size", type=int, default=1200)
    args = parser.parse_args()
    asyncio.run(receive(args) if args.mode == "receive" else send(args))


if __name__ == "__main__":
    main()
