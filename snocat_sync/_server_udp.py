# Generated from snocat_anyio/_server_udp.py by scripts/unasync.py: do not edit.
"""The aggregator's UDP ports, written once: ``udp-datagrams`` (docs/protocol.md 3.17).

This file is the source of both bindings' UDP serving: ``snocat_sync/_server_udp.py``
is generated from it by ``scripts/unasync.py``.  A ``proxyme`` subject that asks for
``{"udp": true}`` gets a port of the server's UDP range (``ServerConfig.udp_port_range``,
sticky per tunnel name like the TCP ports, its own books in the
:class:`~snocat_proto._service.aggregator.Aggregator`), bound where the TCP ports bind.
Each visitor address on it becomes a flow of the tunnel (``open_flow``); its
datagrams go into the tunnel as QUIC DATAGRAM frames and the replies come back to
the same address from the same socket.  The core decides every bound (flows per
tunnel, the queue while a flow opens, the rate, the size, idle expiry); what is here
is the socket work around it and the books of who is whose.

A flow's datagrams may also come from elsewhere: a fleet's node relays the visitors
of another node to the tunnel here (:meth:`ServerUdp._open_relayed_flow`, with a
``reply`` in place of the socket).

The port goes back to the allocator only once its sockets are closed.  The claim,
the give-back and the release are seams (:meth:`ServerUdp._claim_udp_port`,
:meth:`~ServerUdp._unclaim_udp_port`, :meth:`~ServerUdp._release_udp_port`), as the
TCP ones are, for a fleet's server to claim its UDP ports in the fleet's registry.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable
from typing import Any

from snocat_proto._service import notices
from snocat_proto._service.aggregator import PORT_TAKEN_ERRNOS, PortRefusal
from snocat_proto._service.config import ServerConfig
from snocat_proto._service.refused_visitors import RefusedVisitors
from snocat_proto._service.server_events import ServerEvents
from snocat_proto._wire.codes import StreamCode
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.events import (
    FlowDatagramReceived,
    FlowEnded,
    FlowRequested,
    TunnelEvent,
)
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.network import NetworkAddress, format_host_port
from snocat_proto._wire.proxyme import (
    ProxymeEvent,
    ProxymeRequest,
    ProxymeServer,
    ReleaseRequested,
)
from snocat_proto._wire.targets import TargetKind
from snocat_proto._wire.udp_flows import UdpTarget

from ._backend import LOG_PREFIX, Condition, Lock, UdpSockets, current_time, shield
from ._bind import bind_port
from ._stream import TunnelStream
from ._udp import send_one

__all__ = ["ServerUdp", "UdpLease"]

logger = logging.getLogger(f"{LOG_PREFIX}.server")

#: What a flow's end is called when this side ended it (its port closed).
CLOSED_HERE = "closed"
#: ... and when its tunnel ended (which ends every flow, with no event of its own).
TUNNEL_CLOSED = "tunnel closed"


class UdpFlow:
    """One visitor address on a UDP port: a flow of the tunnel, and its counts."""

    __slots__ = (
        "addr",
        "bytes_in",
        "bytes_out",
        "datagrams_in",
        "datagrams_out",
        "drops",
        "flow_id",
        "key",
        "lease",
        "on_end",
        "reply",
        "sock",
        "visitor",
    )

    def __init__(
        self,
        flow_id: int,
        lease: UdpLease,
        sock: socket.socket | None,
        addr: NetworkAddress,
        key: tuple[object, NetworkAddress],
        *,
        reply: Callable[[bytes], str | None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self.flow_id = flow_id
        self.lease = lease
        self.sock = sock
        self.addr = addr
        self.key = key
        #: Where the tunnel's datagrams go instead of ``sock`` (a relayed flow): a
        #: drop reason if it could not take one.  ``on_end`` is told once it ends.
        self.reply = reply
        self.on_end = on_end
        self.visitor = format_host_port(str(addr[0]).partition("%")[0], int(addr[1]))
        #: From the tunnel (to the visitor) and into it (from the visitor).
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.drops: dict[str, int] = {}

    def counts(self) -> tuple[int, int, int, int]:
        return self.datagrams_in, self.datagrams_out, self.bytes_in, self.bytes_out


class UdpLease:
    """One granted UDP port: its sockets, what it forwards to, and its flows."""

    def __init__(
        self, sockets: UdpSockets, port: int, request: ProxymeRequest, limits: Limits
    ) -> None:
        self.sockets = sockets
        self.port = port
        self.addresses = sockets.addresses
        self.request = request
        #: The target named in each flow's setup (the ``dns`` form, as for TCP: 2.7).
        self.target = UdpTarget(TargetKind.DNS, request.host, request.port)
        #: The flows by visitor (``(socket's fd, address)``; a relayed flow's own key).
        self.flows: dict[tuple[object, NetworkAddress], UdpFlow] = {}
        #: Datagrams dropped outside any flow (a visitor over the flow limit, or held
        #: off after the client refused its flow).
        self.drops: dict[str, int] = {}
        self.refused = RefusedVisitors(
            first=limits.udp_refused_hold,
            maximum=limits.udp_refused_hold_max,
            capacity=limits.udp_refused_remembered,
        )
        self.stopped = False


def _count(drops: dict[str, int], reason: str) -> None:
    drops[reason] = drops.get(reason, 0) + 1


class ServerUdp(ServerEvents[Any, TunnelStream]):
    """The UDP ports of ``ServerCore``; see the module docstring."""

    # What ServerCore has (its constructor sets them).
    config: ServerConfig
    _lock: Lock
    _host: Any
    _ports_changed: Condition
    _port_releases: int

    def _allocate_port(self, *args: Any, **kwargs: Any) -> int | PortRefusal:
        raise NotImplementedError  # ServerCore's: one allocation for both ranges

    @property
    def udp_ports_in_use(self) -> frozenset[int]:
        """Public UDP ports currently granted to tunnels."""
        with self._lock:
            return self._books.udp_ports_in_use

    # The proxyme exchange for a UDP port ------------------------------------------

    def _serve_udp_port(
        self,
        session: Any,
        stream: TunnelStream,
        machine: ProxymeServer,
        pending: list[ProxymeEvent],
        request: ProxymeRequest,
        wanted: int | None,
        next_event: Any,
    ) -> None:
        """Grant a UDP port for ``request`` and hold it until the client releases it
        (or the stream or the tunnel ends).  ``next_event`` reads the next proxyme event."""
        lease: UdpLease | None = None
        try:
            leased = self._lease_udp_port(session, request, wanted)
            if isinstance(leased, PortRefusal):
                stream.sendall(machine.deny(leased.reason, retry=leased.retry))
                self._report(notices.port_denied, session, request, leased.reason, "udp")
                stream.close()
                return
            lease = leased
            stream.sendall(machine.grant(lease.addresses))
            self._udp_port_granted(session, lease)
            event = next_event(stream, machine, pending)
            self._stop_udp_lease(session, lease)
            lease = None
            if isinstance(event, ReleaseRequested):
                stream.sendall(machine.release_ack())
                stream.close()
            else:
                stream.reset(StreamCode.PROTOCOL_VIOLATION)
        finally:
            if lease is not None:
                with shield():
                    self._stop_udp_lease(session, lease)

    def _lease_udp_port(
        self, session: Any, request: ProxymeRequest, wanted: int | None
    ) -> UdpLease | PortRefusal:
        """Claim a UDP port (``wanted``, if the client asked for one) and bind it."""
        refused: set[int] = set()
        bind_host = self.config.tcp_bind or None
        batch = self.config.limits.udp_receive_batch
        while True:
            port = self._claim_udp_port(session, request, wanted, refused)
            if isinstance(port, PortRefusal):
                return port
            try:
                sockets = UdpSockets(bind_port(bind_host, port, socket.SOCK_DGRAM), batch)
            except OSError as exc:
                self._unclaim_udp_port(session, port)
                if exc.errno in PORT_TAKEN_ERRNOS:
                    logger.debug("UDP port %d is not available: %s", port, exc)
                    refused.add(port)
                    continue
                logger.warning("cannot bind %s UDP port %d: %s", bind_host or "*", port, exc)
                return PortRefusal(f"cannot bind UDP port {port}: {exc.strerror or exc}", True)
            except BaseException:
                with shield():
                    self._unclaim_udp_port(session, port)
                raise
            return UdpLease(sockets, port, request, self.config.limits)

    def _claim_udp_port(
        self, session: Any, request: ProxymeRequest, wanted: int | None, refused: set[int]
    ) -> int | PortRefusal:
        """A UDP port for ``request`` (here from the embedded books; a fleet's server
        claims it in the fleet's registry): as :meth:`ServerCore._claim_port`."""
        return self._allocate_port(session, request, wanted, refused, udp=True)

    def _unclaim_udp_port(self, session: Any, port: int) -> None:
        """A claimed UDP port could not be bound: give it back."""
        with self._lock:
            self._books.port_unavailable(port, udp=True)

    def _release_udp_port(self, session: Any, port: int) -> bool:
        """A granted UDP port's sockets are closed: free it (and remember it for the
        name); False if it was never granted."""
        with self._lock:
            return self._books.port_released(session, port, current_time(), udp=True)

    def _udp_port_granted(self, session: Any, lease: UdpLease) -> None:
        """The grant is on its way: book the port and start reading it."""
        with self._lock:
            session.udp_leases[lease.port] = lease
            self._books.port_granted(session, lease.port, lease.request, udp=True)
            accepting = self._books.accepting and not session.closed
        self._report(
            notices.port_granted, session, lease.port, lease.addresses, lease.request, "udp"
        )
        if accepting:
            lease.sockets.start(
                self._host,
                session.tasks,
                functools.partial(self._visitor_datagrams, session, lease),
            )

    def _stop_udp_lease(self, session: Any, lease: UdpLease) -> None:
        """Close the sockets, end the port's flows, then free the port."""
        with self._lock:
            lease.stopped = True
        lease.sockets.close()
        with self._lock:
            session.udp_leases.pop(lease.port, None)
            flows = list(lease.flows.values())
            lease.flows.clear()
            gone = session.closed
            for flow in flows:
                session.udp_flows.pop(flow.flow_id, None)
                if not gone:
                    session.tunnel.close_flow(flow.flow_id)
            if flows and not gone:
                self._flush(session.tunnel)
        for flow in flows:
            self._flow_closed(session, flow, TUNNEL_CLOSED if gone else CLOSED_HERE)
        released = self._release_udp_port(session, lease.port)
        with self._lock:
            self._port_releases += 1
            self._ports_changed.notify_all()
        if lease.drops:
            self._report(
                notices.udp_dropped, session.tunnel_id, lease.port, lease.drops, name=session.name
            )
        if released:
            self._report(notices.port_released, session, lease.port, "udp")

    # Datagrams ------------------------------------------------------------------

    def _visitor_datagrams(
        self,
        session: Any,
        lease: UdpLease,
        sock: socket.socket,
        batch: list[tuple[bytes, NetworkAddress]],
    ) -> None:
        """(Never blocks) Datagrams from visitors on ``lease``'s port: each into its
        visitor's flow, a new flow for a new visitor."""
        opened: list[UdpFlow] = []
        with self._lock:
            tunnel = session.tunnel
            if lease.stopped or session.closed or not tunnel.flows_enabled:
                return
            now = current_time()
            fd = sock.fileno()
            for data, addr in batch:
                key = (fd, addr)
                flow = lease.flows.get(key)
                if flow is None:
                    if lease.refused.held(key, now):
                        _count(lease.drops, "refused")
                        continue
                    try:
                        flow = self._new_flow(session, lease, sock, addr, key, now)
                    except LocalProtocolError as exc:  # the tunnel is closing
                        logger.debug("tunnel %s: no UDP flow: %s", session.tunnel_id, exc)
                        break
                    if flow is None:  # the tunnel has udp_max_flows flows
                        _count(lease.drops, "flow_limit")
                        continue
                    opened.append(flow)
                self._into_flow(tunnel, flow, data, now)
            self._flush(tunnel)
        for flow in opened:
            self._flow_opened(session, flow)

    def _new_flow(
        self,
        session: Any,
        lease: UdpLease,
        sock: socket.socket | None,
        addr: NetworkAddress,
        key: tuple[object, NetworkAddress],
        now: float,
        **relayed: Any,
    ) -> UdpFlow | None:
        """(Under the lock) A new flow of the tunnel for visitor ``addr``, in the books;
        None at the tunnel's flow limit."""
        flow_id = session.tunnel.open_flow(lease.target, (addr[0], addr[1]), now)
        if flow_id is None:
            return None
        flow = UdpFlow(flow_id, lease, sock, addr, key, **relayed)
        lease.flows[key] = flow
        session.udp_flows[flow_id] = flow
        return flow

    def _into_flow(self, tunnel: Any, flow: UdpFlow, data: bytes, now: float) -> None:
        """(Under the lock) A visitor's datagram into its flow, counted."""
        dropped = tunnel.send_flow_datagram(flow.flow_id, data, now)
        if dropped is None:
            flow.datagrams_out += 1
            flow.bytes_out += len(data)
        else:
            _count(flow.drops, dropped.name.lower())

    def _flow_opened(self, session: Any, flow: UdpFlow) -> None:
        self._report(
            notices.udp_flow_opened,
            session.tunnel_id,
            flow.flow_id,
            flow.visitor,
            flow.lease.target,
            name=session.name,
            port=flow.lease.port,
        )

    # Relayed flows (a fleet's nodes) -----------------------------------------------

    def _open_relayed_flow(
        self,
        session: Any,
        port: int,
        key: object,
        addr: NetworkAddress,
        reply: Callable[[bytes], str | None],
        on_end: Callable[[], None],
    ) -> UdpFlow | str:
        """A flow on ``port`` for visitor ``addr`` whose datagrams come from elsewhere
        (:meth:`_relayed_datagrams`) and whose replies go to ``reply``; ``on_end`` is
        told when the flow ends here.  Why not, if there is none."""
        with self._lock:
            lease = session.udp_leases.get(port)
            tunnel = session.tunnel
            if lease is None or lease.stopped or session.closed or not tunnel.flows_enabled:
                return "the port is not served here"
            try:
                flow = self._new_flow(
                    session,
                    lease,
                    None,
                    addr,
                    (key, addr),
                    current_time(),
                    reply=reply,
                    on_end=on_end,
                )
            except LocalProtocolError as exc:  # the tunnel is closing
                return str(exc)
            if flow is None:
                _count(lease.drops, "flow_limit")
                return "the tunnel has as many UDP flows as it may"
            self._flush(tunnel)
        self._flow_opened(session, flow)
        return flow

    def _relayed_datagrams(self, session: Any, flow: UdpFlow, datagrams: list[bytes]) -> None:
        """(Never blocks) A relayed visitor's datagrams into its flow."""
        with self._lock:
            if session.udp_flows.get(flow.flow_id) is not flow or session.closed:
                return
            now = current_time()
            for data in datagrams:
                self._into_flow(session.tunnel, flow, data, now)
            self._flush(session.tunnel)

    def _end_relayed_flow(self, session: Any, flow: UdpFlow, cause: str) -> None:
        """The relay of ``flow`` ended: end the flow here too (if it is still live)."""
        with self._lock:
            if session.udp_flows.get(flow.flow_id) is not flow:
                return
            del session.udp_flows[flow.flow_id]
            flow.lease.flows.pop(flow.key, None)
            if not session.closed:
                session.tunnel.close_flow(flow.flow_id)
                self._flush(session.tunnel)
        self._flow_closed(session, flow, cause)

    def _flow_event(self, session: Any, event: TunnelEvent) -> None:
        """(From the pump) A flow's datagram goes back to its visitor; a flow that
        ended is forgotten (its visitor's next datagram opens a new one)."""
        if isinstance(event, FlowDatagramReceived):
            flow = session.udp_flows.get(event.flow_id)
            if flow is None:
                return
            if flow.reply is not None:
                dropped = flow.reply(event.data)
            elif flow.sock is not None and send_one(flow.sock, event.data, flow.addr):
                dropped = None
            else:
                dropped = "visitor_unreachable"
            if dropped is None:
                flow.datagrams_in += 1
                flow.bytes_in += len(event.data)
            else:
                _count(flow.drops, dropped)
        elif isinstance(event, FlowEnded):
            flow = session.udp_flows.pop(event.flow_id, None)
            if flow is None:
                return
            flow.lease.flows.pop(flow.key, None)
            flow.lease.refused.ended(flow.key, event.cause, current_time())
            self._flow_closed(session, flow, event.cause.value)
        elif isinstance(event, FlowRequested):
            super()._flow_event(session, event)

    def _flow_closed(self, session: Any, flow: UdpFlow, cause: str) -> None:
        on_end, flow.on_end = flow.on_end, None
        if on_end is not None:
            on_end()
        self._report(
            notices.udp_flow_closed,
            session.tunnel_id,
            flow.flow_id,
            flow.visitor,
            flow.lease.target,
            flow.counts(),
            cause,
            flow.drops,
            name=session.name,
            port=flow.lease.port,
        )
