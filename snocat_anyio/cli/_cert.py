"""``snocat cert``: a self-signed certificate and its key."""

from __future__ import annotations

from pathlib import Path

import rich_click as click

from snocat_proto._wire.certificates import (
    fingerprint,
    generate_self_signed,
    load_certificate_chain,
)
from snocat_proto._wire.errors import LocalProtocolError

from ._common import UsageProblem, utc_now, write_private
from ._group import cli


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--san",
    "sans",
    multiple=True,
    default=("localhost",),
    show_default=True,
    help="A name (DNS name or IP address) the certificate is valid for; repeat for more.",
)
def cert(path: Path, sans: tuple[str, ...]) -> None:
    """Write a self-signed certificate `PATH.pub.pem` and its key `PATH.priv.pem` (mode 0600)."""
    public = path.with_name(path.name + ".pub.pem")
    private = path.with_name(path.name + ".priv.pem")
    for existing in (public, private):
        if existing.exists():
            raise UsageProblem(f"{existing} already exists; remove it or choose another PATH")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        certificate_pem, key_pem = generate_self_signed(list(sans), now=utc_now())
        write_private(private, key_pem)
        public.write_bytes(certificate_pem)
    except OSError as exc:
        raise UsageProblem(
            f"cannot write the certificate at {path}: {exc.strerror or exc}"
        ) from None
    except LocalProtocolError as exc:
        raise UsageProblem(exc.reason) from None
    digest = fingerprint(load_certificate_chain(certificate_pem)[0])
    click.echo(f"certificate: {public}")
    click.echo(f"private key: {private} (mode 0600)")
    click.echo(f"SHA-256 fingerprint: {digest}")
