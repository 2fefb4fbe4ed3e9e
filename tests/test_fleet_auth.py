"""Node-to-node links: both nodes prove the fleet secret, bound to the TLS session.

The exchange itself (pumped between the two authenticators, split every way), and the
ALPN choice in a real in-memory QUIC handshake: a tunnel client still gets the tunnel
scheme, a node gets the fleet scheme, a stranger without the secret is refused.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping

import pytest
from cryptography import x509
from netsim import _CERT, Simulation
from test_auth import drain, pump

from snocat_proto._wire.auth import (
    Authenticated,
    Authenticator,
    Rejected,
    TokenConnector,
    TokenListener,
)
from snocat_proto._wire.certificates import generate_self_signed
from snocat_proto._wire.codes import CloseCode
from snocat_proto._wire.engine import ALPN
from snocat_proto._wire.events import AuthenticationCompleted, ConnectionTerminated
from snocat_proto._wire.fleet_auth import (
    FLEET_ALPN,
    SCHEME_FLEET,
    FleetConnector,
    FleetListener,
)
from snocat_proto._wire.limits import Limits

LIMITS = Limits()
SECRET = b"the-fleet-secret-0123456789"
NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)


def certificate() -> x509.Certificate:
    pem, _ = generate_self_signed(["node-a"], now=NOW)
    return x509.load_pem_x509_certificate(pem)


CERT, OTHER_CERT = certificate(), certificate()
#: The netsim server's certificate: the one a fleet link there is bound to.
SERVER_CERT = _CERT[0]


def pair(
    *,
    listener_secret: bytes = SECRET,
    connector_secret: bytes = SECRET,
    seen: x509.Certificate = CERT,
) -> tuple[FleetListener, FleetConnector]:
    listener = FleetListener(
        bytes(range(32)), secret=listener_secret, node="node-a", certificate=CERT, limits=LIMITS
    )
    connector = FleetConnector(
        bytes(range(32, 64)), secret=connector_secret, node="node-b", limits=LIMITS
    )
    connector.handshake_done(peer_certificate=seen)
    return listener, connector


@pytest.mark.parametrize("split", [None, 1, 7])
def test_two_nodes_with_the_secret_authenticate_each_other(split: int | None) -> None:
    def chunker(data: bytes) -> list[bytes]:
        return (
            [data] if split is None else [data[i : i + split] for i in range(0, len(data), split)]
        )

    outcome = pump(*pair(), chunker=chunker)
    assert outcome.listener_events == [Authenticated(name="node-b")]
    assert outcome.connector_events == [Authenticated(name="node-a")]
    assert SECRET not in outcome.listener_sent + outcome.connector_sent
    assert outcome.listener_sent.startswith(b"snocat-fleet-v1".ljust(32, b"\0"))


@pytest.mark.parametrize("who", ["listener", "connector"])
def test_a_node_without_the_secret_is_refused(who: str) -> None:
    wrong = b"another-secret-0123456789"
    if who == "listener":
        listener, connector = pair(listener_secret=wrong)
    else:
        listener, connector = pair(connector_secret=wrong)
    outcome = pump(listener, connector)
    assert isinstance(outcome.listener_events[-1], Rejected)
    assert isinstance(outcome.connector_events[-1], Rejected)
    assert b"not a node of this fleet" in outcome.listener_sent


def test_a_relayed_link_does_not_verify() -> None:
    """The connector saw another certificate (a machine in the middle): the proof it
    makes cannot verify at the real listener, although both know the secret."""
    outcome = pump(*pair(seen=OTHER_CERT))
    assert isinstance(outcome.listener_events[-1], Rejected)
    assert "relayed" in outcome.listener_events[-1].reason


def test_a_token_client_is_not_a_node() -> None:
    listener, _ = pair()
    outcome = pump(listener, TokenConnector("alpha", b"alpha-secret-0123456789", limits=LIMITS))
    assert isinstance(outcome.connector_events[-1], Rejected)
    assert isinstance(outcome.listener_events[-1], Rejected)


@pytest.mark.parametrize(
    "proof",
    [b"[]", b'{"node":"x"}', b'{"node":"a b","nonce":"00","mac":"00"}', b"\xff"],
)
def test_a_malformed_proof_is_refused_not_raised(proof: bytes) -> None:
    listener, _ = pair()
    listener.data_to_send()
    listener.receive_data(len(proof).to_bytes(4, "big") + proof)
    (event,) = drain(listener)
    assert isinstance(event, Rejected)
    assert json.loads(listener.data_to_send()[4:]) == {
        "ok": False,
        "reason": "not a node of this fleet",
    }


def test_short_secrets_are_refused() -> None:
    with pytest.raises(Exception, match="at least 16 bytes"):
        FleetConnector(bytes(32), secret=b"short", node="n", limits=LIMITS)


# The ALPN picks the scheme, in a real handshake -------------------------------------


def fleet_server_auth(peer_name: str) -> Mapping[str, Authenticator]:
    return {
        ALPN: TokenListener(bytes(32), limits=LIMITS),
        FLEET_ALPN: FleetListener(
            bytes(32), secret=SECRET, node="node-a", certificate=SERVER_CERT, limits=LIMITS
        ),
    }


def test_the_alpn_picks_the_scheme() -> None:
    sim = Simulation(
        server_auth=fleet_server_auth,
        client_auth=FleetConnector(bytes(32), secret=SECRET, node="node-b", limits=LIMITS),
        client_alpn=(FLEET_ALPN,),
        server_alpn=(ALPN, FLEET_ALPN),
    )
    sim.run_until(lambda: bool(sim.client_app.of_type(AuthenticationCompleted)), timeout=10)
    (client_auth,) = sim.client_app.of_type(AuthenticationCompleted)
    assert client_auth == AuthenticationCompleted(name="node-a", scheme=SCHEME_FLEET)
    sim.run_until(lambda: bool(sim.server_app.of_type(AuthenticationCompleted)), timeout=10)
    (server_auth,) = sim.server_app.of_type(AuthenticationCompleted)
    assert server_auth == AuthenticationCompleted(name="node-b", scheme=SCHEME_FLEET)


def test_a_stranger_on_the_fleet_alpn_is_refused() -> None:
    sim = Simulation(
        server_auth=fleet_server_auth,
        client_auth=FleetConnector(
            bytes(32), secret=b"not-the-fleet-secret-000", node="stranger", limits=LIMITS
        ),
        client_alpn=(FLEET_ALPN,),
        server_alpn=(ALPN, FLEET_ALPN),
    )
    sim.run_until(lambda: sim.client_app.closed is not None, timeout=10)
    closed = sim.client_app.closed
    assert isinstance(closed, ConnectionTerminated)
    assert closed.code == CloseCode.AUTHENTICATION_FAILED
    assert not sim.server_app.of_type(AuthenticationCompleted)
