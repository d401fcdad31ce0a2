"""The compiled core under AddressSanitizer and UndefinedBehaviorSanitizer.

The extension is built a second time with ``-DFASTVGG_SANITIZE=ON`` (CMakeLists.txt) into a
temporary directory, next to a copy of the Python package, and the kernel tests plus a small
end-to-end run go through it in a child process. Python itself is not instrumented, so the
ASan runtime has to be preloaded (it must come first in the process), together with
libstdc++: ASan's __cxa_throw interceptor looks the real one up when it starts, and a C++
exception thrown before that lookup can succeed aborts the process. Leak detection is off
because CPython keeps its interned objects until exit by design.

Any report fails the test: UBSan is built with -fno-sanitize-recover, so the first undefined
behaviour aborts with "runtime error:" in the output, and ASan aborts on its first error.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import extension_builds as sb
from extension_builds import REPO

# The kernels on every ISA (all of test_kernels.py), the quick Winograd tests, and the NaN
# handling of the pooling kernels; the large-layer accuracy tests spend their time in numpy.
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_winograd.py", "tests/test_bad_input.py",
                "tests/test_bf16_kernels.py", "tests/test_winograd_batch.py", "tests/test_winograd_int14.py",
                "tests/test_ops_kernels.py"]
KERNEL_SELECTION = (
    "test_kernels or edge_tiles or awkward_shapes or float64_model or (thread_counts and 64-64) "
    "or keeps_nan or nan_survives or rounding or dense_bf16_shapes or bad_shapes or int14_shapes or int14_nan "
    "or test_ops_kernels"
)


def _preload() -> str:
    asan = sb.gcc_runtime("libasan.so", "AddressSanitizer")
    stdcxx = sb.gcc_file("libstdc++.so")
    if stdcxx is None or not sb.is_elf(stdcxx):  # a linker script on some systems
        stdcxx = "libstdc++.so.6"
    return f"{asan} {stdcxx}"


def _sanitizer_env(package_dir) -> dict:
    return sb.child_env(
        package_dir,
        LD_PRELOAD=_preload(),
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        FASTVGG_NUM_THREADS="2",
    )


def _assert_clean(result: subprocess.CompletedProcess, what: str) -> None:
    output = result.stdout + result.stderr
    problems = [marker for marker in ("runtime error", "AddressSanitizer", "LeakSanitizer") if marker in output]
    assert result.returncode == 0 and not problems, (
        f"{what} under the sanitizers: exit code {result.returncode}, reports {problems}\n{output[-6000:]}"
    )


@pytest.fixture(scope="module")
def sanitized_package(tmp_path_factory):
    """A copy of the fastvgg package whose _core is built with ASan and UBSan."""
    _preload()  # skips here, before the build, when there is no runtime to load
    return sb.build_package(tmp_path_factory.mktemp("sanitized"), "FASTVGG_SANITIZE")


def test_the_harness_reports_a_heap_use_after_free():
    """The preloaded runtime really checks memory: a use after free in the child is reported."""
    code = textwrap.dedent(
        """
        import ctypes
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        pointer = libc.malloc(64)
        libc.free(pointer)
        ctypes.string_at(pointer, 64)  # memcpy from freed memory
        """
    )
    result = sb.run([sys.executable, "-c", code], _sanitizer_env(REPO))
    assert result.returncode != 0
    assert "AddressSanitizer: heap-use-after-free" in result.stderr, result.stderr[-3000:]


def test_the_extension_is_instrumented(sanitized_package):
    (extension,) = (sanitized_package / "fastvgg").glob("_core*.so")
    binary = extension.read_bytes()
    assert b"__asan_report_load" in binary, "no AddressSanitizer checks in the sanitized build"
    assert b"__ubsan_handle_" in binary, "no UndefinedBehaviorSanitizer checks in the sanitized build"


def test_kernel_tests_under_sanitizers(sanitized_package):
    env = _sanitizer_env(sanitized_package)
    code = textwrap.dedent(
        f"""
        import sys
        import fastvgg
        # The sanitized copy, not an installed or in-tree build, must be the one under test.
        assert fastvgg._core.__file__.startswith({str(sanitized_package)!r}), fastvgg._core.__file__
        import pytest
        sys.exit(pytest.main({KERNEL_TESTS!r} + ["-q", "-p", "no:cacheprovider", "-k", {KERNEL_SELECTION!r}]))
        """
    )
    result = sb.run([sys.executable, "-c", code], env)
    _assert_clean(result, "tests/test_kernels.py and friends")
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-3000:]


END_TO_END = """
import threading

import numpy as np

import fastvgg
from fastvgg import _core

assert fastvgg._core.__file__.startswith(PACKAGE), fastvgg._core.__file__
rng = np.random.default_rng(0)

for precision in ("fast", "highest"):
    # The top: convolutions, pools, flatten, dense layers and softmax; a batch split in chunks.
    model = fastvgg.VGG16(None, input_shape=(32, 32, 3), classes=10, seed=0, precision=precision)
    x = rng.uniform(-120, 140, (3, 32, 32, 3)).astype(np.float32)
    probabilities = model.predict(x, batch_size=2)
    assert probabilities.shape == (3, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    kernel, bias = model.get_layer("predictions").get_weights()
    model.get_layer("predictions").set_weights([kernel * 2, bias + 1])

    # Odd sizes, global pooling, uint8 and misaligned input, NaN pixels.
    features = fastvgg.VGG16(None, include_top=False, pooling="max", seed=1, precision=precision)
    images = rng.integers(0, 256, (2, 45, 61, 3), dtype=np.uint8)
    expected = features.predict(images)
    raw = np.zeros(images.size * 4 + 1, np.uint8)
    misaligned = np.frombuffer(raw.data, np.float32, count=images.size, offset=1).reshape(images.shape)
    raw[1:] = np.frombuffer(images.astype(np.float32).tobytes(), np.uint8)
    assert np.array_equal(features.predict(misaligned), expected)
    poisoned = images.astype(np.float32)
    poisoned[0, 7, 9, 1] = np.nan
    assert np.isnan(features.predict(poisoned)[0]).all()

    # Several Python threads on one model, each with its own scratch.
    outputs = {}
    def work(i):
        outputs[i] = features.predict(images[i % 2 : i % 2 + 1])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, out in outputs.items():
        assert np.array_equal(out, expected[i % 2 : i % 2 + 1])

# Errors raised in C++ cross into Python as exceptions.
for call in (lambda: _core.set_isa("sse9"), lambda: _core.Graph(0), lambda: model.predict(np.zeros((1, 31, 31, 3)))):
    try:
        call()
    except (ValueError, TypeError):
        pass
    else:
        raise AssertionError("no exception")
print("end-to-end run finished")
"""


def test_end_to_end_predict_under_sanitizers(sanitized_package, tmp_path):
    script = tmp_path / "end_to_end.py"
    script.write_text(f"PACKAGE = {str(sanitized_package)!r}\n" + END_TO_END)
    result = sb.run([sys.executable, str(script)], _sanitizer_env(sanitized_package), cwd=tmp_path)
    _assert_clean(result, "an end-to-end run")
    assert "end-to-end run finished" in result.stdout
