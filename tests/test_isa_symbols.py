"""No compiled copy of a shared helper carries another instruction set's instructions.

The kernel sources are compiled once per ISA, each object with its own -m flags. An inline
function that an object does not inline becomes a weak symbol there, and the linker keeps one
copy per name for the whole module, whichever object it came from. If an AVX-512 object's
copy of a header helper (zero_border, AlignedBuffer::resize, ...) won, the generic and AVX2
paths would run AVX-512 code and die with SIGILL on a CPU without it. csrc/per_isa.h puts the
ISA into those helpers' symbol names, and simd.h's functions live in fastvgg::<isa>.

Here the per-ISA objects are compiled again, with the exact commands CMake generates, at -O0
(nothing is inlined, so every helper a kernel calls is emitted as a weak symbol: the widest
view of what could be shared) and at -O2 (where GCC already emits zero_border out of line in
the AVX-512 layout object). Every weak function of an AVX2 or AVX-512 object must either have
its ISA in its name, so nothing else can bind to it, or use only baseline x86-64 instructions
(standard-library templates such as std::min at -O0). The shipped -O3 build inlines more, so it
emits a subset of these symbols.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from extension_builds import require_pybind11

REPO = Path(__file__).resolve().parents[1]
AVX_ISAS = ("avx2", "avx512", "avx512bf16", "amxbf16")
OPT_LEVELS = ("-O0", "-O2")
TIMEOUT = 600

# VEX/EVEX-encoded instructions all start with "v" (vmovups, vfmadd231ps, vzeroupper, ...):
# with -mavx on, GCC encodes even SSE operations that way. The rest are the scalar extensions
# the -m flags of CMakeLists.txt could let the compiler pick.
_NON_BASELINE_SCALAR = {
    "popcnt", "lzcnt", "tzcnt", "andn", "bextr", "blsi", "blsmsk", "blsr", "bzhi",
    "mulx", "pdep", "pext", "rorx", "sarx", "shlx", "shrx", "movbe", "adcx", "adox",
}  # fmt: skip


def non_baseline(instruction: str) -> bool:
    """Whether an objdump instruction (mnemonic and operands) needs more than x86-64 baseline."""
    mnemonic = instruction.split()[0] if instruction.split() else ""
    return (
        mnemonic.startswith("v")
        or mnemonic in _NON_BASELINE_SCALAR
        or mnemonic.startswith(("tile", "tdp", "ldtilecfg", "sttilecfg"))  # AMX
        or re.search(r"%[yz]mm\d|%k[0-7]\b", instruction) is not None
    )


def test_the_instruction_filter_tells_baseline_from_avx():
    assert non_baseline("vmovups %zmm0,(%rdi)")
    assert non_baseline("vzeroupper")
    assert non_baseline("vfmadd231ps %ymm1,%ymm2,%ymm3")
    assert non_baseline("kmovw %k1,%eax")
    assert non_baseline("shlx %rax,%rbx,%rcx")
    assert non_baseline("tileloadd (%rbx,%r14,1),%tmm6")
    assert non_baseline("tdpbf16ps %tmm6,%tmm4,%tmm0")
    assert not non_baseline("movups %xmm0,(%rdi)")
    assert not non_baseline("mov %rdi,-0x8(%rbp)")
    assert not non_baseline("pxor %xmm0,%xmm0")


def _tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (binutils), so the objects cannot be inspected")
    return path


@pytest.fixture(scope="module")
def isa_objects(tmp_path_factory):
    """{(isa, opt level): [object paths]} for the AVX objects, compiled as CMake compiles them."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the per-ISA AVX objects are only built on x86-64 Linux")
    cmake = _tool("cmake")
    _tool("nm")
    _tool("objdump")
    pybind11 = require_pybind11()
    root = tmp_path_factory.mktemp("isa_objects")
    build = root / "build"
    configure = [
        cmake, "-S", str(REPO), "-B", str(build),
        "-DCMAKE_BUILD_TYPE=None",
        "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
        "-DSKBUILD_PROJECT_VERSION=0.0.0",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DPython_EXECUTABLE={sys.executable}",
    ]  # fmt: skip
    result = subprocess.run(configure, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    entries = json.loads((build / "compile_commands.json").read_text())

    jobs = []
    objects: dict = {}
    for entry in entries:
        args = shlex.split(entry["command"]) if "command" in entry else list(entry["arguments"])
        output = args[args.index("-o") + 1]
        isa = next((isa for isa in AVX_ISAS if f"kernels_{isa}.dir" in output), None)
        if isa is None:
            continue
        # Drop the dependency-file options; everything else (defines, -m flags, OpenMP) stays.
        kept, skip = [], False
        for arg in args:
            if skip:
                skip = False
            elif arg in ("-MT", "-MF", "-MQ"):
                skip = True
            elif arg not in ("-MD", "-MMD"):
                kept.append(arg)
        for level in OPT_LEVELS:
            target = root / level.lstrip("-") / isa / (Path(entry["file"]).stem + ".o")
            target.parent.mkdir(parents=True, exist_ok=True)
            command = list(kept)
            command[command.index("-o") + 1] = str(target)
            jobs.append(command + [level])  # the last -O wins over CMake's
            objects.setdefault((isa, level), []).append(target)
    assert objects, f"no kernels_<isa> objects in {build / 'compile_commands.json'}"

    def compile_one(command):
        return subprocess.run(command, cwd=entries[0]["directory"], capture_output=True, text=True, timeout=TIMEOUT)

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        for command, done in zip(jobs, pool.map(compile_one, jobs)):
            assert done.returncode == 0, f"{shlex.join(command)}\n{done.stderr[-4000:]}"
    return objects


_POSIX_LINE = re.compile(r"^(.*) (\S) [0-9a-fA-F]+ [0-9a-fA-F]+$")


def weak_functions(obj: Path) -> dict:
    """{mangled name: demangled name} of the weak (W) symbols an object defines."""
    mangled = subprocess.run(["nm", "--defined-only", "--no-sort", "-P", str(obj)], capture_output=True, text=True, check=True)
    demangled = subprocess.run(["nm", "--defined-only", "--no-sort", "-P", "-C", str(obj)], capture_output=True, text=True, check=True)
    names = {}
    for raw, pretty in zip(mangled.stdout.splitlines(), demangled.stdout.splitlines()):
        # -P prints "name type value size" (a weak function has both); a demangled name may
        # contain spaces, so the name is everything before the last three fields.
        raw_match, pretty_match = _POSIX_LINE.match(raw), _POSIX_LINE.match(pretty)
        if raw_match and pretty_match and raw_match.group(2) == "W":
            names[raw_match.group(1)] = pretty_match.group(1)
    return names


def disassembly(obj: Path) -> dict:
    """{mangled function name: [instructions]} from objdump."""
    text = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(obj)], capture_output=True, text=True, check=True
    ).stdout
    functions: dict = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            current = functions.setdefault(header.group(1), [])
        elif current is not None and "\t" in line:
            current.append(line.split("\t", 1)[1].strip())
    return functions


