"""A short coverage-guided fuzz run (atheris, tests/fuzz/fuzz_loader.py) of the .keras archive
handling, of the parent's handling of what the structure reader sends back, and of whole
files through the isolated production path, from a seed corpus of every Keras layout.

Each target runs in its own process for a few seconds; any exception other than a
ValueError/OSError with a message, a crash or a hang fails the test, and libFuzzer leaves the
input under ``tmp_path`` and prints it. tests/fuzz/README.md says how to run longer and what
longer runs found. Skipped, with the reason, where atheris is not installed.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris, or fastvgg[test]): no fuzz run")

FUZZ_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz")
sys.path.insert(0, FUZZ_DIR)

import build_corpus  # noqa: E402

# (target, seconds, seed suffixes, fewest executions that show it really ran)
RUNS = [
    ("archive", 12, (".keras",), 100),
    ("structure", 6, (".json",), 1000),
    ("loader", 12, (".h5",), 5),
]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    directory = tmp_path_factory.mktemp("seeds")
    build_corpus.build(str(directory))
    return directory


@pytest.mark.parametrize("target, seconds, suffixes, fewest", RUNS, ids=[r[0] for r in RUNS])
def test_short_fuzz_run(seeds, tmp_path, target, seconds, suffixes, fewest):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed in seeds.iterdir():
        if seed.name.endswith(suffixes) and not (target == "loader" and seed.name.endswith(".json")):
            shutil.copy(seed, corpus)
    assert any(corpus.iterdir()), "no seeds for this target"
    artifacts = tmp_path / "findings"
    artifacts.mkdir()
    # libFuzzer's RSS limit reads the peak RSS, which Linux carries across exec from the process
    # that spawned it (this pytest process: gigabytes after the Keras tests), so the limit is
    # 4 GiB above what the child starts with.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    command = [sys.executable, os.path.join(FUZZ_DIR, "fuzz_loader.py"), target, str(corpus),
               f"-max_total_time={seconds}", "-timeout=60", f"-rss_limit_mb={4096 + inherited_mb}", "-seed=1",
               f"-artifact_prefix={artifacts}{os.sep}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 240)
    log = result.stdout + result.stderr
    findings = sorted(p.name for p in artifacts.iterdir())
    assert result.returncode == 0 and not findings, f"fuzzing {target} found {findings}:\n{log[-6000:]}"
    runs = re.search(r"Done (\d+) runs", log)
    assert runs and int(runs.group(1)) >= fewest, f"the fuzzer hardly ran:\n{log[-3000:]}"
