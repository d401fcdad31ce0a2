"""The compiled core under ThreadSanitizer: several Python threads on one model.

The extension is built again with ``-DFASTVGG_TSAN=ON`` (CMakeLists.txt) into a temporary
directory, and a child Python with libtsan preloaded (Python itself is not instrumented; the
runtime must be in the process first) runs tests/test_threads.py, a script that drives the
kernels from several Python threads at once, and the kernel tests. Any report fails the test
(halt_on_error: the first report aborts the child).

What is covered, and what is not: OpenMP. GCC's libgomp is not built with TSan, so TSan does
not see the synchronisation inside it (the fork and join of a parallel region, its barriers):
with more than one OpenMP thread it reports the writes of one region's workers against the
next region's reads as races, which they are not (tried: pack_conv3x3's workers against
pack_winograd_f4x4 on the main thread). A blanket suppression of libgomp would hide real
races between workers too, since every worker's stack ends in libgomp. So the child runs with
OMP_THREAD_LIMIT=1: every parallel region runs on the thread that enters it, no libgomp worker
exists, and every report is a real race between the Python threads, whose hand-offs
(pthread mutexes and condition variables of the GIL, threading.Barrier) TSan intercepts.
That checks what several Python threads on one model share: packed weights, per-thread
scratch, the kernel tables, the active ISA and the thread setting, and any state a model keeps
between calls. It does not check how one kernel splits its work between OpenMP threads; that
is covered by the results being bit-identical across thread counts
(tests/test_determinism.py), by AddressSanitizer with two OpenMP threads
(tests/test_sanitizers.py), and would need libgomp built with TSan (or LLVM's libomp with its
TSan support) to be checked here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import extension_builds as sb

# The multi-threaded predict tests; the ticker test is left out: it measures time, and TSan
# slows the computation by 5-15x.
THREAD_TESTS = ["tests/test_threads.py", "-k", "not other_python_threads_run"]
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_winograd.py"]
KERNEL_SELECTION = "awkward_shapes or edge_tiles or whole_network or layout"


def _tsan_runtime() -> str:
    return sb.gcc_runtime("libtsan.so", "ThreadSanitizer")


def _tsan_env(package_dir) -> dict:
    return sb.child_env(
        package_dir,
        LD_PRELOAD=_tsan_runtime(),
        TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1",
        # One OpenMP thread per region, whatever the code asks for (module docstring).
        OMP_THREAD_LIMIT="1",
        OMP_NUM_THREADS="1",
        FASTVGG_NUM_THREADS="1",
    )


def _assert_clean(result: subprocess.CompletedProcess, what: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ThreadSanitizer" not in output, (
        f"{what} under ThreadSanitizer: exit code {result.returncode}\n{output[-8000:]}"
    )


@pytest.fixture(scope="module")
def tsan_package(tmp_path_factory):
    """A copy of the fastvgg package whose _core is built with -fsanitize=thread."""
    _tsan_runtime()
    return sb.build_package(tmp_path_factory.mktemp("tsan"), "FASTVGG_TSAN")


def test_the_harness_reports_a_data_race(tmp_path):
    """The preloaded runtime really finds races: two threads incrementing one counter.

    The calls must overlap in time: each GIL hand-off orders everything before it, so a race
    between two calls that never run at the same time is not one TSan can see (nor a real
    one). The pauses keep both threads inside the function together, as predict's long
    GIL-free forward passes do."""
    _tsan_runtime()
    source = tmp_path / "racy.cpp"
    source.write_text(
        "#include <unistd.h>\n"
        'extern "C" void bump(long n) {\n'
        "  static long counter;\n"
        "  for (long i = 0; i < n; ++i) { counter = counter + 1; if (i % 100 == 0) usleep(100); }\n"
        "}\n"
    )
    library = tmp_path / "libracy.so"
    subprocess.run(["g++", "-shared", "-fPIC", "-O1", "-fsanitize=thread", str(source), "-o", str(library)], check=True)
    code = textwrap.dedent(
        f"""
        import ctypes, threading
        bump = ctypes.CDLL({str(library)!r}).bump  # ctypes releases the GIL during the call
        threads = [threading.Thread(target=bump, args=(10_000,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        """
    )
    result = sb.run([sys.executable, "-c", code], _tsan_env(tmp_path))
    assert "WARNING: ThreadSanitizer: data race" in result.stderr, result.stderr[-3000:]


def test_the_extension_is_instrumented(tsan_package):
    (extension,) = (tsan_package / "fastvgg").glob("_core*.so")
    assert b"__tsan_read" in extension.read_bytes(), "no ThreadSanitizer checks in the TSan build"


def _pytest_in_child(package, args) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import sys
        import fastvgg
        assert fastvgg._core.__file__.startswith({str(package)!r}), fastvgg._core.__file__
        import pytest
        sys.exit(pytest.main({args!r} + ["-q", "-p", "no:cacheprovider"]))
        """
    )
    return sb.run([sys.executable, "-c", code], _tsan_env(package))


def test_threads_tests_under_tsan(tsan_package):
    result = _pytest_in_child(tsan_package, THREAD_TESTS)
    _assert_clean(result, "tests/test_threads.py")
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-3000:]


CONCURRENT_KERNELS = """
import threading

import numpy as np

import fastvgg
from fastvgg import _core

assert fastvgg._core.__file__.startswith(PACKAGE), fastvgg._core.__file__
isas = _core.available_isas()
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 13, 11, 17)).astype(np.float32)
kernel = rng.standard_normal((3, 3, 17, 33)).astype(np.float32)
bias = rng.standard_normal(33).astype(np.float32)
calls = [
    lambda isa: _core.testing.conv3x3(x, kernel, bias, True, isa),
    lambda isa: _core.testing.conv3x3_winograd(x, kernel, bias, False, isa),
    lambda isa: _core.testing.max_pool2x2(x, isa),
    lambda isa: _core.testing.global_pool(x, "avg", isa),
    lambda isa: _core.testing.dense(x.reshape(2, -1)[:, :64], kernel.reshape(-1, 33)[:64], bias, True, isa),
]
expected = {(i, isa): call(isa) for i, call in enumerate(calls) for isa in isas}

# One model, several threads: predict, extract and get_weights at once, with the thread
# setting changed under them.
model = fastvgg.VGG16(None, input_shape=(32, 32, 3), classes=5, seed=2)
images = rng.uniform(-120, 140, (3, 32, 32, 3)).astype(np.float32)
predicted = model.predict(images)
features = model.extract(images, ["block2_conv2"])["block2_conv2"]
weights = [w.copy() for w in model.get_layer("block3_conv1").get_weights()]

barrier = threading.Barrier(4)
failures = []

def work(worker):
    barrier.wait()
    for repeat in range(2):
        for i, call in enumerate(calls):
            isa = isas[(worker + repeat) % len(isas)]
            if not np.array_equal(call(isa), expected[(i, isa)]):
                failures.append(("kernel", i, isa))
        if not np.array_equal(model.predict(images[worker % 3 :]), predicted[worker % 3 :]):
            failures.append(("predict", worker))
        if not np.array_equal(model.extract(images, ["block2_conv2"])["block2_conv2"], features):
            failures.append(("extract", worker))
        got = model.get_layer("block3_conv1").get_weights()
        if not all(np.array_equal(a, b) for a, b in zip(got, weights)):
            failures.append(("get_weights", worker))
        _core.set_num_threads(1 + worker % 2)

threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not failures, failures
print("concurrent run finished")
"""


def test_kernels_and_one_model_from_four_threads_under_tsan(tsan_package, tmp_path):
    script = tmp_path / "concurrent.py"
    script.write_text(f"PACKAGE = {str(tsan_package)!r}\n" + CONCURRENT_KERNELS)
    result = sb.run([sys.executable, str(script)], _tsan_env(tsan_package), cwd=tmp_path)
    _assert_clean(result, "four threads on the kernels and one model")
    assert "concurrent run finished" in result.stdout


def test_kernel_tests_under_tsan(tsan_package):
    result = _pytest_in_child(tsan_package, KERNEL_TESTS + ["-k", KERNEL_SELECTION])
    _assert_clean(result, "tests/test_kernels.py and tests/test_winograd.py")
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-3000:]
