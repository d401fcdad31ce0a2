"""What the CUDA tests build, each thing once per test session.

- the emulated module: csrc/cuda/executor.cu and module.cpp compiled by g++ with
  FASTVGG_CUDA_EMULATE into ``_cuda_emulated``, the real module's bindings over the CPU grid
  emulator (csrc/cuda/emulator.h), its CUDA threads run as fibers;
- the emulator self-test (csrc/cuda/emulator_selftest.cpp) with sanitizers, optionally from
  a copy of csrc/cuda with one edit (the deliberately broken kernel of the race test);
- the real fastvgg._cuda, by CMake and nvcc for sm_80/sm_90 with warnings as errors.

A missing tool (g++, pybind11, nvcc, cmake) skips the tests that need it, with the reason; a
build that fails is a test failure, with the compiler's output.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import pytest

from extension_builds import cmake_configure, require_cmake, require_pybind11

REPO = Path(__file__).resolve().parents[1]
CUDA_SOURCE = REPO / "csrc" / "cuda"
BUILD_TIMEOUT = 900  # seconds; a hung compiler must fail the test, not the CI job


@functools.lru_cache(maxsize=None)
def _session_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="fastvgg-cuda-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _compile(command, what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert result.returncode == 0, f"{what} failed:\n{' '.join(map(str, command))}\n{(result.stdout + result.stderr)[-8000:]}"


def gxx() -> str:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed: the CUDA kernels are emulated on the CPU by a g++ build")
    return compiler


EMULATE = ["-std=c++17", "-DFASTVGG_CUDA_EMULATE", "-pthread", "-Wall", "-Wextra", "-Werror"]


@functools.lru_cache(maxsize=None)
def emulated_module():
    """The _cuda_emulated extension module (built on first use)."""
    compiler = gxx()
    pybind11 = require_pybind11()
    out = _session_dir() / "emulated"
    out.mkdir(exist_ok=True)
    target = out / ("_cuda_emulated" + sysconfig.get_config_var("EXT_SUFFIX"))
    includes = [f"-I{CUDA_SOURCE}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    _compile(
        [compiler, *EMULATE, "-O1", "-shared", "-fPIC", "-fvisibility=hidden", "-DFASTVGG_CUDA_MODULE_NAME=_cuda_emulated",
         *includes, "-x", "c++", str(CUDA_SOURCE / "executor.cu"), str(CUDA_SOURCE / "module.cpp"), "-o", str(target)],
        "building the emulated CUDA module",
    )  # fmt: skip
    spec = importlib.util.spec_from_file_location("_cuda_emulated", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def selftest_binary(name: str, sanitize_flags, source_dir: Path = CUDA_SOURCE, os_threads: bool = True) -> Path:
    """The emulator self-test built with the given -fsanitize flags from source_dir; with
    os_threads, every emulated CUDA thread is an OS thread (what the sanitizers need), else a fiber."""
    target = _session_dir() / name
    mode = ["-DFASTVGG_EMULATOR_OS_THREADS"] if os_threads else []
    _compile(
        [gxx(), *EMULATE, *mode, "-O1", "-g", "-fno-omit-frame-pointer", *sanitize_flags, f"-I{source_dir}",
         "-x", "c++", str(source_dir / "executor.cu"), str(source_dir / "emulator_selftest.cpp"), "-o", str(target)],
        f"building the emulator self-test ({name})",
    )  # fmt: skip
    return target


def broken_copy(file: str, remove_line: str) -> Path:
    """A copy of csrc/cuda with one exact line removed from one file (which must hold it once)."""
    root = _session_dir() / f"broken-{abs(hash((file, remove_line)))}"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(CUDA_SOURCE, root)
    text = (root / file).read_text()
    assert text.count(remove_line) == 1, f"{file} no longer holds exactly one {remove_line.strip()!r}"
    (root / file).write_text(text.replace(remove_line, ""))
    return root


def nvcc() -> str:
    compiler = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if not compiler:
        pytest.skip("nvcc is not installed: the real CUDA module cannot be compiled here")
    return compiler


@functools.lru_cache(maxsize=None)
def nvcc_build():
    """(directory, build log) of fastvgg._cuda built by CMake + nvcc, -Werror and ptxas -v."""
    compiler = nvcc()
    cmake = require_cmake()
    build = _session_dir() / "nvcc"
    configure = cmake_configure(build, [
        "-DFASTVGG_CUDA=ON", "-DFASTVGG_CUDA_WERROR=ON", "-DFASTVGG_CUDA_PTXAS_VERBOSE=ON",
        f"-DCMAKE_CUDA_COMPILER={compiler}",
        "-DCMAKE_BUILD_TYPE=Release",
    ])  # fmt: skip
    _compile(configure, "configuring the CUDA build")
    # Only the CUDA module: the CPU core is built (and tested) by the ordinary install.
    step = [cmake, "--build", str(build), "--target", "_cuda", "--parallel", str(os.cpu_count() or 2)]
    result = subprocess.run(step, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"building fastvgg._cuda with nvcc failed:\n{log[-8000:]}"
    return build, log
