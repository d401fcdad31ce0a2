"""The CUDA kernels and executor under AddressSanitizer + UBSan and under ThreadSanitizer,
through the CPU grid emulator (csrc/cuda/emulator.h) in its OS-thread mode, which runs a
block's threads as real threads with __syncthreads as a real barrier.

The race test proves the harness can fail: it deletes the barrier between staging the GEMM
tiles in shared memory and reading them (csrc/cuda/kernels/gemm.cuh), in a copy compiled only
here, and ThreadSanitizer must report a data race in that build while the intact build stays
clean. The self-test binary (csrc/cuda/emulator_selftest.cpp) also checks its results against
plain loops and that the emulator refuses a __syncthreads that only some threads reach.
"""

import os
import subprocess

import pytest

from cuda_builds import broken_copy, selftest_binary

RUN_TIMEOUT = 600  # seconds; a deadlocked barrier must fail the test, not hang CI
ASAN_UBSAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
TSAN = ["-fsanitize=thread"]
STAGING_BARRIER = "    __syncthreads();  // tiles staged: every thread reads what others wrote\n"


def _run(binary, **env):
    environment = dict(os.environ, **env)
    return subprocess.run([str(binary)], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=environment)


def _sanitizer_available(flags):
    """Skips unless g++ can link a program with these sanitizers (the runtime may be missing)."""
    import shutil
    import tempfile

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("int main() { return 0; }\n")
        probe = subprocess.run([compiler, *flags, source, "-o", os.path.join(tmp, "probe")], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"g++ cannot link with {' '.join(flags)}: {probe.stderr.strip()[-300:]}")


def test_selftest_under_address_and_undefined_behaviour_sanitizers():
    _sanitizer_available(ASAN_UBSAN)
    binary = selftest_binary("selftest-asan", ASAN_UBSAN)
    result = _run(binary, ASAN_OPTIONS="detect_leaks=1:halt_on_error=1", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "selftest passed" in result.stdout, output[-6000:]
    for report in ("AddressSanitizer", "LeakSanitizer", "runtime error"):
        assert report not in output, output[-6000:]


def test_selftest_under_thread_sanitizer():
    _sanitizer_available(TSAN)
    binary = selftest_binary("selftest-tsan", TSAN)
    result = _run(binary, TSAN_OPTIONS="halt_on_error=1")
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "selftest passed" in result.stdout, output[-6000:]
    assert "ThreadSanitizer" not in output, output[-6000:]


def test_thread_sanitizer_reports_a_missing_syncthreads():
    _sanitizer_available(TSAN)
    broken = broken_copy("kernels/gemm.cuh", STAGING_BARRIER)
    binary = selftest_binary("selftest-tsan-no-barrier", TSAN, source_dir=broken)
    result = _run(binary, TSAN_OPTIONS="halt_on_error=1")
    output = result.stdout + result.stderr
    assert result.returncode != 0, "the build without the barrier ran clean:\n" + output[-3000:]
    assert "WARNING: ThreadSanitizer: data race" in output, output[-3000:]
    assert "gemm_tile" in output, "the race is not reported in the GEMM tile loop:\n" + output[-3000:]


def test_fiber_emulator_computes_wrong_numbers_without_the_barrier():
    """The tests' Python module runs CUDA threads as fibers in a shuffled order between
    barriers: without the barrier, threads read tiles others have not written yet."""
    broken = broken_copy("kernels/gemm.cuh", STAGING_BARRIER)
    binary = selftest_binary("selftest-fibers-no-barrier", [], source_dir=broken, os_threads=False)
    result = _run(binary)
    assert result.returncode != 0 and "FAIL conv3x3" in result.stdout, result.stdout[-3000:]
    intact = _run(selftest_binary("selftest-fibers", [], os_threads=False))
    assert intact.returncode == 0 and "selftest passed" in intact.stdout, (intact.stdout + intact.stderr)[-3000:]
