# Generated from snocat_anyio/_client_udp.py by scripts/unasync.py: do not edit.
"""The client's UDP targets, written once: ``udp-datagrams`` (docs/protocol.md 3.17).

This file is the source of both bindings' UDP forwarding: ``snocat_sync/_client_udp.py``
is generated from it by ``scripts/unasync.py``.  Each ``ClientConfig.udp_targets``
entry gets a public UDP port through ``proxyme`` (the client's ordinary port loop,
with ``{"udp": true}``).  Every flow the aggregator then opens names a target: one
the client was configured with is accepted, once a UDP socket of its own is
connected to it, and anything else is refused (an allow-list, as for TCP).  The
flow's datagrams go out on that socket and what comes back on it returns to the
same flow; the socket closes when the flow ends (the core ends idle flows).
"""

from __future__ import annotations

import functools
import logging
import socket
from typing import Any

from snocat_proto._service import notices
from snocat_proto._service.client_events import ClientEvents
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.events import (
    FlowDatagramReceived,
    FlowEnded,
    FlowRequested,
    TunnelEvent,
)
from snocat_proto._wire.network import NetworkAddress, format_host_port
from snocat_proto._wire.tunnel import TunnelConnection
from snocat_proto._wire.udp_flows import UdpTarget

from ._backend import LOG_PREFIX, Lock, UdpSockets, current_time, resolve
from ._stream import TunnelStream
from ._udp import send_one

__all__ = ["ClientFlow", "ClientUdp"]

logger = logging.getLogger(f"{LOG_PREFIX}.client")

#: A flow this side ended (its session stopped).
CLOSED_HERE = "closed"


def _key(target: UdpTarget) -> tuple[str, int]:
    return target.connect_host().lower().rstrip("."), target.port


