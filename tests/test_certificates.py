"""The certificates we generate, judged the way strict clients judge them.

snocat-cli 0.8 (rustls over webpki) refused our old certificate, a self-signed CA
(``basicConstraints cA=TRUE``), with ``CaUsedAsEndEntity``: a server's certificate
must be an end entity, even when the client takes that same certificate as its trust
anchor.  ``cryptography.x509.verification`` applies the same rule (and the CA/B
Forum profile besides), so it stands in for webpki here; ``old_style_certificate``
builds the old shape to show that these tests fail on it.  The messages a user sees
for a name mismatch or a file that is not a PEM certificate are checked here too.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import random
import socket
from pathlib import Path

import anyio
import pytest
from aioquic.tls import AlertBadCertificate, verify_certificate
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from snocat_anyio import ClientConfig, ConnectError, ServerConfig, TunnelClient, TunnelServer
from snocat_anyio.cli._server import OLD_CERTIFICATE_SUFFIX, ensure_server_state
from snocat_proto._service.attempts import CRYPTO_ERROR_FIRST, diagnose_early_close
from snocat_proto._service.ports import PortRange
from snocat_proto._wire.auth import ClientCredentials
from snocat_proto._wire.certificates import (
    DEFAULT_VALIDITY,
    describe_verification_failure,
    fingerprint,
    generate_self_signed,
    is_certificate_authority,
    load_certificate_chain,
    load_identity,
    load_private_key,
    reissue_as_end_entity,
)
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.events import ConnectionTerminated
from snocat_proto._wire.targets import ProxyTcpTarget

NOW = datetime.datetime(2030, 6, 1, 12, 0, tzinfo=datetime.UTC)
NAMES = ["localhost", "aggregator.example.org", "127.0.0.1", "::1"]

#: The TLS alert aioquic closes with when it refuses a peer's certificate.
BAD_CERTIFICATE = 42


def subject_of(name: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def strictly_verify(certificate_pem: bytes, name: str, *, anchor_pem: bytes | None = None) -> None:
    """Verify as a strict client does with ``--authority`` (the certificate itself,
    unless ``anchor_pem``, as the only trust anchor), for the server name ``name``,
    a day into the certificate's validity."""
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    anchor = certificate if anchor_pem is None else x509.load_pem_x509_certificate(anchor_pem)
    verifier = (
        PolicyBuilder()
        .store(Store([anchor]))
        .time(certificate.not_valid_before_utc + datetime.timedelta(days=1))
        .build_server_verifier(subject_of(name))
    )
    verifier.verify(certificate, [])


