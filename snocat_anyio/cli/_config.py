"""``--config FILE``: a command's options in a TOML file (read with :mod:`tomllib`).

Each top-level key is a long option without its dashes (``max-tunnels = 1000``,
``target = ["127.0.0.1:8000"]``, ``reconnect = false``); the file's values become
click's ``default_map``, so a flag on the command line beats the file, which beats
the built-in default.  Paths are relative to the file's directory.  A command may
accept tables too (the server's ``[tokens]``).  A ``[fleet]`` table is refused with
a pointer to the top-level fleet keys (``registry = ...``); any other unknown key is
an error.  Every error names the file, the line and the key.
"""

from __future__ import annotations

import difflib
import functools
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rich_click as click
from click.types import FloatParamType, IntParamType

from ._common import UsageProblem, read_file

#: Where the loaded file is kept for the command (``ctx.meta``).
CONFIG_META = "snocat.config"
#: Tables no command accepts, and why (what to write instead).
RESERVED_TABLES = {
    "fleet": "is not a table: the fleet's settings are top-level keys like the others "
    "(registry, node, advertise, fleet-token-file, workers; see docs/fleet.md)"
}
_TABLE_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_DECODE_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


@dataclass(frozen=True)
class ConfigFile:
    """A parsed config file, with its text to find a key's line in."""

    path: Path
    text: str
    data: Mapping[str, Any]

    def line_of(self, key: str, table: str | None = None) -> int:
        """The line where ``key`` is set (in ``[table]``, if given): for messages.

        A top-level key that is a table is found at its ``[key]`` header."""
        current: str | None = None
        header = 1
        key_pattern = re.compile(rf"""^\s*(["']?){re.escape(key)}\1\s*=""")
        for number, line in enumerate(self.text.splitlines(), start=1):
            match = _TABLE_HEADER.match(line)
            if match:
                current = match.group(1).strip("\"'")
                if table is None and current == key:
                    return number
                if current == table:
                    header = number
                continue
            if current == table and key_pattern.match(line):
                return number
        return header

    def problem(self, message: str, key: str, table: str | None = None) -> UsageProblem:
        return UsageProblem(f"{self.path} line {self.line_of(key, table)}: {message}")

    def table(self, name: str) -> Mapping[str, Any]:
        value = self.data.get(name)
        return value if isinstance(value, dict) else {}


def read_config(path: Path) -> ConfigFile:
    """Parse ``path`` (a decode error names its line and column)."""
    raw = read_file(path, "--config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageProblem(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        line = getattr(exc, "lineno", None)
        column = getattr(exc, "colno", None)
        position = _DECODE_POSITION.search(message)
        if position is not None:
            message = message[: position.start()]
            line, column = line or int(position.group(1)), column or int(position.group(2))
        where = f" line {line}, column {column}" if line else ""
        raise UsageProblem(f"{path}{where}: not valid TOML: {message}") from None
    return ConfigFile(path, text, data)


def option_key(param: click.Parameter) -> str | None:
    """The key of an option in a config file: its long name without the dashes."""
    if not isinstance(param, click.Option) or param.name in ("config_path", "help"):
        return None
    for opt in param.opts:
        if opt.startswith("--"):
            return opt[2:]
    return None


def config_option(*, tables: Collection[str] = ()) -> Callable[..., Any]:
    """``--config FILE`` for a command; ``tables`` are the tables it accepts."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        is_eager=True,
        callback=functools.partial(_load, tables=frozenset(tables)),
        help="TOML file with any of these options (keys as the long flags, without "
        "dashes; see docs/). Flags on the command line win over the file.",
    )


def _load(
    ctx: click.Context, param: click.Parameter, value: Path | None, *, tables: frozenset[str]
) -> Path | None:
    if value is None or ctx.resilient_parsing:
        return value
    config = read_config(value)
    ctx.default_map = {**(ctx.default_map or {}), **defaults(config, ctx, tables)}
    ctx.meta[CONFIG_META] = config
    return value


def loaded_config(ctx: click.Context) -> ConfigFile | None:
    config = ctx.meta.get(CONFIG_META)
    return config if isinstance(config, ConfigFile) else None


def defaults(config: ConfigFile, ctx: click.Context, tables: Collection[str]) -> dict[str, Any]:
    """The ``default_map`` for ``ctx.command`` from ``config``, every value checked."""
    options = {key: param for param in ctx.command.params if (key := option_key(param)) is not None}
    found: dict[str, Any] = {}
    for key, value in config.data.items():
        if key in tables and isinstance(value, dict):
            continue  # the command reads its tables itself
        if key in RESERVED_TABLES:
            raise config.problem(f"[{key}] {RESERVED_TABLES[key]}", key)
        param = options.get(key)
        if param is None:
            known = sorted({*options, *tables})
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise config.problem(
                f"unknown setting {key!r} for snocat {ctx.command.name}{hint}; "
                f"known: {', '.join(known)}",
                key,
            )
        assert param.name is not None
        found[param.name] = _checked(config, ctx, key, param, value)
    return found


def _checked(
    config: ConfigFile, ctx: click.Context, key: str, param: click.Parameter, value: object
) -> object:
    """``value`` if it has the option's type and passes its checks (ranges, choices)."""
    values = value if param.multiple and isinstance(value, list) else [value]
    kind, what = _toml_type(param)
    for item in values:
        if not isinstance(item, kind) or (isinstance(item, bool) and bool not in kind):
            expected = f"{what} or a list of them" if param.multiple else what
            raise config.problem(f"{key} must be {expected}, not {_describe(item)}", key)
    if isinstance(param.type, click.Path):
        values = [str(_relative_to(config.path.parent, str(item))) for item in values]
    for item in values:
        try:
            param.type.convert(item, param, ctx)
        except click.BadParameter as exc:
            raise config.problem(f"{key}: {exc.message}", key) from None
    return values if param.multiple else values[0]


def _toml_type(param: click.Parameter) -> tuple[tuple[type, ...], str]:
    if isinstance(param, click.Option) and param.is_bool_flag:
        return (bool,), "true or false"
    if isinstance(param.type, IntParamType):
        return (int,), "an integer"
    if isinstance(param.type, FloatParamType):
        return (int, float), "a number"
    return (str,), "a string"


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _relative_to(directory: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else directory / path