class ClientFlow:
    """One flow the aggregator opened: its socket to the target and its counts."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "datagrams_in",
        "datagrams_out",
        "drops",
        "flow_id",
        "sock",
        "sockets",
        "target",
        "visitor",
    )

    def __init__(self, flow_id: int, target: UdpTarget, visitor: str) -> None:
        self.flow_id = flow_id
        self.target = target
        self.visitor = visitor
        self.sock: socket.socket | None = None
        self.sockets: UdpSockets | None = None
        #: From the tunnel (to the target) and into it (the target's replies).
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.drops: dict[str, int] = {}

    def counts(self) -> tuple[int, int, int, int]:
        return self.datagrams_in, self.datagrams_out, self.bytes_in, self.bytes_out


def _count(drops: dict[str, int], reason: str) -> None:
    drops[reason] = drops.get(reason, 0) + 1


def _open_target_socket(target: UdpTarget) -> socket.socket:
    """A non-blocking UDP socket connected to ``target`` (its first address)."""
    infos = resolve(target.connect_host(), target.port)
    if not infos:
        raise OSError(f"{target.connect_host()} has no address")
    family, address = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


class ClientUdp(ClientEvents[Any, TunnelStream]):
    """The UDP flows of ``ClientCore``; see the module docstring."""

    # What ClientCore has (its constructor sets them).
    _lock: Lock

    def _init_udp(self) -> None:
        self._udp_allowed = {_key(target) for target in self.config.udp_targets}

    def _flow_event(self, session: Any, tunnel: TunnelConnection, event: TunnelEvent) -> None:
        """(From the pump, never blocking) A flow's setup, datagram or end."""
        if isinstance(event, FlowDatagramReceived):
            flow = session.udp_flows.get(event.flow_id)
            if flow is None or flow.sock is None:
                return
            if send_one(flow.sock, event.data):
                flow.datagrams_in += 1
                flow.bytes_in += len(event.data)
            else:
                _count(flow.drops, "target_unreachable")
        elif isinstance(event, FlowRequested):
            self._flow_requested(session, tunnel, event)
        elif isinstance(event, FlowEnded):
            flow = session.udp_flows.pop(event.flow_id, None)
            if flow is not None:
                self._flow_over(session, flow, event.cause.value)

    def _flow_requested(self, session: Any, tunnel: TunnelConnection, event: FlowRequested) -> None:
        visitor = format_host_port(event.visitor[0], event.visitor[1])
        services = session.services
        reason = None
        if _key(event.target) not in self._udp_allowed:
            reason = f"UDP target {event.target} is not in this client's allow-list"
        elif services is None or session.stopping or session.closed is not None:
            reason = "the client is stopping"
        if reason is not None:
            tunnel.refuse_flow(event.flow_id)
            self._flush(session, tunnel)
            self._report(
                notices.client_stream_refused,
                session.tunnel_id,
                f"udp flow {event.flow_id} from {visitor} to {event.target}",
                reason,
            )
            return
        flow = ClientFlow(event.flow_id, event.target, visitor)
        session.udp_flows[event.flow_id] = flow
        services.spawn(self._start_flow, session, flow, name="udp-flow")

    def _start_flow(self, session: Any, flow: ClientFlow) -> None:
        """Connect the flow's socket, then accept the flow (a target that cannot be
        reached is a refusal, as for TCP)."""
        try:
            sock = _open_target_socket(flow.target)
        except OSError as exc:
            with self._lock:
                live = session.udp_flows.pop(flow.flow_id, None) is not None
                if live and session.closed is None:
                    session.tunnel.refuse_flow(flow.flow_id)
                    self._flush(session, session.tunnel)
            self._report(
                notices.client_stream_refused,
                session.tunnel_id,
                f"udp flow {flow.flow_id} to {flow.target}",
                f"cannot reach {flow.target}: {exc}",
            )
            return
        sockets = UdpSockets([sock], self.config.limits.udp_receive_batch)
        with self._lock:
            live = session.udp_flows.get(flow.flow_id) is flow and session.closed is None
            if live:
                try:
                    session.tunnel.accept_flow(flow.flow_id, current_time())
                except LocalProtocolError as exc:  # the tunnel is closing
                    logger.debug("flow %d vanished before its accept: %s", flow.flow_id, exc)
                    session.udp_flows.pop(flow.flow_id, None)
                    live = False
                else:
                    flow.sock, flow.sockets = sock, sockets
                    self._flush(session, session.tunnel)
        if not live:  # it ended (or the tunnel did) while the socket was made
            sockets.close()
            return
        self._report(
            notices.udp_flow_opened,
            session.tunnel_id,
            flow.flow_id,
            flow.visitor,
            flow.target,
            name=session.name,
        )
        sockets.start(
            session.host, session.services, functools.partial(self._target_datagrams, session, flow)
        )

    def _target_datagrams(
        self,
        session: Any,
        flow: ClientFlow,
        sock: socket.socket,
        batch: list[tuple[bytes, NetworkAddress]],
    ) -> None:
        """(Never blocks) The target's replies: into the flow."""
        with self._lock:
            if session.udp_flows.get(flow.flow_id) is not flow or session.closed is not None:
                return
            tunnel = session.tunnel
            now = current_time()
            for data, _ in batch:
                dropped = tunnel.send_flow_datagram(flow.flow_id, data, now)
                if dropped is None:
                    flow.datagrams_out += 1
                    flow.bytes_out += len(data)
                else:
                    _count(flow.drops, dropped.name.lower())
            self._flush(session, tunnel)

    def _flow_over(self, session: Any, flow: ClientFlow, cause: str) -> None:
        """A flow ended: report it, and close its socket (in a task or thread of its
        own: the pump may not wait for the socket's watcher)."""
        if flow.sockets is not None:
            self._report_flow_closed(session, flow, cause)
            if session.services is not None:
                session.services.spawn(flow.sockets.close, name="udp-flow-close")
            else:
                flow.sockets.stop()

    def _report_flow_closed(self, session: Any, flow: ClientFlow, cause: str) -> None:
        self._report(
            notices.udp_flow_closed,
            session.tunnel_id,
            flow.flow_id,
            flow.visitor,
            flow.target,
            flow.counts(),
            cause,
            flow.drops,
            name=session.name,
        )

    def _end_flows(self, session: Any, cause: str) -> None:
        """The session ends: every flow with it (call without the lock)."""
        with self._lock:
            flows = list(session.udp_flows.values())
            session.udp_flows.clear()
        for flow in flows:
            if flow.sockets is not None:
                flow.sockets.close()
                self._report_flow_closed(session, flow, cause)