def old_style_certificate(names: list[str]) -> tuple[bytes, bytes]:
    """The certificate ``generate_self_signed`` made before: a self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + DEFAULT_VALIDITY)
        .add_extension(
            x509.SubjectAlternativeName([subject_of(name) for name in names]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


# The shape, judged by a strict verifier ------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_strict_verifier_accepts_the_certificate_for_each_of_its_names(name: str) -> None:
    certificate_pem, _ = generate_self_signed(NAMES, now=NOW)
    strictly_verify(certificate_pem, name)


@pytest.mark.parametrize("name", NAMES)
def test_a_strict_verifier_refuses_the_old_ca_certificate(name: str) -> None:
    certificate_pem, _ = old_style_certificate(NAMES)
    with pytest.raises(VerificationError, match=r"basicConstraints\.cA"):
        strictly_verify(certificate_pem, name)


@pytest.mark.parametrize("name", ["elsewhere.example", "sub.localhost", "127.0.0.2", "::2"])
def test_a_strict_verifier_refuses_a_name_the_certificate_does_not_carry(name: str) -> None:
    certificate_pem, _ = generate_self_signed(NAMES, now=NOW)
    with pytest.raises(VerificationError, match="subjectAltName"):
        strictly_verify(certificate_pem, name)


def test_a_strict_verifier_refuses_another_certificate_for_the_same_names() -> None:
    certificate_pem, _ = generate_self_signed(NAMES, now=NOW)
    other_pem, _ = generate_self_signed(NAMES, now=NOW)
    with pytest.raises(VerificationError):
        strictly_verify(certificate_pem, "localhost", anchor_pem=other_pem)


def test_the_certificate_is_a_p256_end_entity_for_server_authentication() -> None:
    certificate_pem, key_pem = generate_self_signed(["localhost", "127.0.0.1"], now=NOW)
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    assert certificate.version is x509.Version.v3
    assert certificate.issuer == certificate.subject
    public_key = certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, as rcgen writes it

    extensions = certificate.extensions
    constraints = extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca is False and constraints.critical
    assert not is_certificate_authority(certificate)
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    assert extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == (
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    )
    own = x509.SubjectKeyIdentifier.from_public_key(public_key)
    assert extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == own
    assert extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == (
        own.digest
    )
    sans = extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not sans.critical
    assert sans.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]

    assert certificate.not_valid_before_utc == NOW - datetime.timedelta(minutes=5)
    assert certificate.not_valid_after_utc == NOW + DEFAULT_VALIDITY
    certificate.verify_directly_issued_by(certificate)  # self-signed


def test_names_that_are_neither_ip_addresses_nor_ascii_dns_names_are_refused() -> None:
    for bad in ["", "ünïcode.example"]:
        with pytest.raises(LocalProtocolError, match="xn--"):
            generate_self_signed([bad], now=NOW)


# aioquic's own check (OpenSSL, the certificate itself as the trust anchor) ---------


@pytest.mark.parametrize("name", NAMES)
def test_aioquic_trusts_the_certificate_given_as_its_authority(name: str) -> None:
    certificate_pem, _ = generate_self_signed(NAMES, now=datetime.datetime.now(datetime.UTC))
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    verify_certificate(certificate, [], name, cadata=certificate_pem)


def test_aioquic_refuses_another_certificate_for_the_same_names() -> None:
    now = datetime.datetime.now(datetime.UTC)
    certificate_pem, _ = generate_self_signed(NAMES, now=now)
    other_pem, _ = generate_self_signed(NAMES, now=now)
    with pytest.raises(AlertBadCertificate):
        verify_certificate(
            x509.load_pem_x509_certificate(certificate_pem), [], "localhost", cadata=other_pem
        )


# Over real sockets: our client, trusting the certificate with authority_pem ----------


def _free_tcp_port() -> int:
    for _ in range(200):
        port = random.randint(20000, 60000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port")


@pytest.mark.anyio
async def test_a_client_trusting_the_certificate_connects_by_ip_and_refuses_another() -> None:
    now = datetime.datetime.now(datetime.UTC)
    certificate_pem, key_pem = generate_self_signed(["localhost", "127.0.0.1"], now=now)
    other_pem, _ = generate_self_signed(["localhost", "127.0.0.1"], now=now)
    secret = b"s3cret-s3cret-s3cret-s3cret"
    port = _free_tcp_port()
    server = TunnelServer(
        ServerConfig(
            certificate_pem=certificate_pem,
            private_key_pem=key_pem,
            quic_port=0,
            tokens={"alpha": secret},
            port_range=PortRange(port, port),
            shutdown_grace=0.2,
        )
    )

    def client(authority_pem: bytes) -> TunnelClient:
        host, quic_port = server.quic_address
        return TunnelClient(
            ClientConfig(
                server_host=host,
                server_port=quic_port,
                server_name="127.0.0.1",  # an IP SAN
                targets=(ProxyTcpTarget.parse_host_port("127.0.0.1:9"),),
                credentials=ClientCredentials.token("alpha", secret),
                authority_pem=authority_pem,
                reconnect=False,
                connect_timeout=2.0,
            )
        )

    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        with anyio.fail_after(10):
            trusting = client(certificate_pem)
            await tg.start(trusting.run)
            assert trusting.granted is not None
            await trusting.aclose()
            with pytest.raises(ConnectError, match="not trusted"):
                await client(other_pem).run()
            await server.shutdown(grace=0.2)


# The state directory of ``snocat server`` ------------------------------------------


def test_a_new_state_directory_gets_an_end_entity_certificate(tmp_path: Path) -> None:
    state, created = ensure_server_state(tmp_path / "state", NAMES, token_auth=False)
    assert created
    certificate_pem = state.certificate.read_bytes()
    for name in NAMES:
        strictly_verify(certificate_pem, name)


def test_an_old_ca_certificate_in_the_state_directory_is_reissued_with_its_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    old_pem, key_pem = old_style_certificate(["localhost", "127.0.0.1"])
    (directory / "server.pub.pem").write_bytes(old_pem)
    (directory / "server.priv.pem").write_bytes(key_pem)
    old_digest = fingerprint(x509.load_pem_x509_certificate(old_pem))

    with caplog.at_level(logging.WARNING, logger="snocat"):
        state, created = ensure_server_state(directory, ["other-host"], token_auth=False)
    assert not created  # nothing new: the same identity, in the shape clients accept
    new_pem = state.certificate.read_bytes()
    new = x509.load_pem_x509_certificate(new_pem)
    old = x509.load_pem_x509_certificate(old_pem)
    strictly_verify(new_pem, "localhost")
    strictly_verify(new_pem, "127.0.0.1")
    assert state.private_key.read_bytes() == key_pem
    assert new.subject == old.subject
    assert new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == (
        old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )
    # What webpki checks of a trust anchor (its subject and key): a snocat-cli given
    # the old file as its authority accepts the new certificate.
    new.verify_directly_issued_by(old)
    assert (directory / f"server.pub.pem{OLD_CERTIFICATE_SUFFIX}").read_bytes() == old_pem
    (record,) = [r for r in caplog.records if "re-issued" in r.getMessage()]
    message = record.getMessage()
    assert "CaUsedAsEndEntity" in message
    assert old_digest in message and fingerprint(new) in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="snocat"):
        ensure_server_state(directory, ["other-host"], token_auth=False)
    assert state.certificate.read_bytes() == new_pem  # once only
    assert not caplog.records


def test_reissuing_keeps_nothing_but_the_key_and_names() -> None:
    old_pem, key_pem = old_style_certificate(["localhost"])
    new_pem = reissue_as_end_entity(old_pem, key_pem, now=NOW)
    assert not is_certificate_authority(x509.load_pem_x509_certificate(new_pem))
    assert is_certificate_authority(x509.load_pem_x509_certificate(old_pem))
    _, other_key = generate_self_signed(["localhost"], now=NOW)
    with pytest.raises(LocalProtocolError, match="does not belong"):
        reissue_as_end_entity(old_pem, other_key, now=NOW)


# Messages ---------------------------------------------------------------------------


def _aioquic_refusal(certificate_pem: bytes, name: str) -> str:
    """aioquic's own words for refusing ``certificate_pem`` as ``name``."""
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    with pytest.raises(AlertBadCertificate) as refused:
        verify_certificate(certificate, [], name, cadata=certificate_pem)
    return str(refused.value)