def isa_named(demangled: str, isa: str) -> bool:
    return f"fastvgg::{isa}::" in demangled or f"[abi:{isa}]" in demangled


@pytest.mark.parametrize("level", OPT_LEVELS)
@pytest.mark.parametrize("isa", AVX_ISAS)
def test_no_shared_weak_function_carries_avx(isa_objects, isa, level):
    if (isa, level) not in isa_objects:
        pytest.skip(f"this compiler builds no kernels_{isa} object (it lacks the -m flags)")
    problems = []
    for obj in isa_objects[(isa, level)]:
        code = disassembly(obj)
        for mangled, demangled in weak_functions(obj).items():
            if isa_named(demangled, isa):
                continue
            wide = [ins for ins in code.get(mangled, []) if non_baseline(ins)]
            if wide:
                problems.append(f"{obj.name}: {demangled} (shared by name) contains {wide[0]!r}")
    assert not problems, (
        f"weak functions of the {isa} objects at {level} that the linker may hand to other "
        "ISAs; mark the helper FASTVGG_PER_ISA (csrc/per_isa.h) or move it into "
        f"fastvgg::{isa}:\n" + "\n".join(problems)
    )


def test_the_objects_do_emit_per_isa_copies_of_the_helpers(isa_objects):
    """The check above is not vacuous: at -O0 the AVX-512 objects hold their own, tagged
    copies of tensor.h's helpers, which without the tag would be shared by name."""
    names = set()
    for obj in isa_objects[("avx512", "-O0")]:
        names.update(weak_functions(obj).values())
    tagged = {name for name in names if "[abi:avx512]" in name}
    assert any("zero_border" in name for name in tagged), sorted(names)
    assert any("BlockedImage::at" in name for name in tagged), sorted(names)
