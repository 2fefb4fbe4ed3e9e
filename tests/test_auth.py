"""The authentication channel: exact SimpleAck bytes, the token scheme, and robustness.

Peers are pumped in memory; every scenario is also run with the bytes delivered whole,
one at a time and in random chunks, and must come out the same.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snocat_proto._wire import auth
from snocat_proto._wire.auth import (
    HELLO_SIZE,
    SCHEME_SIMPLE_ACK,
    SCHEME_TOKEN,
    SIMPLE_ACK_ANSWER,
    SIMPLE_ACK_HELLO,
    TOKEN_WIRE_NAME,
    Authenticated,
    Authenticator,
    AuthEvent,
    ClientCredentials,
    Rejected,
    SecretRequired,
    SimpleAckConnector,
    SimpleAckListener,
    TokenConnector,
    TokenListener,
    connect_authenticator,
    listen_authenticator,
    validate_tunnel_name,
)
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.features import FEATURES, PROXYME_OPTIONS
from snocat_proto._wire.limits import Limits

LIMITS = Limits()
NONCE = bytes(range(100, 132))
NAME = "edge-01"
SECRET = b"TOP-SECRET-token-value-0123456789"
OTHER_SECRET = b"some-other-secret-value"
PEER = "127.0.0.1:51234"

TOKEN_HELLO = b"snocat-token-v1" + b"\0" * 17 + NONCE
OK_RESULT = b"\x00\x00\x00\x0b" + b'{"ok":true}'
CREDENTIAL_FAILURE_RESULT = (
    b"\x00\x00\x00\x3a" + b'{"ok":false,"reason":"unknown tunnel name or wrong token"}'
)

REASON_CONNECT_WANTS_SIMPLE_ACK = (
    "the aggregator requires token authentication; configure a token for this client"
)
REASON_CONNECT_WANTS_TOKEN = (
    "the aggregator offers only SimpleAck (no credentials); this client requires token "
    "authentication: run the aggregator with token auth, or use --auth simple-ack to accept it"
)
REASON_LISTEN_GOT_SIMPLE_ACK = (
    "peer answered with SimpleAck (a snocat 0.8 client?); this aggregator requires token "
    "authentication"
)

Chunker = Callable[[bytes], list[bytes]]
Decide = Callable[[TokenListener, str], None]


# --------------------------------------------------------------------------- helpers


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_chunker(rng: random.Random) -> Chunker:
    def chunk(data: bytes) -> list[bytes]:
        pieces = []
        while data:
            size = rng.randint(1, max(1, min(len(data), 80)))
            pieces.append(data[:size])
            data = data[size:]
        return pieces

    return chunk


def drain(authenticator: Authenticator) -> list[AuthEvent]:
    events = []
    while (event := authenticator.next_event()) is not None:
        events.append(event)
    return events


def feed(authenticator: Authenticator, data: bytes, chunker: Chunker = whole) -> None:
    for piece in chunker(data):
        authenticator.receive_data(piece)


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def expected_mac(secret: bytes, nonce: bytes, name: str) -> str:
    message = b"snocat-token-v1\x00" + nonce + name.encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def token_response(name: str = NAME, secret: bytes = SECRET, nonce: bytes = NONCE) -> bytes:
    body = {"name": name, "mac": expected_mac(secret, nonce, name)}
    return frame(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())


def reference_connector_answer(hello: bytes) -> bytes:
    """What the snocat 0.8 Connect side answers to any 64-byte hello: ``S/S`` padded."""
    end = hello.find(b"\0")
    text = hello[:end] if end >= 0 else hello[:32]
    return (text + b"/" + text).ljust(64, b"\0")


def supply_known(listener: TokenListener, name: str) -> None:
    listener.supply_credential(SECRET if name == NAME else None)


def rejected_reason(events: list[AuthEvent]) -> str:
    assert events, "no event"
    last = events[-1]
    assert isinstance(last, Rejected), events
    return last.reason


@dataclass
class Outcome:
    listener_events: list[AuthEvent] = field(default_factory=list)
    connector_events: list[AuthEvent] = field(default_factory=list)
    listener_sent: bytes = b""
    connector_sent: bytes = b""


def pump(
    listener: Authenticator,
    connector: Authenticator,
    *,
    decide: Decide = supply_known,
    chunker: Chunker = whole,
) -> Outcome:
    """Shuttle bytes both ways; a side that has finished closes its end (EOF)."""
    outcome = Outcome()
    listener_sent, connector_sent = bytearray(), bytearray()
    eof_to_connector = eof_to_listener = False
    for _ in range(50):
        progressed = False
        data = listener.data_to_send()
        if data:
            listener_sent += data
            feed(connector, data, chunker)
            progressed = True
        if listener.is_finished and not eof_to_connector:
            connector.receive_eof()
            eof_to_connector = progressed = True
        data = connector.data_to_send()
        if data:
            connector_sent += data
            feed(listener, data, chunker)
            progressed = True
        if connector.is_finished and not eof_to_listener:
            listener.receive_eof()
            eof_to_listener = progressed = True
        for event in drain(listener):
            outcome.listener_events.append(event)
            progressed = True
            if isinstance(event, SecretRequired):
                assert isinstance(listener, TokenListener)
                decide(listener, event.name)
        for event in drain(connector):
            outcome.connector_events.append(event)
            progressed = True
        if not progressed:
            break
    else:  # pragma: no cover
        raise AssertionError("the exchange did not settle")
    outcome.listener_sent = bytes(listener_sent)
    outcome.connector_sent = bytes(connector_sent)
    return outcome


def token_pair(
    name: str = NAME,
    secret: bytes = SECRET,
    limits: Limits = LIMITS,
    *,
    features: frozenset[str] = frozenset(),
    listener_features: frozenset[str] | None = None,
) -> tuple[TokenListener, TokenConnector]:
    """A listener and a connector; by default offering no wire additions, so their
    bytes are the base exchange (docs/protocol.md 3.1)."""
    listener = TokenListener(
        NONCE, limits=limits, features=features if listener_features is None else listener_features
    )
    return listener, TokenConnector(name, secret, limits=limits, features=features)


# --------------------------------------------------------------------------- SimpleAck bytes


def test_simple_ack_listener_sends_exactly_helo_and_60_nuls() -> None:
    listener = SimpleAckListener(PEER)
    assert listener.scheme == SCHEME_SIMPLE_ACK
    assert listener.data_to_send() == b"HELO" + b"\0" * 60
    assert listener.data_to_send() == b""
    assert SIMPLE_ACK_HELLO == b"HELO" + b"\0" * 60
    assert listener.next_event() is None
    assert not listener.is_finished


def test_simple_ack_connector_answers_helo_slash_helo_and_55_nuls() -> None:
    connector = SimpleAckConnector()
    assert connector.data_to_send() == b""
    connector.receive_data(b"HELO" + b"\0" * 60)
    assert connector.data_to_send() == b"HELO/HELO" + b"\0" * 55
    assert SIMPLE_ACK_ANSWER == b"HELO/HELO" + b"\0" * 55
    assert drain(connector) == [Authenticated(name="")]
    assert connector.is_finished


def test_simple_ack_listener_accepts_the_exact_answer_and_names_the_peer() -> None:
    listener = SimpleAckListener(PEER)
    listener.receive_data(b"HELO/HELO" + b"\0" * 55)
    assert drain(listener) == [Authenticated(name=PEER)]
    assert listener.is_finished
    assert listener.data_to_send() == SIMPLE_ACK_HELLO  # nothing besides the hello


def test_simple_ack_listener_checks_only_the_prefix_like_the_reference() -> None:
    listener = SimpleAckListener(PEER)
    listener.receive_data(b"HELO/HELO\0" + b"x" * 54)
    assert drain(listener) == [Authenticated(name=PEER)]


@pytest.mark.parametrize(
    "answer",
    [
        b"HELO/HELX" + b"\0" * 55,
        b"HELO/HELOx" + b"\0" * 54,
        b"HELO/HELO" + b"x" * 55,
        b"helo/helo" + b"\0" * 55,
        b"\0" * 64,
        b"\xff" * 64,
        b"\x00\x00\x00\x3c" + b"{" * 60,
    ],
)
def test_simple_ack_listener_rejects_variants(answer: bytes) -> None:
    listener = SimpleAckListener(PEER)
    listener.receive_data(answer)
    reason = rejected_reason(drain(listener))
    assert "SimpleAck" in reason
    assert listener.is_finished
    assert listener.data_to_send() == SIMPLE_ACK_HELLO  # SimpleAck has no failure message


def test_simple_ack_listener_names_an_answer_to_a_different_hello() -> None:
    listener = SimpleAckListener(PEER)
    listener.receive_data(reference_connector_answer(TOKEN_HELLO))
    reason = rejected_reason(drain(listener))
    assert "different hello" in reason
    assert "'snocat-token-v1'" in reason


@pytest.mark.parametrize("size", [0, 1, 9, 63])
def test_simple_ack_listener_rejects_a_short_answer_at_eof(size: int) -> None:
    listener = SimpleAckListener(PEER)
    listener.receive_data(SIMPLE_ACK_ANSWER[:size])
    assert drain(listener) == []
    listener.receive_eof()
    reason = rejected_reason(drain(listener))
    assert f"after {size} of 64 bytes" in reason or (size == 0 and "without answering" in reason)


def test_simple_ack_listener_ignores_bytes_after_the_answer() -> None:
    listener = SimpleAckListener(PEER)
    listener.receive_data(SIMPLE_ACK_ANSWER + b"trailing garbage")
    assert drain(listener) == [Authenticated(name=PEER)]


def test_simple_ack_connector_accepts_helo_with_garbage_after_the_nul() -> None:
    connector = SimpleAckConnector()
    connector.receive_data(b"HELO\0" + b"z" * 59)
    assert connector.data_to_send() == SIMPLE_ACK_ANSWER
    assert drain(connector) == [Authenticated(name="")]


@pytest.mark.parametrize(
    "hello",
    [
        b"HELLO".ljust(64, b"\0"),
        b"X" * 64,  # no NUL: the reference would take the first 32 bytes as S
        b"\0" * 64,
        b"HELO/".ljust(64, b"\0"),
    ],
)
def test_simple_ack_connector_strictly_rejects_unknown_hellos(hello: bytes) -> None:
    connector = SimpleAckConnector()
    connector.receive_data(hello)
    assert "unknown hello" in rejected_reason(drain(connector))
    assert connector.data_to_send() == b""


def test_simple_ack_connector_rejects_the_token_hello_and_sends_nothing() -> None:
    connector = SimpleAckConnector()
    connector.receive_data(TOKEN_HELLO)
    assert drain(connector) == [Rejected(reason=REASON_CONNECT_WANTS_SIMPLE_ACK)]
    assert connector.data_to_send() == b""


@pytest.mark.parametrize("size", [0, 4, 63])
def test_simple_ack_connector_rejects_a_short_hello_at_eof(size: int) -> None:
    connector = SimpleAckConnector()
    connector.receive_data(SIMPLE_ACK_HELLO[:size])
    connector.receive_eof()
    assert f"after {size} of 64 bytes" in rejected_reason(drain(connector))


def test_simple_ack_pair_authenticates() -> None:
    outcome = pump(SimpleAckListener(PEER), SimpleAckConnector())
    assert outcome.listener_events == [Authenticated(name=PEER)]
    assert outcome.connector_events == [Authenticated(name="")]
    assert outcome.listener_sent == SIMPLE_ACK_HELLO
    assert outcome.connector_sent == SIMPLE_ACK_ANSWER


# --------------------------------------------------------------------------- token scheme


def test_token_wire_bytes_are_exact() -> None:
    listener, connector = token_pair()
    assert listener.scheme == connector.scheme == SCHEME_TOKEN
    hello = listener.data_to_send()
    assert hello == TOKEN_HELLO
    assert len(hello) == HELLO_SIZE
    assert hello[:32] == TOKEN_WIRE_NAME.encode().ljust(32, b"\0")

    connector.receive_data(hello)
    response = connector.data_to_send()
    mac = expected_mac(SECRET, NONCE, NAME)
    body = b'{"name":"edge-01","mac":"' + mac.encode() + b'"}'
    assert response == len(body).to_bytes(4, "big") + body
    assert drain(connector) == []

    listener.receive_data(response)
    assert drain(listener) == [SecretRequired(name=NAME)]
    assert listener.claimed_name == NAME
    assert listener.data_to_send() == b""
    listener.supply_credential(SECRET)
    assert listener.data_to_send() == OK_RESULT
    assert drain(listener) == [Authenticated(name=NAME)]

    connector.receive_data(OK_RESULT)
    assert drain(connector) == [Authenticated(name=NAME)]
    assert listener.is_finished and connector.is_finished


def test_wire_additions_are_agreed_in_the_token_exchange() -> None:
    """The connector lists what it speaks, the listener answers with what both do
    (docs/protocol.md 3.12); both report the same set."""
    options = frozenset({PROXYME_OPTIONS})
    listener, connector = token_pair(features=options)
    connector.receive_data(listener.data_to_send())
    response = connector.data_to_send()
    mac = expected_mac(SECRET, NONCE, NAME)
    body = b'{"name":"edge-01","mac":"' + mac.encode() + b'","features":["proxyme-options"]}'
    assert response == len(body).to_bytes(4, "big") + body
    listener.receive_data(response)
    drain(listener)
    listener.supply_credential(SECRET)
    result = b'{"ok":true,"features":["proxyme-options"]}'
    assert listener.data_to_send() == len(result).to_bytes(4, "big") + result
    assert drain(listener) == [Authenticated(name=NAME, features=options)]
    connector.receive_data(len(result).to_bytes(4, "big") + result)
    assert drain(connector) == [Authenticated(name=NAME, features=options)]


def test_the_default_additions_are_listed_sorted() -> None:
    """What our sides offer by default (docs/protocol.md 3.12), byte for byte."""
    listener, connector = token_pair(features=FEATURES)
    connector.receive_data(listener.data_to_send())
    response = connector.data_to_send()
    listed = b'"features":["by-name","proxyme-options","visitor-address"]}'
    assert response.endswith(listed)
    listener.receive_data(response)
    drain(listener)
    listener.supply_credential(SECRET)
    result = b'{"ok":true,"features":["by-name","proxyme-options","visitor-address"]}'
    assert listener.data_to_send() == len(result).to_bytes(4, "big") + result
    assert drain(listener) == [Authenticated(name=NAME, features=FEATURES)]


@pytest.mark.parametrize(
    ("offered", "supported", "agreed"),
    [
        (FEATURES | {"x-later"}, FEATURES, FEATURES),  # only common ones
        (FEATURES, frozenset(), frozenset()),  # an older aggregator: the base bytes
        (frozenset(), FEATURES, frozenset()),  # an older client: nothing is offered
    ],
)
def test_only_what_both_sides_speak_is_agreed(
    offered: frozenset[str], supported: frozenset[str], agreed: frozenset[str]
) -> None:
    outcome = pump(*token_pair(features=offered, listener_features=supported))
    assert outcome.listener_events[-1] == Authenticated(name=NAME, features=agreed)
    assert outcome.connector_events == [Authenticated(name=NAME, features=agreed)]
    if not agreed:
        assert outcome.listener_sent == TOKEN_HELLO + OK_RESULT


def test_an_aggregator_cannot_turn_on_what_the_client_did_not_offer() -> None:
    _, connector = token_pair(features=frozenset())
    connector.receive_data(TOKEN_HELLO)
    connector.data_to_send()
    result = b'{"ok":true,"features":["proxyme-options"]}'
    connector.receive_data(len(result).to_bytes(4, "big") + result)
    assert drain(connector) == [Authenticated(name=NAME, features=frozenset())]


@pytest.mark.parametrize(
    "member",
    ['"proxyme-options"', "[1]", '["' + "x" * 65 + '"]', "[" + ",".join(['"a"'] * 33) + "]"],
)
def test_a_malformed_features_member_counts_as_none(member: str) -> None:
    listener, _ = token_pair(listener_features=FEATURES)
    listener.data_to_send()
    mac = expected_mac(SECRET, NONCE, NAME)
    body = ('{"name":"edge-01","mac":"' + mac + '","features":' + member + "}").encode()
    listener.receive_data(len(body).to_bytes(4, "big") + body)
    drain(listener)
    listener.supply_credential(SECRET)
    assert listener.data_to_send() == OK_RESULT
    assert drain(listener) == [Authenticated(name=NAME, features=frozenset())]


def test_token_pair_authenticates() -> None:
    outcome = pump(*token_pair())
    assert outcome.listener_events == [SecretRequired(name=NAME), Authenticated(name=NAME)]
    assert outcome.connector_events == [Authenticated(name=NAME)]
    assert outcome.listener_sent == TOKEN_HELLO + OK_RESULT
    assert outcome.connector_sent == token_response()


def test_token_pair_with_non_ascii_name_sends_raw_utf8() -> None:
    name = "café-Ω-🙂"
    outcome = pump(*token_pair(name=name), decide=lambda lst, _: lst.supply_credential(SECRET))
    assert outcome.connector_events == [Authenticated(name=name)]
    assert name.encode("utf-8") in outcome.connector_sent


def test_token_listener_accepts_json_escapes_and_extra_keys() -> None:
    name = "café"
    body = {"mac": expected_mac(SECRET, NONCE, name), "name": name, "future": [1, 2]}
    listener = TokenListener(NONCE, limits=LIMITS)
    listener.receive_data(frame(json.dumps(body, indent=2).encode()))  # \u00e9, spaces
    assert drain(listener) == [SecretRequired(name=name)]
    listener.supply_credential(SECRET)
    assert drain(listener) == [Authenticated(name=name)]


def test_longest_name_of_four_byte_characters_fits_the_default_limit() -> None:
    name = "🙂" * 128
    validate_tunnel_name(name)
    outcome = pump(*token_pair(name=name), decide=lambda lst, _: lst.supply_credential(SECRET))
    assert outcome.connector_events == [Authenticated(name=name)]


def test_wrong_secret_is_rejected_on_both_sides() -> None:
    outcome = pump(*token_pair(secret=OTHER_SECRET))
    assert outcome.listener_events[0] == SecretRequired(name=NAME)
    listener_reason = rejected_reason(outcome.listener_events)
    assert listener_reason.startswith("tunnel 'edge-01': ")
    assert "unknown tunnel name or a wrong token" in listener_reason
    assert outcome.connector_events == [
        Rejected(reason="aggregator refused the credentials: unknown tunnel name or wrong token")
    ]
    assert outcome.listener_sent == TOKEN_HELLO + CREDENTIAL_FAILURE_RESULT


def test_unknown_name_looks_exactly_like_a_wrong_secret() -> None:
    wrong = pump(*token_pair(secret=OTHER_SECRET))
    unknown = pump(*token_pair(), decide=lambda lst, _: lst.supply_credential(None))
    assert unknown.listener_sent == wrong.listener_sent
    assert unknown.listener_events == wrong.listener_events
    assert unknown.connector_events == wrong.connector_events


def test_unknown_name_fails_even_if_the_client_uses_the_dummy_secret() -> None:
    outcome = pump(*token_pair(secret=bytes(32)), decide=lambda lst, _: lst.supply_credential(None))
    assert isinstance(outcome.listener_events[-1], Rejected)
    assert isinstance(outcome.connector_events[-1], Rejected)


@pytest.mark.parametrize("credential", [SECRET, OTHER_SECRET, None])
def test_mac_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, credential: bytes | None
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # auth looks it up per call
    pump(*token_pair(), decide=lambda lst, _: lst.supply_credential(credential))
    assert len(calls) == 1
    assert all(len(side) == 32 for side in calls[0])


def test_application_reject_refuses_a_known_name() -> None:
    outcome = pump(*token_pair(), decide=lambda lst, _: lst.reject("tunnel limit reached"))
    assert outcome.listener_events[-1] == Rejected(
        reason="tunnel 'edge-01' refused by this aggregator: tunnel limit reached"
    )
    assert outcome.connector_events == [
        Rejected(reason="aggregator refused the credentials: tunnel limit reached")
    ]
    body = b'{"ok":false,"reason":"tunnel limit reached"}'
    assert outcome.listener_sent == TOKEN_HELLO + frame(body)


def test_application_reject_before_the_response_arrives() -> None:
    listener, connector = token_pair()
    connector.receive_data(listener.data_to_send())
    listener.reject("shutting down")
    assert drain(listener) == [Rejected(reason="client refused by this aggregator: shutting down")]
    connector.receive_data(listener.data_to_send())
    assert drain(connector) == [
        Rejected(reason="aggregator refused the credentials: shutting down")
    ]
    listener.receive_data(connector.data_to_send())  # ignored: finished
    assert drain(listener) == []


def test_reject_reason_is_sanitized_and_truncated_on_the_wire() -> None:
    listener, connector = token_pair()
    connector.receive_data(listener.data_to_send())
    listener.receive_data(connector.data_to_send())
    drain(listener)
    listener.reject("line one\nline two\x1b[31m" + "x" * 500)
    result = listener.data_to_send()
    reason = json.loads(result[4:])["reason"]
    assert len(reason) == auth.MAX_REASON_LENGTH
    assert reason.startswith("line one?line two?[31mxxx")
    assert reason.isprintable()
    connector.receive_data(result)
    shown = rejected_reason(drain(connector))
    assert shown.isprintable()


def test_connector_sanitizes_and_truncates_the_peer_reason() -> None:
    connector = TokenConnector(NAME, SECRET, limits=LIMITS)
    connector.receive_data(TOKEN_HELLO)
    connector.data_to_send()
    nasty = "\x07bell\r\nfake log line\u202e" + "y" * 900
    connector.receive_data(frame(json.dumps({"ok": False, "reason": nasty}).encode()))
    reason = rejected_reason(drain(connector))
    prefix = "aggregator refused the credentials: "
    assert reason.startswith(prefix + "?bell??fake log line?")
    assert len(reason) == len(prefix) + auth.MAX_REASON_LENGTH
    assert reason.isprintable()


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (b'{"ok":false}', "aggregator refused the credentials: (no reason given)"),
        (b'{"ok":false,"reason":7}', "aggregator refused the credentials: (no reason given)"),
    ],
)
def test_connector_refusal_without_a_usable_reason(result: bytes, expected: str) -> None:
    connector = TokenConnector(NAME, SECRET, limits=LIMITS)
    connector.receive_data(TOKEN_HELLO + frame(result))
    assert drain(connector) == [Rejected(reason=expected)]


@pytest.mark.parametrize(
    "result",
    [
        b'{"ok":1}',
        b'{"ok":"true"}',
        b"{}",
        b"[true]",
        b"true",
        b"",
        b"\xff\xfe",
        b'{"ok":true',
        b"[" * 900,
    ],
)
def test_connector_rejects_a_malformed_result(result: bytes) -> None:
    connector = TokenConnector(NAME, SECRET, limits=LIMITS)
    connector.receive_data(TOKEN_HELLO + frame(result))
    assert "token result is not" in rejected_reason(drain(connector))


def test_connector_rejects_an_oversized_result_from_its_header_alone() -> None:
    connector = TokenConnector(NAME, SECRET, limits=LIMITS)
    connector.receive_data(TOKEN_HELLO + (LIMITS.max_auth_message_size + 1).to_bytes(4, "big"))
    assert "token result frame announces 1025 bytes" in rejected_reason(drain(connector))


def test_connector_rejects_eof_before_the_result() -> None:
    connector = TokenConnector(NAME, SECRET, limits=LIMITS)
    connector.receive_data(TOKEN_HELLO + OK_RESULT[:5])
    connector.receive_eof()
    assert "before sending the token result" in rejected_reason(drain(connector))


def test_connector_ignores_bytes_after_the_result() -> None:
    connector = TokenConnector(NAME, SECRET, limits=LIMITS)
    connector.receive_data(TOKEN_HELLO + OK_RESULT + b"more")
    assert drain(connector) == [Authenticated(name=NAME)]
    connector.receive_data(b"even more")
    connector.receive_eof()
    assert drain(connector) == []


def test_connector_rejects_a_malformed_token_hello() -> None:
    connector = TokenConnector(NAME, SECRET, limits=LIMITS)
    connector.receive_data(b"snocat-token-v1\0junk".ljust(32, b"\0") + NONCE)
    assert "hello is malformed" in rejected_reason(drain(connector))
    assert connector.data_to_send() == b""


def test_connector_rejects_an_unknown_hello() -> None:
    connector = TokenConnector(NAME, SECRET, limits=LIMITS)
    connector.receive_data(b"snocat-token-v2".ljust(64, b"\0"))
    reason = rejected_reason(drain(connector))
    assert "unknown hello ('snocat-token-v2')" in reason
    assert connector.data_to_send() == b""


# --------------------------------------------------------------------------- mismatches


def test_token_client_refuses_a_simple_ack_aggregator() -> None:
    outcome = pump(SimpleAckListener(PEER), TokenConnector(NAME, SECRET, limits=LIMITS))
    assert outcome.connector_events == [Rejected(reason=REASON_CONNECT_WANTS_TOKEN)]
    assert outcome.connector_sent == b""
    assert "without answering the SimpleAck hello" in rejected_reason(outcome.listener_events)


def test_simple_ack_client_refuses_a_token_aggregator() -> None:
    outcome = pump(TokenListener(NONCE, limits=LIMITS), SimpleAckConnector())
    assert outcome.connector_events == [Rejected(reason=REASON_CONNECT_WANTS_SIMPLE_ACK)]
    assert outcome.connector_sent == b""
    assert "before a complete token response" in rejected_reason(outcome.listener_events)


def test_token_aggregator_recognizes_a_reference_0_8_client() -> None:
    listener = TokenListener(NONCE, limits=LIMITS)
    answer = reference_connector_answer(listener.data_to_send())
    assert answer == b"snocat-token-v1/snocat-token-v1".ljust(64, b"\0")
    listener.receive_data(answer)
    assert drain(listener) == [Rejected(reason=REASON_LISTEN_GOT_SIMPLE_ACK)]
    assert listener.data_to_send() == frame(
        b'{"ok":false,"reason":"SimpleAck answer to a token hello"}'
    )


def test_simple_ack_aggregator_works_with_a_reference_0_8_client() -> None:
    listener = SimpleAckListener(PEER)
    listener.receive_data(reference_connector_answer(listener.data_to_send()))
    assert drain(listener) == [Authenticated(name=PEER)]


# --------------------------------------------------------------------------- token listener input


def response_with(body: object) -> bytes:
    return frame(json.dumps(body).encode())


GOOD_MAC = expected_mac(SECRET, NONCE, NAME)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"not json", "is not a UTF-8 JSON object"),
        (b"\xff\xfe{}", "is not a UTF-8 JSON object"),
        (b"\xef\xbb\xbf{}", "is not a UTF-8 JSON object"),
        (b"[1,2]", "is not a UTF-8 JSON object"),
        (b"", "is not a UTF-8 JSON object"),
        (b"1" * 1000, "is not a UTF-8 JSON object"),
        (json.dumps({"mac": GOOD_MAC}).encode(), 'has no "name" string'),
        (json.dumps({"name": 5, "mac": GOOD_MAC}).encode(), 'has no "name" string'),
        (json.dumps({"name": NAME}).encode(), 'has no "mac"'),
        (json.dumps({"name": NAME, "mac": GOOD_MAC.upper()}).encode(), 'has no "mac"'),
        (json.dumps({"name": NAME, "mac": GOOD_MAC[:-1]}).encode(), 'has no "mac"'),
        (json.dumps({"name": NAME, "mac": GOOD_MAC + "0"}).encode(), 'has no "mac"'),
        (json.dumps({"name": NAME, "mac": "g" * 64}).encode(), 'has no "mac"'),
        (json.dumps({"name": NAME, "mac": list(GOOD_MAC)}).encode(), 'has no "mac"'),
        (json.dumps({"name": "a/b", "mac": GOOD_MAC}).encode(), "invalid tunnel name"),
        (json.dumps({"name": "", "mac": GOOD_MAC}).encode(), "invalid tunnel name"),
        (json.dumps({"name": "a b", "mac": GOOD_MAC}).encode(), "invalid tunnel name"),
        (json.dumps({"name": "\ud800", "mac": GOOD_MAC}).encode(), "invalid tunnel name"),
        (json.dumps({"name": "x" * 129, "mac": GOOD_MAC}).encode(), "invalid tunnel name"),
    ],
)
def test_token_listener_rejects_malformed_responses(payload: bytes, problem: str) -> None:
    listener = TokenListener(NONCE, limits=LIMITS)
    listener.data_to_send()
    listener.receive_data(frame(payload))
    reason = rejected_reason(drain(listener))
    assert problem in reason
    sent = listener.data_to_send()
    result = json.loads(sent[4:])
    assert sent[:4] == (len(sent) - 4).to_bytes(4, "big")
    assert result["ok"] is False
    assert result["reason"].startswith("malformed token response: ")


def test_token_listener_survives_deep_nesting() -> None:
    limits = Limits(max_auth_message_size=300_000)
    listener = TokenListener(NONCE, limits=limits)
    listener.receive_data(frame(b"[" * 200_000))
    assert "is not a UTF-8 JSON object" in rejected_reason(drain(listener))


def test_token_listener_rejects_an_oversized_response_from_its_header_alone() -> None:
    listener = TokenListener(NONCE, limits=LIMITS)
    listener.data_to_send()
    listener.receive_data((1025).to_bytes(4, "big"))
    reason = rejected_reason(drain(listener))
    assert "frame announces 1025 bytes, more than the limit of 1024" in reason
    assert listener.data_to_send() == frame(b'{"ok":false,"reason":"token response too large"}')


def test_token_listener_rejects_bytes_after_the_response() -> None:
    listener = TokenListener(NONCE, limits=LIMITS)
    listener.data_to_send()
    listener.receive_data(token_response() + b"!")
    events = drain(listener)
    assert events[0] == SecretRequired(name=NAME)
    assert "unexpected bytes after its token response" in rejected_reason(events)
    listener.supply_credential(SECRET)  # the app answers late: harmless
    assert drain(listener) == []
    result = json.loads(listener.data_to_send()[4:])
    assert result == {"ok": False, "reason": "unexpected bytes after the token response"}


def test_token_listener_accepts_eof_after_a_complete_response() -> None:
    listener = TokenListener(NONCE, limits=LIMITS)
    listener.receive_data(token_response())
    listener.receive_eof()
    assert drain(listener) == [SecretRequired(name=NAME)]
    listener.supply_credential(SECRET)
    assert drain(listener) == [Authenticated(name=NAME)]


def test_token_listener_rejects_eof_inside_the_response() -> None:
    listener = TokenListener(NONCE, limits=LIMITS)
    listener.receive_data(token_response()[:30])
    listener.receive_eof()
    assert "after 30 byte(s)" in rejected_reason(drain(listener))


def test_token_listener_waits_while_bytes_may_be_a_reference_answer() -> None:
    listener = TokenListener(NONCE, limits=LIMITS)
    listener.receive_data(b"snocat-token-v1/snocat-token-v")
    assert drain(listener) == []
    listener.receive_data(b"2")  # diverges: now judged as a frame header
    assert "frame announces" in rejected_reason(drain(listener))


# --------------------------------------------------------------------------- API misuse


def test_supply_credential_before_credential_required_is_misuse() -> None:
    listener = TokenListener(NONCE, limits=LIMITS)
    with pytest.raises(LocalProtocolError):
        listener.supply_credential(SECRET)


def test_supply_credential_twice_is_misuse() -> None:
    listener = TokenListener(NONCE, limits=LIMITS)
    listener.receive_data(token_response())
    listener.supply_credential(SECRET)
    with pytest.raises(LocalProtocolError):
        listener.supply_credential(SECRET)
    with pytest.raises(LocalProtocolError):
        listener.reject("late")


def test_supply_after_reject_is_misuse() -> None:
    listener = TokenListener(NONCE, limits=LIMITS)
    listener.receive_data(token_response())
    listener.reject("no")
    with pytest.raises(LocalProtocolError):
        listener.supply_credential(SECRET)
    with pytest.raises(LocalProtocolError):
        listener.reject("no again")


@pytest.mark.parametrize("secret", [b"", "text-secret"])
def test_supply_credential_needs_non_empty_bytes(secret: object) -> None:
    listener = TokenListener(NONCE, limits=LIMITS)
    listener.receive_data(token_response())
    with pytest.raises(LocalProtocolError):
        listener.supply_credential(secret)  # type: ignore[arg-type]


def test_reject_needs_a_reason() -> None:
    listener = TokenListener(NONCE, limits=LIMITS)
    with pytest.raises(LocalProtocolError):
        listener.reject("")


@pytest.mark.parametrize("nonce", [b"", bytes(31), bytes(33), "x" * 32])
def test_token_listener_needs_a_32_byte_nonce(nonce: object) -> None:
    with pytest.raises(LocalProtocolError):
        TokenListener(nonce, limits=LIMITS)  # type: ignore[arg-type]


def test_token_connector_validates_its_arguments() -> None:
    with pytest.raises(LocalProtocolError):
        TokenConnector("a b", SECRET, limits=LIMITS)
    with pytest.raises(LocalProtocolError):
        TokenConnector(NAME, b"", limits=LIMITS)
    with pytest.raises(LocalProtocolError, match="max_auth_message_size"):
        TokenConnector("x" * 100, SECRET, limits=Limits(max_auth_message_size=100))


def test_receive_data_after_eof_is_dropped_while_waiting_for_the_decision() -> None:
    listener = TokenListener(NONCE, limits=LIMITS)
    listener.receive_data(token_response())
    listener.receive_eof()
    listener.receive_data(b"x")  # cannot happen on a sane transport; must not matter
    assert drain(listener) == [SecretRequired(name=NAME)]
    listener.supply_credential(SECRET)
    assert drain(listener) == [Authenticated(name=NAME)]


def test_finished_authenticators_ignore_all_input() -> None:
    outcome_pairs = [(SimpleAckListener(PEER), SimpleAckConnector()), token_pair()]
    for listener, connector in outcome_pairs:
        pump(listener, connector)
        for side in (listener, connector):
            assert side.is_finished
            side.receive_data(b"\xff" * 100)
            side.receive_eof()
            side.receive_data(b"after eof")
            assert side.next_event() is None
            assert side.data_to_send() == b""


# --------------------------------------------------------------------------- names and factories


@pytest.mark.parametrize(
    "name", ["a", "edge-01", "x" * 128, "café", "🙂", "a.b_c:d@e", 'quote"back\\slash']
)
def test_valid_tunnel_names(name: str) -> None:
    validate_tunnel_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "x" * 129, "a b", "a\tb", "a\nb", "a/b", "/", "a\x00b", "a\x7fb", "a\u00a0b",
     "a\u200bb", "a\u2028b", "\ud800", 5, None],
)  # fmt: skip
def test_invalid_tunnel_names(name: object) -> None:
    with pytest.raises(LocalProtocolError):
        validate_tunnel_name(name)  # type: ignore[arg-type]


def test_factories_build_the_right_authenticators() -> None:
    simple = listen_authenticator(SCHEME_SIMPLE_ACK, peer_name=PEER, nonce=NONCE, limits=LIMITS)
    token = listen_authenticator(SCHEME_TOKEN, peer_name=PEER, nonce=NONCE, limits=LIMITS)
    assert isinstance(simple, SimpleAckListener)
    assert isinstance(token, TokenListener)
    assert token.data_to_send() == TOKEN_HELLO
    with pytest.raises(LocalProtocolError, match="unknown authentication scheme"):
        listen_authenticator("tls", peer_name=PEER, nonce=NONCE, limits=LIMITS)

    simple_c = connect_authenticator(ClientCredentials.simple_ack(), limits=LIMITS)
    token_c = connect_authenticator(ClientCredentials.token(NAME, SECRET), limits=LIMITS)
    assert isinstance(simple_c, SimpleAckConnector)
    assert isinstance(token_c, TokenConnector)
    outcome = pump(TokenListener(NONCE, limits=LIMITS), token_c)
    # Both sides offer every addition this implementation speaks, by default.
    assert outcome.connector_events == [Authenticated(name=NAME, features=FEATURES)]


@pytest.mark.parametrize(
    ("scheme", "name", "secret"),
    [
        ("nope", None, None),
        (SCHEME_SIMPLE_ACK, NAME, None),
        (SCHEME_SIMPLE_ACK, None, SECRET),
        (SCHEME_TOKEN, None, SECRET),
        (SCHEME_TOKEN, NAME, None),
        (SCHEME_TOKEN, NAME, b""),
        (SCHEME_TOKEN, "bad/name", SECRET),
    ],
)
def test_client_credentials_are_validated(
    scheme: str, name: str | None, secret: bytes | None
) -> None:
    with pytest.raises(LocalProtocolError):
        ClientCredentials(scheme, name, secret)


def test_client_credentials_never_show_the_secret() -> None:
    credentials = ClientCredentials.token(NAME, SECRET)
    for text in (repr(credentials), str(credentials), f"{credentials}"):
        assert "TOP-SECRET" not in text
        assert SECRET.hex() not in text
        assert "<hidden>" in text
        assert NAME in text
    assert "secret=None" in repr(ClientCredentials.simple_ack())


def test_events_are_immutable_values() -> None:
    event = Authenticated(name="x")
    with pytest.raises(AttributeError):
        event.name = "y"  # type: ignore[misc]
    assert event == Authenticated(name="x")
    with pytest.raises(LocalProtocolError):
        Rejected(reason="")


# --------------------------------------------------------------------------- secrecy


def test_the_secret_appears_nowhere() -> None:
    needles_bytes = [SECRET, SECRET.hex().encode()]
    needles_text = [SECRET.decode(), SECRET.hex(), repr(SECRET)]
    scenarios: list[tuple[Authenticator, Authenticator, Decide]] = [
        (*token_pair(), supply_known),
        (*token_pair(secret=OTHER_SECRET), supply_known),
        (*token_pair(), lambda lst, _: lst.supply_credential(None)),
        (*token_pair(), lambda lst, _: lst.reject("limit")),
        (SimpleAckListener(PEER), TokenConnector(NAME, SECRET, limits=LIMITS), supply_known),
    ]
    for listener, connector, decide in scenarios:
        outcome = pump(listener, connector, decide=decide)
        for data in (outcome.listener_sent, outcome.connector_sent):
            for needle in needles_bytes:
                assert needle not in data
        texts = [repr(listener), repr(connector)]
        texts += [repr(e) for e in outcome.listener_events + outcome.connector_events]
        for text in texts:
            for text_needle in needles_text:
                assert text_needle not in text


# --------------------------------------------------------------------------- chunking


def scenarios() -> dict[str, Callable[[Chunker], Outcome]]:
    def simple(chunker: Chunker) -> Outcome:
        return pump(SimpleAckListener(PEER), SimpleAckConnector(), chunker=chunker)

    def token(chunker: Chunker) -> Outcome:
        return pump(*token_pair(), chunker=chunker)

    def wrong(chunker: Chunker) -> Outcome:
        return pump(*token_pair(secret=OTHER_SECRET), chunker=chunker)

    def refused(chunker: Chunker) -> Outcome:
        return pump(*token_pair(), chunker=chunker, decide=lambda lst, _: lst.reject("full"))

    def token_client_simple_server(chunker: Chunker) -> Outcome:
        connector = TokenConnector(NAME, SECRET, limits=LIMITS)
        return pump(SimpleAckListener(PEER), connector, chunker=chunker)

    def simple_client_token_server(chunker: Chunker) -> Outcome:
        return pump(TokenListener(NONCE, limits=LIMITS), SimpleAckConnector(), chunker=chunker)

    def reference_client(chunker: Chunker) -> Outcome:
        listener = TokenListener(NONCE, limits=LIMITS)
        feed(listener, reference_connector_answer(listener.data_to_send()), chunker)
        return Outcome(listener_events=drain(listener), listener_sent=listener.data_to_send())

    return {
        "simple-ack": simple,
        "token": token,
        "wrong-secret": wrong,
        "app-reject": refused,
        "token-client-simple-server": token_client_simple_server,
        "simple-client-token-server": simple_client_token_server,
        "reference-client": reference_client,
    }


@pytest.mark.parametrize("scenario", sorted(scenarios()))
def test_byte_by_byte_delivery_changes_nothing(scenario: str) -> None:
    run = scenarios()[scenario]
    assert run(bytewise) == run(whole)


@pytest.mark.parametrize("scenario", sorted(scenarios()))
@settings(max_examples=40, deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_random_chunking_changes_nothing(scenario: str, rng: random.Random) -> None:
    run = scenarios()[scenario]
    assert run(random_chunker(rng)) == run(whole)


# --------------------------------------------------------------------------- arbitrary input

SMALL_LIMITS = Limits(max_auth_message_size=64)

FACTORIES: dict[str, Callable[[], Authenticator]] = {
    "simple-ack-listener": lambda: SimpleAckListener(PEER),
    "simple-ack-connector": SimpleAckConnector,
    "token-listener": lambda: TokenListener(NONCE, limits=LIMITS),
    "token-listener-small": lambda: TokenListener(NONCE, limits=SMALL_LIMITS),
    "token-connector": lambda: TokenConnector(NAME, SECRET, limits=LIMITS),
}
OUTPUT_BOUND = {
    "simple-ack-listener": HELLO_SIZE,
    "simple-ack-connector": HELLO_SIZE,
    "token-listener": HELLO_SIZE + 4 + LIMITS.max_auth_message_size,
    "token-listener-small": HELLO_SIZE + 4 + SMALL_LIMITS.max_auth_message_size,
    "token-connector": 4 + LIMITS.max_auth_message_size,
}
# Plausible prefixes so that arbitrary bytes also reach the later states.
PREFIXES = [b"", SIMPLE_ACK_HELLO, TOKEN_HELLO, token_response(), SIMPLE_ACK_ANSWER[:10]]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["name", "mac", "ok", "reason", "x"]), children, max_size=4
        )
    ),
    max_leaves=8,
)


def run_arbitrary(
    kind: str, data: bytes, chunker: Chunker, eof: bool, decision: int
) -> tuple[list[AuthEvent], bytes]:
    """Feed ``data`` (cut by ``chunker``); the credential decision comes after all input,
    since when the application decides, relative to the peer's bytes, is not ours to fix."""
    authenticator = FACTORIES[kind]()
    events: list[AuthEvent] = []
    sent = bytearray(authenticator.data_to_send())
    for piece in chunker(data):
        authenticator.receive_data(piece)
        sent += authenticator.data_to_send()
        events += drain(authenticator)
    if eof:
        authenticator.receive_eof()
        events += drain(authenticator)
    if any(isinstance(event, SecretRequired) for event in events):
        assert isinstance(authenticator, TokenListener)
        if decision == 0:
            authenticator.supply_credential(SECRET)
        elif decision == 1:
            authenticator.supply_credential(None)
        else:
            authenticator.reject("nope")
        events += drain(authenticator)
    sent += authenticator.data_to_send()
    return events, bytes(sent)


