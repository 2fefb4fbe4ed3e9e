"""Certificates as bytes: generating, fingerprinting, loading and installing them.

Pure computation over PEM bytes; reading and writing files is the adapters' job,
so every binding and the CLI share this one module.  The ``source`` a loader takes
is how its messages name the data (the file's name, in the CLI).

What :func:`generate_self_signed` makes, and why (docs/security.md, "Certificates"):
a self-signed **end-entity** certificate, the kind rcgen makes for snocat 0.8, which a
client takes as its own trust anchor (``--authority``) or pins (``--fingerprint``).
Strict verifiers hold the server's certificate to the rules for an end entity, even
when it is also the anchor: webpki (snocat-cli 0.8, over rustls) refuses one that
says ``cA=TRUE`` with ``CaUsedAsEndEntity``, and so does
``cryptography.x509.verification``.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import ssl
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .engine import QuicConfiguration
from .errors import LocalProtocolError

#: How long a generated certificate is valid: 825 days, the longest Apple's
#: platforms accept for a TLS server certificate.
DEFAULT_VALIDITY = datetime.timedelta(days=825)

#: A new certificate is valid from this long before ``now``, for peers whose clocks
#: are a little behind.
CLOCK_SKEW = datetime.timedelta(minutes=5)

#: The private keys aioquic can sign a TLS 1.3 handshake with.
IdentityKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
#: The end of a PKCS#8 (``PRIVATE KEY``), SEC1 (``EC ...``) or PKCS#1 (``RSA ...``) label.
_PEM_PRIVATE_KEY = b"PRIVATE KEY-----"
#: The first byte of a DER certificate (a SEQUENCE): a file that is not PEM at all.
_DER_SEQUENCE = 0x30


def generate_self_signed(
    names: Sequence[str], *, now: datetime.datetime, validity: datetime.timedelta = DEFAULT_VALIDITY
) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key and a self-signed end-entity certificate for ``names``.

    Returns ``(certificate_pem, private_key_pem)``, the key in PKCS#8.  Names that
    parse as IP addresses become IP SANs, the rest DNS SANs; the first is also the
    common name.
    """
    if not names:
        raise LocalProtocolError("a certificate needs at least one name (--san)")
    sans = [_general_name(name) for name in names]
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    certificate = _end_entity(key, subject, sans, now=now, validity=validity)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def reissue_as_end_entity(
    certificate_pem: bytes,
    key_pem: bytes,
    *,
    now: datetime.datetime,
    validity: datetime.timedelta = DEFAULT_VALIDITY,
) -> bytes:
    """The certificate again, as a self-signed end entity: same subject, names and key.

    For a certificate an older snocat made as a CA (``cA=TRUE``).  webpki takes only
    a trust anchor's subject and key, so a snocat-cli given the old certificate as its
    authority accepts the new one.  OpenSSL (aioquic) does not: it trusts a
    self-signed certificate only if that very certificate is in its store; and a
    pinned fingerprint is the hash of the certificate's bytes.  Our clients need the
    new certificate or fingerprint.
    """
    chain, key = load_identity(certificate_pem, key_pem)
    old = chain[0]
    try:
        sans = list(old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        raise LocalProtocolError("the certificate names no subjectAltName to keep") from None
    return _end_entity(key, old.subject, sans, now=now, validity=validity).public_bytes(
        serialization.Encoding.PEM
    )


def is_certificate_authority(certificate: x509.Certificate) -> bool:
    """Whether ``certificate`` says ``cA=TRUE``: strict clients refuse it as a server's."""
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


def _end_entity(
    key: IdentityKey,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName],
    *,
    now: datetime.datetime,
    validity: datetime.timedelta,
) -> x509.Certificate:
    # Each extension is what a strict verifier of a server's certificate asks for
    # (webpki, and cryptography.x509.verification's CA/B Forum profile), none more.
    public_key = key.public_key()
    usage = x509.KeyUsage(
        digital_signature=True,  # the TLS 1.3 CertificateVerify; never keyCertSign
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        # Clients match the server name against the SANs only (webpki never reads CN).
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        # cryptography's profile requires it in an end entity, self-signed or not.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
    )
    signing_hash = (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )
    return builder.sign(key, signing_hash)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not name or not name.isascii():
        raise LocalProtocolError(
            f"{name!r} is neither an IP address nor an ASCII DNS name "
            "(write an international name in its xn-- form)"
        )
    return x509.DNSName(name)


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as colon-separated upper-case hex."""
    digest = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)).upper()


def parse_fingerprint(text: str) -> str:
    """Normalise a user's SHA-256 fingerprint (colons, case, a ``sha256:`` prefix)."""
    raw = text.strip()
    if raw.lower().startswith("sha256:"):
        raw = raw[7:]
    digits = raw.replace(":", "").replace(" ", "").upper()
    if len(digits) != 64 or any(c not in "0123456789ABCDEF" for c in digits):
        raise LocalProtocolError(
            f"not a SHA-256 fingerprint: {text!r} (expected 64 hex digits, colons optional)"
        )
    return ":".join(digits[i : i + 2] for i in range(0, 64, 2))


