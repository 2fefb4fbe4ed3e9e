"""Certificates as bytes: generating, fingerprinting and installing them.

Pure computation over PEM bytes; reading and writing files is the adapters' job,
so every binding and the CLI share this one module.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import ssl
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .engine import QuicConfiguration
from .errors import LocalProtocolError

#: How long a generated certificate is valid.
DEFAULT_VALIDITY = datetime.timedelta(days=825)


def generate_self_signed(
    names: Sequence[str], *, now: datetime.datetime, validity: datetime.timedelta = DEFAULT_VALIDITY
) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key and a self-signed certificate for ``names``.

    Returns ``(certificate_pem, private_key_pem)``.  Names that parse as IP
    addresses become IP SANs, the rest DNS SANs; the first is the common name.
    """
    if not names:
        raise LocalProtocolError("a certificate needs at least one name (--san)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate_pem, key_pem


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


def load_certificate_chain(pem: bytes) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise LocalProtocolError(f"not a PEM certificate: {exc}") from None
    if not chain:
        raise LocalProtocolError("no certificate found in the PEM data")
    return chain


def install_identity(
    configuration: QuicConfiguration, certificate_pem: bytes, key_pem: bytes
) -> str:
    """Give a server configuration its certificate and key; returns the fingerprint."""
    chain = load_certificate_chain(certificate_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise LocalProtocolError(f"not a usable PEM private key: {exc}") from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != chain[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise LocalProtocolError("the private key does not belong to the certificate")
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
    """
    if pinned is not None:
        configuration.verify_mode = ssl.CERT_NONE
    elif authority_pem is not None:
        load_certificate_chain(authority_pem)
        configuration.cadata = authority_pem