def check_invariants(kind: str, events: list[AuthEvent], sent: bytes) -> None:
    terminal = [e for e in events if isinstance(e, Authenticated | Rejected)]
    assert len(terminal) <= 1
    if terminal:
        assert events[-1] is terminal[0]
    requests = [e for e in events if isinstance(e, SecretRequired)]
    assert len(requests) <= 1
    if requests:
        assert kind.startswith("token-listener")
    for event in events:
        assert isinstance(event, SecretRequired | Authenticated | Rejected)
        if isinstance(event, Rejected):
            assert event.reason.isprintable()
            assert len(event.reason) < 600
    assert len(sent) <= OUTPUT_BOUND[kind]
    assert SECRET not in sent


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from(PREFIXES),
    data=st.binary(max_size=300) | json_values.map(lambda v: frame(json.dumps(v).encode())),
    eof=st.booleans(),
    decision=st.integers(0, 2),
    rng=st.randoms(use_true_random=False),
)
def test_arbitrary_bytes_only_ever_produce_events(
    kind: str, prefix: bytes, data: bytes, eof: bool, decision: int, rng: random.Random
) -> None:
    stream = prefix + data
    events, sent = run_arbitrary(kind, stream, whole, eof, decision)
    check_invariants(kind, events, sent)
    # The outcome depends on the bytes, never on how they were cut.
    assert run_arbitrary(kind, stream, bytewise, eof, decision) == (events, sent)
    assert run_arbitrary(kind, stream, random_chunker(rng), eof, decision) == (events, sent)
