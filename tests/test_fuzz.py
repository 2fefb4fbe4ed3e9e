"""The fuzz harnesses (fuzz/), in the default test run: a short bounded atheris run each.

* Every committed corpus file goes through its harness in this process, always: the
  seeds are the protocol's wire traces, and a crash that once was found stays found.
* With atheris installed (the ``test`` extra installs it on Linux x86-64, where wheels
  exist), every harness also runs coverage-guided for ``SNOCAT_FUZZ_SECONDS`` (default
  2, after its seeds) in a subprocess; harnesses run in parallel, one per CPU.  New inputs go to a
  temporary directory, never into the committed corpus.
* ``-m slow`` runs each harness for a minute instead.

The long run is ``python -m fuzz --minutes 10`` (docs/security.md).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from fuzz.__main__ import CORPUS_DIR, NAMES, ROOT, libfuzzer_command
from fuzz.harnesses import HARNESSES

HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
SHORT_SECONDS = int(os.environ.get("SNOCAT_FUZZ_SECONDS", "2"))
LONG_SECONDS = 60
needs_atheris = pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is not installed")


@dataclass(frozen=True)
class Run:
    name: str
    returncode: int
    output: str
    work: Path

    def explain(self) -> str:
        crashes = sorted(p for p in self.work.iterdir() if p.is_file())
        shown = (
            "\n".join(f"{p.name}: {p.read_bytes()[:200]!r}" for p in crashes[:3])
            or "(no crash file)"
        )
        tail = "\n".join(self.output.splitlines()[-60:])
        return f"atheris found a crash in {self.name} (exit {self.returncode}):\n{shown}\n{tail}"


def run_all(names: tuple[str, ...], seconds: int, base: Path) -> dict[str, Run]:
    def one(name: str) -> Run:
        work = base / name
        command = libfuzzer_command(name, seconds, work)
        result = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=seconds + 120,
            check=False,
        )
        return Run(name, result.returncode, result.stderr + result.stdout, work)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return {run.name: run for run in pool.map(one, names)}


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    yield run_all(NAMES, SHORT_SECONDS, tmp_path_factory.mktemp("fuzz"))


def test_every_harness_is_known_to_the_runner_and_has_seeds() -> None:
    assert set(NAMES) == set(HARNESSES)
    for name in NAMES:
        seeds = list((CORPUS_DIR / name).iterdir())
        assert seeds, f"no seeds for {name}"
        assert all(p.stat().st_size <= 8192 for p in seeds)


@pytest.mark.parametrize("name", NAMES)
def test_the_corpus_replays_cleanly(name: str) -> None:
    harness = HARNESSES[name]
    for path in sorted((CORPUS_DIR / name).iterdir()):
        harness(path.read_bytes())


@needs_atheris
@pytest.mark.parametrize("name", NAMES)
def test_a_short_atheris_run_finds_nothing(name: str, short_runs: dict[str, Run]) -> None:
    run = short_runs[name]
    assert run.returncode == 0, run.explain()
    assert "Done" in run.output, run.output[-2000:]


@pytest.mark.slow
@needs_atheris
def test_a_minute_of_atheris_per_harness_finds_nothing(tmp_path: Path) -> None:
    runs = run_all(NAMES, LONG_SECONDS, tmp_path)
    failed = [run.explain() for run in runs.values() if run.returncode != 0]
    assert not failed, "\n\n".join(failed)


def test_the_runner_replays_without_atheris() -> None:
    """``python -m fuzz replay`` works in a process that never imports atheris."""
    result = subprocess.run(
        [sys.executable, "-m", "fuzz", "replay", "framing", "address"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "replayed" in result.stdout
