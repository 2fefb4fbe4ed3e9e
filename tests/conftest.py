"""Shared fixtures: anyio backends and throwaway certificates."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import pytest

from snocat_proto._wire.certificates import generate_self_signed


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every anyio test runs on both backends."""
    return str(request.param)


@dataclass(frozen=True)
class Identity:
    certificate_pem: bytes
    private_key_pem: bytes
    certificate_path: Path
    private_key_path: Path


def _identity(directory: Path, names: list[str]) -> Identity:
    now = datetime.datetime.now(datetime.UTC)
    certificate_pem, key_pem = generate_self_signed(names, now=now)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / "test.pub.pem"
    key_path = directory / "test.priv.pem"
    cert_path.write_bytes(certificate_pem)
    key_path.write_bytes(key_pem)
    return Identity(certificate_pem, key_pem, cert_path, key_path)


@pytest.fixture(scope="session")
def server_identity(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """A self-signed certificate for localhost and 127.0.0.1 (the aggregator's)."""
    return _identity(tmp_path_factory.mktemp("server-identity"), ["localhost", "127.0.0.1"])


@pytest.fixture(scope="session")
def other_identity(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """Another certificate for the same names: a client trusting it must refuse the server."""
    return _identity(tmp_path_factory.mktemp("other-identity"), ["localhost", "127.0.0.1"])
