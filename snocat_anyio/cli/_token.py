"""``snocat token add / revoke / list``: edit the aggregator's tokens file."""

from __future__ import annotations

import secrets
from pathlib import Path

import rich_click as click

from snocat_proto._service.tokens import POOL_FLAG
from snocat_proto._wire.auth import validate_tunnel_name
from snocat_proto._wire.errors import LocalProtocolError

from ._common import UsageProblem, default_state_dir
from ._group import cli
from ._tokens import line_name, read_tokens_text, rewrite_tokens

#: The secret of a new name: 24 random bytes, 32 URL-safe characters.
SECRET_BYTES = 24


def _tokens_option(function: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--tokens",
        "tokens_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="The tokens file [default: the state directory's, as `snocat server` uses "
        "without --tokens].",
    )(function)


def _path(tokens_path: Path | None) -> Path:
    return tokens_path if tokens_path is not None else default_state_dir() / "tokens"


@cli.group()
def token() -> None:
    """Add, revoke and list the tunnel names of a tokens file. A running server notices
    the change within 2 s (or at once on SIGHUP) and keeps every other tunnel."""


@token.command()
@click.argument("name")
@_tokens_option
@click.option(
    "--pool",
    is_flag=True,
    help="Make NAME a pool: several clients may serve it at once, sharing this token "
    "(the line gets the flag `pool`).",
)
def add(name: str, tokens_path: Path | None, pool: bool) -> None:
    """Give NAME a new secret and print its line, `NAME SECRET`, once: the client's
    --token-file (e.g. `snocat token add office-1 > office-1.token`)."""
    path = _path(tokens_path)
    try:
        validate_tunnel_name(name)
    except LocalProtocolError as exc:
        raise UsageProblem(f"NAME: {exc.reason}") from None
    _, tokens = read_tokens_text(path, missing_ok=True)
    if name in tokens:
        raise UsageProblem(f"{name!r} already has a token in {path}; revoke it first")
    line = f"{name} {secrets.token_urlsafe(SECRET_BYTES)}\n"
    stored = line.replace("\n", f" {POOL_FLAG}\n") if pool else line
    rewrite_tokens(path, lambda lines: [*lines, stored])
    click.echo(line, nl=False)
    click.echo(
        f"added {name} to {path} (mode 0600); the 'NAME SECRET' line on stdout is the "
        "client's --token-file, and is not shown again",
        err=True,
    )


@token.command()
@click.argument("name")
@_tokens_option
def revoke(name: str, tokens_path: Path | None) -> None:
    """Remove NAME: a running server closes its tunnel, and the client stops (exit 3)."""
    path = _path(tokens_path)
    _, tokens = read_tokens_text(path, missing_ok=False)
    if name not in tokens:
        known = ", ".join(tokens) or "none"
        raise UsageProblem(f"{name!r} has no token in {path} (names: {known})")
    rewrite_tokens(path, lambda lines: [line for line in lines if line_name(line) != name])
    click.echo(f"revoked {name} in {path}", err=True)
    if len(tokens) == 1:
        click.echo(
            "the file lists no names now: a running server keeps its previous tokens "
            "until it is stopped",
            err=True,
        )


@token.command(name="list")
@_tokens_option
def list_names(tokens_path: Path | None) -> None:
    """Print the tunnel names, one a line (never a secret)."""
    _, tokens = read_tokens_text(_path(tokens_path), missing_ok=False)
    for name in tokens:
        click.echo(name)
