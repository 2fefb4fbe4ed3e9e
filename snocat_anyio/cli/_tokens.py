"""The server's tokens: where they come from, reloading them, and editing the file.

A server's tokens are its ``--tokens`` file's plus the ``[tokens]`` table of its
``--config`` file.  :class:`TokenReloader` reads them again on SIGHUP and whenever
one of the files changes (polled, by inode, size and modification time): the server
keeps every tunnel whose token is unchanged (``TunnelServer.replace_tokens``).  A
file that no longer parses changes nothing: the old tokens stay, with a warning.

``snocat token add / revoke / list`` edit a tokens file in place of a text editor:
every other line and comment is kept, and the new file (mode 0600) replaces the old
one in one ``os.replace``, so a server polling it never reads half a file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from snocat_proto._service.tokens import MIN_SECRET_LENGTH, parse_token_file, parse_tokens
from snocat_proto._wire.auth import validate_tunnel_name
from snocat_proto._wire.errors import LocalProtocolError

from .._server import TunnelServer
from ._common import UsageProblem, logger, read_file
from ._config import ConfigFile, read_config

#: How often the files are looked at.
POLL_INTERVAL = 1.0
#: A file seen changing is read only once it has stayed the same this long (a writer
#: that truncates, then writes, is not caught halfway).
SETTLE_TIME = 0.3

Signature = tuple[tuple[int, int, int, int] | None, ...]


@dataclass(frozen=True)
class TokenSources:
    """The files a server's tokens are read from."""

    file: Path | None
    config: Path | None

    def paths(self) -> tuple[Path, ...]:
        return tuple(path for path in (self.file, self.config) if path is not None)

    def describe(self) -> str:
        return " and ".join(str(path) for path in self.paths())

    def load(self, config: ConfigFile | None = None) -> dict[str, bytes]:
        """Every token, or a :class:`UsageProblem` naming the file and line."""
        return self.load_with_pools(config)[0]

    def load_with_pools(
        self, config: ConfigFile | None = None
    ) -> tuple[dict[str, bytes], frozenset[str]]:
        """Every token, and the names the tokens file marks as pools (``NAME SECRET
        pool``), or a :class:`UsageProblem` naming the file and line."""
        tokens: dict[str, bytes] = {}
        pools: frozenset[str] = frozenset()
        if self.file is not None:
            text = read_file(self.file, "tokens file").decode("utf-8", "replace")
            try:
                parsed = parse_token_file(text, source=str(self.file))
            except LocalProtocolError as exc:
                raise UsageProblem(exc.reason) from None
            tokens, pools = parsed.tokens, parsed.pools
        if self.config is not None:
            if config is None:
                config = read_config(self.config)
            for name, secret in config_tokens(config).items():
                if name in tokens and tokens[name] != secret:
                    raise config.problem(
                        f"[tokens] {name!r} has another secret in {self.file}; keep one",
                        name,
                        "tokens",
                    )
                tokens[name] = secret
        return tokens, pools

    def signature(self) -> Signature:
        """What changes when a file is written or replaced (None: it is missing)."""
        marks: list[tuple[int, int, int, int] | None] = []
        for path in self.paths():
            try:
                stat = os.stat(path)
            except OSError:
                marks.append(None)
            else:
                marks.append((stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        return tuple(marks)


def config_tokens(config: ConfigFile) -> dict[str, bytes]:
    """The ``[tokens]`` table (``name = "secret"``), each entry checked."""
    value = config.data.get("tokens")
    if value is None or isinstance(value, str):
        return {}  # a string names the --tokens file instead
    if not isinstance(value, dict):
        raise config.problem("tokens must be a file name or a [tokens] table", "tokens")
    tokens: dict[str, bytes] = {}
    for name, secret in value.items():
        try:
            validate_tunnel_name(name)
        except LocalProtocolError as exc:
            raise config.problem(f"[tokens] {exc.reason}", name, "tokens") from None
        if not isinstance(secret, str):
            raise config.problem(f"[tokens] {name} must be a string (the secret)", name, "tokens")
        if len(secret) < MIN_SECRET_LENGTH or any(char.isspace() for char in secret):
            raise config.problem(
                f"[tokens] the secret for {name!r} must be {MIN_SECRET_LENGTH}+ characters "
                "without spaces",
                name,
                "tokens",
            )
        tokens[name] = secret.encode("utf-8")
    return tokens


class TokenReloader:
    """Reloads a running server's tokens on demand and when their files change."""

    def __init__(self, server: TunnelServer, sources: TokenSources) -> None:
        self.server = server
        self.sources = sources
        self._seen = sources.signature()

    def reload(self, trigger: str) -> bool:
        """Read the files now; True if the server took the new tokens."""
        self._seen = self.sources.signature()
        try:
            tokens, pools = self.sources.load_with_pools()
        except UsageProblem as exc:
            logger.warning("%s: %s; keeping the previous tokens", trigger, exc.format_message())
            return False
        if not tokens:
            logger.warning(
                "%s: %s lists no tunnel names; keeping the previous tokens "
                "(stop the server to admit none)",
                trigger,
                self.sources.describe(),
            )
            return False
        logger.info("%s: reading the tokens from %s", trigger, self.sources.describe())
        self.server.replace_tokens(tokens, pools)
        return True

    async def watch(self, interval: float = POLL_INTERVAL) -> None:
        """Poll the files; reload once a change has settled."""
        while True:
            await anyio.sleep(interval)
            changed = self.sources.signature()
            if changed == self._seen:
                continue
            await anyio.sleep(SETTLE_TIME)
            if self.sources.signature() == changed:
                self.reload("a tokens file changed")


# Editing a tokens file -----------------------------------------------------------


def read_tokens_text(path: Path, *, missing_ok: bool) -> tuple[str, dict[str, bytes]]:
    """The file's text and tokens; a file that does not parse is not edited."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return "", {}
        raise UsageProblem(
            f"no tokens file at {path} (add a name with 'snocat token add')"
        ) from None
    except OSError as exc:
        raise UsageProblem(f"cannot read tokens file {str(path)!r}: {exc.strerror}") from None
    text = raw.decode("utf-8", "replace")
    try:
        return text, parse_tokens(text, source=str(path))
    except LocalProtocolError as exc:
        raise UsageProblem(f"{exc.reason}; fix it before editing the file") from None


def rewrite_tokens(path: Path, edit: Callable[[list[str]], list[str]]) -> None:
    """Replace ``path`` (mode 0600) by ``edit`` of its lines, in one ``os.replace``."""
    target = Path(os.path.realpath(path))
    text, _ = read_tokens_text(target, missing_ok=True)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    content = "".join(edit(lines))
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".new"
        )
    except OSError as exc:
        raise UsageProblem(f"cannot write next to {target}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:  # mkstemp: mode 0600
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise UsageProblem(f"cannot write {target}: {exc.strerror or exc}") from None
    with contextlib.suppress(OSError, AttributeError):
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def line_name(line: str) -> str | None:
    """The tunnel name a tokens-file line sets (None for blank lines and comments)."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    return stripped.split()[0]