def load_certificate_chain(
    pem: bytes, *, source: str = "the certificate data"
) -> list[x509.Certificate]:
    """Every certificate in ``pem``, the server's own first; a plain sentence if none."""
    # cryptography words every failure as "Unable to load PEM file. See <FAQ> ...
    # MalformedFraming": say instead what the data is.
    if _PEM_CERTIFICATE not in pem:
        if not pem.strip():
            raise LocalProtocolError(f"{source} is empty: expected a PEM certificate")
        if _PEM_PRIVATE_KEY in pem:
            raise LocalProtocolError(f"{source} holds a private key, not a certificate")
        if pem[0] == _DER_SEQUENCE:
            raise LocalProtocolError(
                f"{source} is in DER form, not PEM: convert it with "
                "'openssl x509 -inform der -in FILE -out FILE.pem'"
            )
        raise LocalProtocolError(
            f"{source} holds no PEM certificate (a '-----BEGIN CERTIFICATE-----' block)"
        )
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise LocalProtocolError(
            f"{source} holds a damaged PEM certificate "
            "(cut short, bad base64, or not an X.509 certificate inside)"
        ) from None
    return chain


def load_private_key(pem: bytes, *, source: str = "the private key") -> IdentityKey:
    """The unencrypted PEM private key in ``pem``; a plain sentence if there is none."""
    if _PEM_PRIVATE_KEY not in pem:
        if _PEM_CERTIFICATE in pem:
            raise LocalProtocolError(f"{source} holds a certificate, not a private key")
        raise LocalProtocolError(
            f"{source} holds no PEM private key (a '-----BEGIN PRIVATE KEY-----' block)"
        )
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise LocalProtocolError(
            f"{source} is encrypted; give an unencrypted key "
            "('openssl pkey -in FILE -out PLAIN' decrypts it)"
        ) from None
    except ValueError:
        raise LocalProtocolError(
            f"{source} holds a damaged PEM private key "
            "(cut short, bad base64, or a kind of key that cannot be read)"
        ) from None
    if not isinstance(key, IdentityKey):
        raise LocalProtocolError(
            f"{source} holds a {type(key).__name__.removeprefix('_')}, which cannot sign a "
            "TLS 1.3 handshake (use an EC, RSA or Ed25519 key)"
        )
    return key


def load_identity(
    certificate_pem: bytes,
    key_pem: bytes,
    *,
    certificate_source: str = "the certificate",
    key_source: str = "the private key",
) -> tuple[list[x509.Certificate], IdentityKey]:
    """A server's certificate chain and its key, checked to belong together."""
    chain = load_certificate_chain(certificate_pem, source=certificate_source)
    key = load_private_key(key_pem, source=key_source)
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != chain[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise LocalProtocolError(f"{key_source} does not belong to {certificate_source}")
    return chain, key


def install_identity(
    configuration: QuicConfiguration, certificate_pem: bytes, key_pem: bytes
) -> str:
    """Give a server configuration its certificate and key; returns the fingerprint."""
    chain, key = load_identity(certificate_pem, key_pem)
    configuration.certificate = chain[0]
    configuration.certificate_chain = chain[1:]
    configuration.private_key = key
    return fingerprint(chain[0])


def install_trust(
    configuration: QuicConfiguration, *, authority_pem: bytes | None, pinned: str | None
) -> None:
    """How a client configuration trusts the aggregator.

    With a pinned fingerprint the chain is not verified (the tunnel checks the pin
    after the handshake); otherwise ``authority_pem`` or the system's roots are used.
    aioquic gives ``authority_pem`` to OpenSSL as trust anchors: a self-signed
    certificate found there is its own whole chain.
    """
    if pinned is not None:
        configuration.verify_mode = ssl.CERT_NONE
    elif authority_pem is not None:
        load_certificate_chain(authority_pem, source="the authority certificate")
        configuration.cadata = authority_pem


# aioquic's tls.verify_certificate words a name mismatch with the reprs of
# service_identity's patterns: "hostname 'x' doesn't match DNSPattern(pattern=b'a')",
# or "... doesn't match either of DNSPattern(...), IPAddressPattern(pattern=
# IPv4Address('127.0.0.1'))".  tests/test_certificates.py fails if that wording moves.
_NAME_MISMATCH = re.compile(r"hostname (?P<wanted>'[^']*'|\"[^\"]*\") doesn't match (?P<has>.*)")
_PATTERN_NAME = re.compile(
    r"DNSPattern\(pattern=b'(?P<dns>[^']*)'\)"
    r"|IPAddressPattern\(pattern=IPv[46]Address\('(?P<ip>[^']*)'\)\)"
)


def describe_verification_failure(reason: str) -> str:
    """aioquic's reason for refusing a peer's certificate, as a plain sentence."""
    mismatch = _NAME_MISMATCH.search(reason)
    if mismatch is None:
        return reason
    names = [m.group("dns") or m.group("ip") for m in _PATTERN_NAME.finditer(mismatch["has"])]
    if not names:
        return f"the certificate is not issued for {mismatch['wanted']}"
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"the certificate is issued for {listed}, not for {mismatch['wanted']}"
