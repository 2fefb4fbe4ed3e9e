"""``python -m fuzz``: run the harnesses under atheris, replay the corpus, make seeds.

python -m fuzz [--minutes M] [--harness NAME ...] [--jobs N]
    Fuzz every harness (or the named ones) for M minutes of wall time in all
    (default 10), N harnesses at a time (default: CPU count).  New inputs go to
    fuzz/crashes/<harness>/corpus (not the committed corpus), crashes to
    fuzz/crashes/<harness>/.  Exit status 1 if any harness crashed.
python -m fuzz run NAME [LIBFUZZER ARGS...]
    One harness under atheris, instrumented; the arguments go to libFuzzer
    (``-max_total_time=60``, ``-runs=1000``, corpus directories, a crash file...).
python -m fuzz replay [NAME ...]
    Every committed corpus file through its harness, without atheris.
python -m fuzz seeds [NAME ...]
    Rewrite the committed seed corpus (fuzz/corpus/) of every harness (or the named
    ones) from fuzz/seeds.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
CORPUS_DIR = FUZZ_DIR / "corpus"
CRASH_DIR = FUZZ_DIR / "crashes"

#: Harness names, without importing snocat (see run_one).
NAMES = (
    "framing",
    "address",
    "targets",
    "nyan_acceptor",
    "nyan_opener",
    "simple_ack_listener",
    "simple_ack_connector",
    "token_listener",
    "token_connector",
    "proxyme_server",
    "proxyme_client",
    "sni",
    "http_host",
    "proxy_protocol",
    "names",
    "udp_codecs",
    "udp_flow_table",
    "endpoint_datagrams",
    "endpoint_handshaken",
    "client_handshaken",
)
#: Largest input libFuzzer generates for each harness (bytes).
MAX_LEN = {"endpoint_datagrams": 8192, "endpoint_handshaken": 8192, "client_handshaken": 8192}
DEFAULT_MAX_LEN = 4096


def libfuzzer_command(name: str, seconds: int, work: Path, *extra: str) -> list[str]:
    """The command that fuzzes ``name`` for ``seconds``: new inputs into ``work/corpus``,
    crash files into ``work``, the committed corpus read as seeds only."""
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        "-m",
        "fuzz",
        "run",
        name,
        f"-max_total_time={seconds}",
        f"-max_len={MAX_LEN.get(name, DEFAULT_MAX_LEN)}",
        "-timeout=30",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={work}{os.sep}",
        *extra,
        str(work / "corpus"),
        str(CORPUS_DIR / name),
    ]


def run_one(name: str, argv: list[str]) -> None:
    """Fuzz one harness in this process (what ``python -m fuzz run`` does)."""
    import atheris  # type: ignore[import-untyped]

    # The code under test must be imported inside the hook to be instrumented.
    with atheris.instrument_imports(include=["snocat_proto", "fuzz"]):
        from fuzz.harnesses import HARNESSES
    atheris.Setup([sys.argv[0], *argv], HARNESSES[name])
    atheris.Fuzz()


def replay(names: list[str]) -> int:
    """Feed every committed corpus file to its harness; the number of files."""
    from fuzz.harnesses import HARNESSES

    count = 0
    for name in names:
        harness = HARNESSES[name]
        for path in sorted((CORPUS_DIR / name).iterdir()):
            try:
                harness(path.read_bytes())
            except BaseException:
                print(f"{name}: {path} fails", file=sys.stderr)
                raise
            count += 1
    return count


def fuzz_all(names: list[str], minutes: float, jobs: int) -> int:
    """Fuzz ``names`` for ``minutes`` in all, ``jobs`` at a time; 0 if nothing crashed."""
    rounds = -(-len(names) // jobs)
    seconds = max(1, int(minutes * 60 / rounds))
    print(f"fuzzing {len(names)} harnesses, {seconds} s each, {jobs} at a time", flush=True)

    def one(name: str) -> tuple[str, int, str]:
        work = CRASH_DIR / name
        command = libfuzzer_command(name, seconds, work)
        started = time.monotonic()
        result = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, errors="replace", check=False
        )
        took = time.monotonic() - started
        tail = "\n".join(result.stderr.splitlines()[-40:])
        status = "ok" if result.returncode == 0 else f"CRASH (exit {result.returncode})"
        print(f"{name}: {status} after {took:.0f} s", flush=True)
        return name, result.returncode, tail

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(one, names))
    failed = [(name, tail) for name, code, tail in results if code != 0]
    for name, tail in failed:
        print(f"\n=== {name} ===\n{tail}\nartifacts: {CRASH_DIR / name}", file=sys.stderr)
    return 1 if failed else 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        if len(sys.argv) < 3 or sys.argv[2] not in NAMES:
            print(f"usage: python -m fuzz run NAME [ARGS]; NAME is one of {', '.join(NAMES)}")
            return 2
        run_one(sys.argv[2], sys.argv[3:])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "replay":
        names = sys.argv[2:] or list(NAMES)
        print(f"replayed {replay(names)} corpus files")
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "seeds":
        from fuzz.seeds import write_corpus

        write_corpus(CORPUS_DIR, sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall time in all")
    parser.add_argument("--harness", action="append", choices=NAMES, help="repeatable")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    return fuzz_all(args.harness or list(NAMES), args.minutes, max(1, args.jobs))


if __name__ == "__main__":
    sys.exit(main())
