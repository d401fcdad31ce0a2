"""The portable C++ core, built and tested without Python: natively, and for aarch64 under qemu.

tests/cpp/kernel_tests.cpp checks the generic kernels, the weight packing and the reference
kernels against exact results with bounds derived from the arithmetic. Here it is compiled
with every C++ source except the Python bindings (the kernel sources as CMake's generic ISA
object compiles them: FASTVGG_ISA=generic) and run

* natively, with the host's g++;
* cross-compiled by Debian's aarch64-linux-gnu-g++ (package g++-aarch64-linux-gnu) and run
  under qemu-aarch64 (package qemu-user) with the aarch64 sysroot: the package's C++ must
  build on a machine with no x86 intrinsics at all, and the plain kernels must give correct
  numbers there (a compiler that fuses a*b + c into one instruction included).

Without the cross compiler or qemu that half is skipped, with the reason; .ci/run installs
both. The cross build uses -O1 to stay quick; qemu runs the binary in a few seconds.
What this does not cover: the Python extension on aarch64 (pybind11 and a Python for aarch64
are not installed here), and the speed of the generic kernels on real aarch64 hardware.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
DRIVER = REPO / "tests" / "cpp" / "kernel_tests.cpp"
CROSS_COMPILER = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
TIMEOUT = 600
ELF_MACHINE_AARCH64 = 183


def source_groups():
    """(kernel sources, other sources): the kernels as CMakeLists.txt lists them, the rest of
    csrc/*.cpp without the Python bindings."""
    cmake = (REPO / "CMakeLists.txt").read_text()
    listed = re.search(r"set\(FASTVGG_KERNEL_SOURCES([^)]*)\)", cmake)
    assert listed, "CMakeLists.txt no longer sets FASTVGG_KERNEL_SOURCES; update source_groups()"
    kernels = [REPO / name for name in listed.group(1).split()]
    assert kernels and all(path.is_file() for path in kernels), kernels
    others = [path for path in sorted(CSRC.glob("*.cpp")) if path not in kernels and path.name != "bindings.cpp"]
    return kernels, others


def build_driver(compiler: str, opt: str, out_dir: Path) -> Path:
    kernels, others = source_groups()
    common = [compiler, "-std=c++17", opt, "-fopenmp", "-Wall", f"-I{CSRC}", "-c"]
    jobs = [common + ["-DFASTVGG_ISA=generic", "-DFASTVGG_ISA_IS_GENERIC=1", str(src)] for src in kernels]
    jobs += [common + ["-DFASTVGG_HAVE_GENERIC=1", str(src)] for src in others + [DRIVER]]
    objects = []
    for index, job in enumerate(jobs):
        objects.append(out_dir / f"{index:02d}_{Path(job[-1]).stem}.o")
        job += ["-o", str(objects[-1])]

    def run(job):
        return subprocess.run(job, capture_output=True, text=True, timeout=TIMEOUT)

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        for job, result in zip(jobs, pool.map(run, jobs)):
            assert result.returncode == 0, f"{' '.join(job)}\n{result.stderr[-4000:]}"
    binary = out_dir / "kernel_tests"
    link = [compiler, "-fopenmp", *map(str, objects), "-o", str(binary)]
    result = run(link)
    assert result.returncode == 0, f"{' '.join(link)}\n{result.stderr[-4000:]}"
    return binary


def assert_all_passed(result: subprocess.CompletedProcess, where: str) -> None:
    output = result.stdout + result.stderr
    summary = re.search(r"(\d+) passed, (\d+) failed", output)
    assert result.returncode == 0 and summary and summary.group(2) == "0", f"{where}:\n{output[-6000:]}"
    assert int(summary.group(1)) >= 100, f"{where}: only {summary.group(1)} checks ran"


def test_cpp_kernel_tests_native(tmp_path):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed")
    binary = build_driver(compiler, "-O2", tmp_path)
    assert_all_passed(subprocess.run([str(binary)], capture_output=True, text=True, timeout=TIMEOUT), "native")


def test_cpp_kernel_tests_aarch64_under_qemu(tmp_path):
    missing = [
        what
        for what, present in (
            (f"{CROSS_COMPILER} (apt-get install g++-aarch64-linux-gnu)", shutil.which(CROSS_COMPILER)),
            (f"{QEMU} (apt-get install qemu-user)", shutil.which(QEMU)),
            (f"the aarch64 sysroot {AARCH64_SYSROOT} (comes with g++-aarch64-linux-gnu)", AARCH64_SYSROOT.is_dir()),
        )
        if not present
    ]
    if missing:
        pytest.skip("cannot cross-build for aarch64 here; missing: " + "; ".join(missing))
    binary = build_driver(CROSS_COMPILER, "-O1", tmp_path)
    header = binary.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == ELF_MACHINE_AARCH64, (
        "the cross build did not produce an aarch64 executable"
    )
    result = subprocess.run(
        [QEMU, "-L", str(AARCH64_SYSROOT), str(binary)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert_all_passed(result, "aarch64 under qemu")
