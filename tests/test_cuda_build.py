"""The real CUDA module, built by CMake and nvcc for sm_80 and sm_90 with warnings as errors
(ptxas's spill warnings included), once per test session (about a minute on 2 cores). Skipped,
with the reason, where nvcc is not installed.

From ptxas -v: every kernel is compiled for both architectures with no spills and no stack,
and its registers and static shared memory fit the block size it is launched with. From
cuobjdump (PyPI's nvidia-cuda-cuobjdump): sm_80 and sm_90 code and compute_90 PTX are
embedded. From the ELF header: no dynamic link to the driver (libcuda) or to a shared
cudart. Imported without a driver, the module reports why it cannot run instead of crashing.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from cuda_builds import REPO, nvcc, nvcc_build

# Every kernel, by a fragment of its mangled name, and the threads per block it is launched
# with (csrc/cuda/kernels/*.cuh: __launch_bounds__ and the *_geometry functions).
KERNEL_BLOCK_THREADS = {
    "conv3x3_kernel": 256,
    "dense_gemm_kernel": 256,
    "dense_gemv_partial_kernel": 256,
    "dense_gemv_finish_kernel": 256,
    "max_pool2x2_kernel": 256,
    "global_pool_kernel": 256,
    "softmax_kernel": 256,
    "transpose_kernel": 256,
    "window_pool_kernel": 256,
    "affine_kernel": 256,
    "activation_kernel": 256,
}
ARCHITECTURES = ("sm_80", "sm_90")
REGISTERS_PER_SM = 65536  # sm_80 and sm_90
MAX_REGISTERS_PER_THREAD = 255
STATIC_SHARED_LIMIT = 48 * 1024  # bytes of static __shared__ per block


def _module_path():
    build, _ = nvcc_build()
    (path,) = glob.glob(str(build / ("_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))))
    return path


def _ptxas_reports():
    """{(kernel, arch): {"registers", "smem", "spill_stores", "spill_loads", "stack"}}."""
    _, log = nvcc_build()
    reports, current = {}, None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if entry:
            name = next((k for k in KERNEL_BLOCK_THREADS if k in entry.group(1)), entry.group(1))
            current = reports.setdefault((name, entry.group(2)), {})
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            current.update(stack=int(frame.group(1)), spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))
        used = re.search(r"Used (\d+) registers", line)
        if used:
            smem = re.search(r"(\d+) bytes smem", line)
            current.update(registers=int(used.group(1)), smem=int(smem.group(1)) if smem else 0)
    return reports


def test_every_kernel_is_compiled_for_both_architectures():
    reports = _ptxas_reports()
    for kernel in KERNEL_BLOCK_THREADS:
        for arch in ARCHITECTURES:
            assert (kernel, arch) in reports, f"ptxas did not report {kernel} for {arch}; reports: {sorted(reports)}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kernel", sorted(KERNEL_BLOCK_THREADS))
def test_no_spills_and_resources_fit(kernel, arch):
    report = _ptxas_reports()[(kernel, arch)]
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, f"{kernel} spills on {arch}: {report}"
    assert report["stack"] == 0, f"{kernel} uses a stack frame on {arch} (local memory): {report}"
    threads = KERNEL_BLOCK_THREADS[kernel]
    assert report["registers"] <= MAX_REGISTERS_PER_THREAD
    assert report["registers"] * threads <= REGISTERS_PER_SM, f"{kernel}: a block of {threads} does not fit: {report}"
    assert report["smem"] <= STATIC_SHARED_LIMIT, f"{kernel} needs {report['smem']} bytes of shared memory"


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        nvidia = None
    for root in getattr(nvidia, "__path__", []):
        for candidate in glob.glob(os.path.join(root, "*", "bin", "cuobjdump")):
            return candidate
    pytest.skip("cuobjdump is not installed (pip install nvidia-cuda-cuobjdump)")


def test_sm80_sm90_code_and_compute90_ptx_are_embedded():
    module = _module_path()
    tool = _cuobjdump()
    elf = subprocess.run([tool, "--list-elf", module], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", module], capture_output=True, text=True, check=True).stdout
    cubins = sorted(set(re.findall(r"\.(sm_\d+)\.cubin", elf)))
    ptxs = sorted(set(re.findall(r"\.(sm_\d+)\.ptx", ptx)))
    assert cubins == ["sm_80", "sm_90"], elf
    assert ptxs == ["sm_90"], ptx  # compute_90 PTX only: 80-real carries no PTX


def test_links_neither_the_driver_nor_a_shared_cudart():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run([readelf, "-d", _module_path()], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert needed, dynamic
    assert not [lib for lib in needed if lib.startswith(("libcuda.", "libcudart."))], needed


def test_the_cpu_module_links_no_cuda():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    from fastvgg import _core

    dynamic = subprocess.run([readelf, "-d", _core.__file__], capture_output=True, text=True, check=True).stdout
    assert "cuda" not in dynamic.lower(), dynamic


IMPORT_CHECK = """
import sys
sys.path.insert(0, {directory!r})
import _cuda
usable, reason = _cuda.status()
print("STATUS", usable, reason)
if not usable:
    try:
        _cuda.CudaExecutor([{{"kind": "conv3x3", "out_channels": 4}}], 3)
    except RuntimeError as error:
        print("REFUSED", error)
"""


def test_importing_without_a_usable_gpu_reports_why():
    directory = os.path.dirname(_module_path())
    result = subprocess.run([sys.executable, "-c", IMPORT_CHECK.format(directory=directory)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, f"importing fastvgg._cuda crashed ({result.returncode}):\n{result.stderr[-3000:]}"
    status = re.search(r"STATUS (True|False) (.*)", result.stdout)
    assert status, result.stdout
    if status.group(1) == "False":
        assert status.group(2).strip(), "no reason given"
        assert f"REFUSED the CUDA executor cannot start: {status.group(2)}" in result.stdout, result.stdout


def test_asking_for_cuda_without_nvcc_stops_the_build(tmp_path):
    nvcc()  # the CUDA build tests run only where the toolkit is meant to be
    cmake = shutil.which("cmake")
    import pybind11

    result = subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(tmp_path), "-DFASTVGG_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={tmp_path}/no/nvcc",
         "-DSKBUILD_PROJECT_VERSION=0.0.0", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode != 0
    assert "FASTVGG_CUDA=ON, but no CUDA compiler was found" in " ".join((result.stdout + result.stderr).split())
