"""Generate snocat_sync's flows from snocat_anyio's: one source for both bindings.

The flows that wait (the aggregator's and the client's) are written once, as async
code in ``snocat_anyio``; their blocking copies in ``snocat_sync`` are made by the
token substitutions below (httpcore's ``scripts/unasync.py`` does the same).  The
names a flow imports from ``._backend``, ``._host``, ``._stream`` ... exist in both
bindings with the same meaning; the real differences live there.

    python scripts/unasync.py           # write the copies
    python scripts/unasync.py --check   # fail if a copy is not what it would write (CI)

Besides substituting, it refuses an ``await`` inside a ``with self._lock:`` block of
a source: in the blocking copy that lock is real, and blocking under it stalls the pump.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "snocat_anyio"
TARGET = ROOT / "snocat_sync"
#: The modules generated, by name (the same in both packages).
FILES = (
    "_server_flows.py",
    "_client_flows.py",
    "_dial.py",
    "_feed.py",
    "_udp.py",
    "_shared_listeners.py",
    "_server_udp.py",
    "_client_udp.py",
    "_errors.py",
    "_bind.py",
)

SUBSTITUTIONS = [
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait\s+", ""),
    (r"\baclose\b", "close"),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\b__aiter__\b", "__iter__"),
    (r"\b__anext__\b", "__next__"),
    (r"\bStopAsyncIteration\b", "StopIteration"),
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\bAsyncIterable\b", "Iterable"),
]

HEADER = "# Generated from snocat_anyio/{name} by scripts/unasync.py: do not edit.\n"


def check_locks(path: Path, text: str) -> list[str]:
    """Every ``await`` under ``with self._lock:`` in ``text``, as messages."""
    problems: list[str] = []
    for node in ast.walk(ast.parse(text, str(path))):
        if not isinstance(node, ast.With):
            continue
        if not any(ast.unparse(item.context_expr) == "self._lock" for item in node.items):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Await | ast.AsyncWith | ast.AsyncFor):
                problems.append(
                    f"{path.relative_to(ROOT)}:{inner.lineno}: waits while holding self._lock"
                )
    return problems


def unasync(text: str, name: str) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        text = re.sub(pattern, replacement, text)
    return format_source(HEADER.format(name=name) + text)


def format_source(text: str) -> str:
    """The text as ``ruff format`` writes it (the project's formatter)."""
    ruff = Path(sys.executable).with_name("ruff")
    command = [str(ruff) if ruff.exists() else "ruff", "format", "--stdin-filename", "x.py", "-"]
    done = subprocess.run(command, input=text, capture_output=True, text=True, check=True)
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args()
    failed = False
    for name in FILES:
        source = SOURCE / name
        text = source.read_text()
        for problem in check_locks(source, text):
            print(problem, file=sys.stderr)
            failed = True
        generated = unasync(text, name)
        target = TARGET / name
        current = target.read_text() if target.exists() else ""
        if current == generated:
            continue
        if args.check:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                generated.splitlines(keepends=True),
                str(target.relative_to(ROOT)),
                "generated",
            )
            sys.stderr.writelines(list(diff)[:40])
            print(
                f"{target.relative_to(ROOT)} is not generated from {source.relative_to(ROOT)}: "
                "run python scripts/unasync.py",
                file=sys.stderr,
            )
            failed = True
        else:
            target.write_text(generated)
            print(f"wrote {target.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
