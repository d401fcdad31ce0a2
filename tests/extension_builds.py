"""What the tests that build the extension again share: the build tools (cmake, pybind11),
and for the sanitizer tests (tests/test_sanitizers.py, tests/test_tsan.py) gcc's runtime
libraries, the extension built with a sanitizer option into a temporary copy of the package,
and the child processes that run under it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_SOURCE = REPO / "python" / "fastvgg"
CHILD_TIMEOUT = 900  # seconds; a hang must fail the test, not the CI job


def gcc_file(name: str):
    """The absolute path gcc links `name` from, or None (gcc missing, or without that library)."""
    gcc = shutil.which("g++") or shutil.which("gcc")
    if gcc is None:
        return None
    try:
        found = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    # gcc echoes the bare name back when it does not have the file.
    return os.path.realpath(found) if os.path.isabs(found) and os.path.exists(found) else None


def is_elf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def gcc_runtime(library: str, sanitizer: str) -> str:
    """gcc's `library` (libasan.so, libtsan.so) for preloading, or a skip saying what is missing."""
    if sys.platform != "linux":
        pytest.skip(f"the {sanitizer} run preloads gcc's {library}, which needs Linux")
    if shutil.which("g++") is None:
        pytest.skip(f"g++ is not installed, so there is no {sanitizer} runtime to build with")
    path = gcc_file(library)
    if path is None or not is_elf(path):
        pytest.skip(f"gcc has no {library} (install the {library.split('.')[0]} package of this gcc)")
    return path


def child_env(package_dir, **settings) -> dict:
    """This process's environment with `package_dir` first on PYTHONPATH, no forced ISA, no
    bytecode written, and `settings` (the preload, the sanitizer's options, the threads)."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(package_dir)] + [p for p in [env.get("PYTHONPATH")] if p]),
        PYTHONDONTWRITEBYTECODE="1",
        **settings,
    )
    env.pop("FASTVGG_ISA", None)
    return env


def run(args, env, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=CHILD_TIMEOUT)


def require_pybind11():
    """The pybind11 module (its headers and CMake files), or a skip saying how to get it."""
    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 is not installed (pip install pybind11)")
    return pybind11


def require_cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed (pip install cmake)")
    return cmake


def cmake_configure(build: Path, options) -> list:
    """The command that configures this repository's CMake build in `build` with `options`, as
    scikit-build-core would (project version, this Python and its pybind11; Ninja where there
    is one); skips where cmake or pybind11 is missing."""
    configure = [
        require_cmake(), "-S", str(REPO), "-B", str(build), *options,
        "-DSKBUILD_PROJECT_VERSION=0.0.0",
        f"-Dpybind11_DIR={require_pybind11().get_cmake_dir()}",
        f"-DPython_EXECUTABLE={sys.executable}",
    ]  # fmt: skip
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    return configure


def build_package(root: Path, cmake_option: str) -> Path:
    """A copy of the fastvgg package under `root` whose _core is built with `-D<cmake_option>=ON`
    (CMakeLists.txt: FASTVGG_SANITIZE, FASTVGG_TSAN), without -g and with the flags the option
    picks; skips where cmake or pybind11 is missing."""
    cmake = require_cmake()
    build = root / "build"
    configure = cmake_configure(build, [
        f"-D{cmake_option}=ON",
        "-DCMAKE_BUILD_TYPE=None",  # no -g (slow to compile) and no Release -O3; CMakeLists picks the level
        "-DCMAKE_CXX_COMPILER=g++",
    ])  # fmt: skip
    for step in (configure, [cmake, "--build", str(build), "--parallel", str(os.cpu_count() or 2)]):
        result = subprocess.run(step, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        assert result.returncode == 0, f"{' '.join(step)} failed:\n{(result.stdout + result.stderr)[-6000:]}"
    built = sorted(build.glob("_core*.so"))
    assert len(built) == 1, f"expected one built extension in {build}, found {built}"
    package = root / "package"
    shutil.copytree(PACKAGE_SOURCE, package / "fastvgg", ignore=shutil.ignore_patterns("_core*.so", "__pycache__"))
    shutil.copy2(built[0], package / "fastvgg")
    return package
