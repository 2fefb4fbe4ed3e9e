"""Reaching tunnels by name: host name syntax and the ``NAME.DOMAIN`` rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.names import (
    MAX_HOST_NAME_LENGTH,
    TunnelDomain,
    check_host_name,
    is_label,
    normalize_host_name,
    tunnel_name,
)

DOMAIN = TunnelDomain.parse("tunnels.example.com")

labels = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?\Z")


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("office-1.tunnels.example.com", "office-1"),
        ("OFFICE-1.Tunnels.Example.COM", "office-1"),
        ("office-1.tunnels.example.com.", "office-1"),
        ("x.tunnels.example.com", "x"),
        ("0.tunnels.example.com", "0"),
        ("xn--bcher-kva.tunnels.example.com", "xn--bcher-kva"),
        ("a" * 63 + ".tunnels.example.com", "a" * 63),
    ],
)
def test_a_host_one_label_under_the_domain_names_a_tunnel(host: str, name: str) -> None:
    assert DOMAIN.name_for(host) == name
    assert tunnel_name("tunnels.example.com", host) == name


@pytest.mark.parametrize(
    "host",
    [
        "tunnels.example.com",  # the bare domain
        "tunnels.example.com.",
        "a.b.tunnels.example.com",  # two labels deep
        "office-1.tunnels.example.org",  # another domain
        "office-1.xtunnels.example.com",  # a suffix, not a label boundary
        "office-1tunnels.example.com",
        "example.com",
        ".tunnels.example.com",  # an empty label
        "-a.tunnels.example.com",  # not a label
        "a-.tunnels.example.com",
        "a_b.tunnels.example.com",
        "a" * 64 + ".tunnels.example.com",
        "office-1.tunnels.example.com..",
        "é.tunnels.example.com",
        "",
        "192.0.2.1",
        "::1",
    ],
)
def test_other_hosts_name_no_tunnel(host: str) -> None:
    assert DOMAIN.name_for(host) is None


@pytest.mark.parametrize(
    ("text", "domain"),
    [
        ("tunnels.example.com", "tunnels.example.com"),
        ("Tunnels.Example.COM.", "tunnels.example.com"),
        ("localhost", "localhost"),  # *.localhost reaches loopback in browsers
    ],
)
def test_a_valid_domain_is_normalized(text: str, domain: str) -> None:
    assert TunnelDomain.parse(text).domain == domain


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "*.example.com",
        ".example.com",
        "example..com",
        "exa mple.com",
        "exa_mple.com",
        "192.0.2.1",
        "example.123",
        "-example.com",
        "ex\u00e4mple.com",
        "a" * 64 + ".com",
        ("a" * 63 + ".") * 4,  # 256 characters
        ("a" * 50 + ".") * 5 + "com",  # 258 characters
    ],
)
def test_an_invalid_domain_is_refused_with_a_reason(text: str) -> None:
    with pytest.raises(LocalProtocolError, match="--domain"):
        TunnelDomain.parse(text)


def test_a_domain_with_no_room_for_a_name_is_refused() -> None:
    domain = ".".join(["a" * 62] * 3 + ["a" * 63])  # 252 characters: a valid host name
    assert check_host_name(domain) is None
    with pytest.raises(LocalProtocolError, match="no name under it fits"):
        TunnelDomain.parse(domain)
    assert TunnelDomain.parse(domain[1:]).host_for("x") == "x." + domain[1:]


def test_the_constructor_takes_only_normalized_domains() -> None:
    with pytest.raises(LocalProtocolError, match="normalized"):
        TunnelDomain("Tunnels.example.com")
    with pytest.raises(LocalProtocolError):
        TunnelDomain.parse(7)  # type: ignore[arg-type]


def test_host_for_is_the_inverse() -> None:
    assert DOMAIN.host_for("Office-1") == "office-1.tunnels.example.com"
    for bad in ("a_b", "a.b", "", "-a", "a" * 64):
        with pytest.raises(LocalProtocolError):
            DOMAIN.host_for(bad)


def test_host_name_syntax() -> None:
    assert check_host_name("a" * 63 + "." + "b" * 63) is None
    assert check_host_name("x" * MAX_HOST_NAME_LENGTH) is not None  # label too long
    long_ok = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(long_ok) == MAX_HOST_NAME_LENGTH
    assert check_host_name(long_ok) is None
    assert check_host_name(long_ok + ".") is None
    assert check_host_name(long_ok + "e") is not None
    assert normalize_host_name("A.B.") == "a.b"
    assert normalize_host_name("a b") is None
    assert is_label("a-b") and not is_label("A") and not is_label("a.b")
    assert "IP address" in (check_host_name("10.0.0.1") or "")


@given(labels, st.sampled_from(["", "."]), st.booleans())
def test_round_trip(name: str, dot: str, upper: bool) -> None:
    host = DOMAIN.host_for(name) + dot
    assert DOMAIN.name_for(host.upper() if upper else host) == name


@given(st.text(max_size=80))
def test_name_for_never_raises_and_answers_a_label(host: str) -> None:
    name = DOMAIN.name_for(host)
    if name is not None:
        assert is_label(name)
        assert host.lower().removesuffix(".") == f"{name}.tunnels.example.com"
