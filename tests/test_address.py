"""Route address rendering, parsing and wire decoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.errors import LocalProtocolError, RemoteProtocolError

# The "valid result or ProtocolError" properties get more examples than the rest.
ARBITRARY_EXAMPLES = 500

# Segments rich in the two characters that need escaping.
segment_text = st.text(
    alphabet=st.sampled_from("ab/\\") | st.characters(codec="utf-8"), max_size=20
)
addresses = st.lists(segment_text, max_size=8).map(lambda s: RouteAddress(tuple(s)))
# Text that is often close to a valid address.
address_like_text = st.text(alphabet=st.sampled_from("/\\ab") | st.characters(), max_size=40)


@pytest.mark.parametrize(
    ("segments", "text"),
    [
        ((), ""),
        (("",), "/"),
        (("", ""), "//"),
        (("hello", "world"), "/hello/world"),
        (("hello", "world", ""), "/hello/world/"),
        (("proxyme", "0.0.1", "127.0.0.1", "5000"), "/proxyme/0.0.1/127.0.0.1/5000"),
        (("a/b",), "/a\\/b"),
        (("a\\b",), "/a\\\\b"),
        (("\\/",), "/\\\\\\/"),
        (("/", "\\"), "/\\//\\\\"),
        (("ünï", "😀"), "/ünï/😀"),
    ],
)
def test_render_and_parse_examples(segments: tuple[str, ...], text: str) -> None:
    address = RouteAddress(segments)
    assert str(address) == text
    assert address.encode() == text.encode("utf-8")
    assert RouteAddress.parse(text) == address
    assert RouteAddress.decode(text.encode("utf-8")) == address


def test_of_and_startswith() -> None:
    address = RouteAddress.of("proxy-tcp", "dns", "example.com", "tcp", "80")
    assert address.segments == ("proxy-tcp", "dns", "example.com", "tcp", "80")
    assert address.startswith()
    assert address.startswith("proxy-tcp")
    assert address.startswith("proxy-tcp", "dns")
    assert not address.startswith("proxy-tcp", "ip4")
    assert not address.startswith("proxy")
    assert not RouteAddress.of().startswith("x")
    assert RouteAddress.of("a") == RouteAddress(("a",))
    assert hash(RouteAddress.of("a", "b")) == hash(RouteAddress(("a", "b")))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("hello/world", "start with '/'"),
        ("x", "start with '/'"),
        (" /x", "start with '/'"),
        ("/a\\b", "invalid escape"),
        ("/a\\n", "invalid escape"),
        ("/\\ ", "invalid escape"),
        ("/a\\", "lone backslash"),
        ("/\\", "lone backslash"),
        ("/a/\\\\\\", "lone backslash"),
    ],
)
def test_parse_errors(text: str, fragment: str) -> None:
    with pytest.raises(RemoteProtocolError, match=fragment):
        RouteAddress.parse(text)


def test_decode_rejects_bad_utf8() -> None:
    for data in (b"/\xff", b"/a\xc3", b"/\xed\xa0\x80", b"/\xc0\xaf"):
        with pytest.raises(RemoteProtocolError, match="UTF-8"):
            RouteAddress.decode(data)


def test_parse_rejects_lone_surrogate() -> None:
    with pytest.raises(RemoteProtocolError):
        RouteAddress.parse("/a\ud800")


def test_construction_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        RouteAddress("/a/b")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        RouteAddress((1, 2))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        RouteAddress(("\udc80",))
    with pytest.raises(LocalProtocolError):
        RouteAddress(5)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        RouteAddress.parse(b"/a")  # type: ignore[arg-type]
    # Any other iterable is frozen into a tuple, so equality and hashing hold.
    listed = RouteAddress(["a", "b"])  # type: ignore[arg-type]
    assert listed.segments == ("a", "b")
    assert listed == RouteAddress.of("a", "b")


@given(addresses)
def test_roundtrip_text(address: RouteAddress) -> None:
    assert RouteAddress.parse(str(address)) == address


@given(addresses)
def test_roundtrip_bytes(address: RouteAddress) -> None:
    assert RouteAddress.decode(address.encode()) == address


@settings(max_examples=ARBITRARY_EXAMPLES)
@given(address_like_text)
def test_parse_arbitrary_text(text: str) -> None:
    try:
        address = RouteAddress.parse(text)
    except RemoteProtocolError:
        return
    # Every valid text has exactly one rendering: parsing is the inverse of str().
    assert str(address) == text


@settings(max_examples=ARBITRARY_EXAMPLES)
@given(st.binary(max_size=64) | address_like_text.map(lambda t: t.encode("utf-8", "replace")))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    try:
        address = RouteAddress.decode(data)
    except RemoteProtocolError:
        return
    assert address.encode() == data