@pytest.mark.parametrize(
    ("names", "wanted", "expected"),
    [
        (["localhost"], "elsewhere.example", "issued for localhost, not for 'elsewhere.example'"),
        (
            ["localhost", "127.0.0.1", "::1"],
            "127.0.0.2",
            "issued for localhost, 127.0.0.1 and ::1, not for '127.0.0.2'",
        ),
    ],
)
def test_a_name_mismatch_is_a_plain_sentence(names: list[str], wanted: str, expected: str) -> None:
    certificate_pem, _ = generate_self_signed(names, now=datetime.datetime.now(datetime.UTC))
    reason = _aioquic_refusal(certificate_pem, wanted)
    assert "Pattern(" in reason  # aioquic's wording: if this fails, it changed
    plain = describe_verification_failure(reason)
    assert plain == f"the certificate is {expected}"

    closed = ConnectionTerminated(
        code=CRYPTO_ERROR_FIRST + BAD_CERTIFICATE, reason=reason, by_peer=False, application=False
    )
    end = diagnose_early_close(
        closed,
        handshake_done=False,
        pin_problem=None,
        server_label="127.0.0.1:9090",
        server_name=wanted,
    )
    assert end.fatal and expected in end.message
    assert "Pattern" not in end.message and "b'" not in end.message


def test_other_verification_failures_keep_their_words() -> None:
    for reason in ["self-signed certificate", "Certificate is no longer valid", ""]:
        assert describe_verification_failure(reason) == reason


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "junk.pem is empty"),
        (b"hello\n", "junk.pem holds no PEM certificate"),
        (b"key", "junk.pem holds a private key, not a certificate"),
        (b"der", "junk.pem is in DER form, not PEM"),
        (b"cut", "junk.pem holds a damaged PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "damaged"),
    ],
    ids=["empty", "junk", "key", "der", "cut", "not-x509"],
)
def test_a_file_that_is_not_a_pem_certificate_is_named_in_a_plain_sentence(
    data: bytes, expected: str
) -> None:
    certificate_pem, key_pem = generate_self_signed(["localhost"], now=NOW)
    data = {
        b"key": key_pem,
        b"der": x509.load_pem_x509_certificate(certificate_pem).public_bytes(
            serialization.Encoding.DER
        ),
        b"cut": certificate_pem[:200],
    }.get(data, data)
    with pytest.raises(LocalProtocolError) as refused:
        load_certificate_chain(data, source="junk.pem")
    assert expected in refused.value.reason
    assert "MalformedFraming" not in refused.value.reason
    assert "cryptography.io" not in refused.value.reason


def test_a_file_that_is_not_a_usable_private_key_is_named_in_a_plain_sentence() -> None:
    certificate_pem, key_pem = generate_self_signed(["localhost"], now=NOW)
    key = serialization.load_pem_private_key(key_pem, password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"password"),
    )
    cases = {
        b"hello": "key.pem holds no PEM private key",
        certificate_pem: "key.pem holds a certificate, not a private key",
        encrypted: "key.pem is encrypted",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n": "damaged",
    }
    for data, expected in cases.items():
        with pytest.raises(LocalProtocolError) as refused:
            load_private_key(data, source="key.pem")
        assert expected in refused.value.reason
        assert "MalformedFraming" not in refused.value.reason
    _, other_key = generate_self_signed(["localhost"], now=NOW)
    with pytest.raises(LocalProtocolError, match=r"^key\.pem does not belong to cert\.pem$"):
        load_identity(
            certificate_pem, other_key, certificate_source="cert.pem", key_source="key.pem"
        )
