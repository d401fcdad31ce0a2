"""python/fastvgg/_core.pyi describes the compiled module as it is.

Two checks, because neither sees everything:

* mypy's stubtest (``python -m mypy.stubtest fastvgg._core``) finds names in the module but
  not in the stub and the reverse, and properties versus methods. It cannot read a pybind11
  function's parameters (they have no ``__text_signature__``), and it has to be told to skip
  two things a stub cannot express (tests/stubtest_allowlist.txt).
* the signature check below reads the signature pybind11 writes as the first line of every
  docstring (``name(arg: type = default, ...) -> type``) and compares the parameters' names,
  order, defaults and the kinds of their types (int, str, array, sequence, ...) with the stub,
  for every function, method and property, ``_core.testing`` included. (A parameter bound
  without ``py::arg`` is "arg0", "arg1", ... at run time and can only be passed by position;
  any stub name passes for it, but csrc/bindings.cpp had better name it.)

After changing csrc/bindings.cpp: reinstall, run this file, and edit the stub until it passes
(``python -m mypy.stubtest fastvgg._core --allowlist tests/stubtest_allowlist.txt`` prints
what stubtest sees; ``stubgen -m fastvgg._core`` writes a draft to start from).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastvgg
from fastvgg import _core

REPO = Path(__file__).resolve().parents[1]
ALLOWLIST = REPO / "tests" / "stubtest_allowlist.txt"


def installed_stub() -> Path:
    return Path(fastvgg.__file__).with_name("_core.pyi")


def test_stubtest_finds_no_difference(tmp_path):
    try:
        import mypy.stubtest  # noqa: F401
    except ImportError:
        pytest.fail("mypy is not installed; it is part of the test extra: pip install '.[test]'")
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / "mypy_cache"))
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "fastvgg._core", "--allowlist", str(ALLOWLIST)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, f"stubtest on {installed_stub()}:\n{result.stdout}{result.stderr}"


def test_the_installed_stub_is_the_source_tree_stub():
    """The signature check reads the stub next to the installed module; it must be this one."""
    assert installed_stub().read_text() == (REPO / "python" / "fastvgg" / "_core.pyi").read_text(), (
        "the installed _core.pyi differs from python/fastvgg/_core.pyi: reinstall the package"
    )


# ---- The kinds of types: what the stub says and what pybind11 prints must agree on these.

_KIND = {
    "int": "int", "SupportsInt": "int", "SupportsFloat": "float", "str": "str", "bool": "bool", "float": "float", "None": "None",
    "ndarray": "array", "NDArray": "array", "ArrayLike": "array",
    "Sequence": "sequence", "List": "list", "list": "list", "Tuple": "tuple", "tuple": "tuple",
    "Dict": "dict", "dict": "dict", "Buffer": "buffer", "bytes": "bytes", "object": "any",
}  # fmt: skip


def _split_top_level(text: str, separator: str = ",") -> list:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[(" and 1 or 0
        depth -= char in "])" and 1 or 0
        if char == separator and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def type_kind(annotation: str) -> str:
    """'typing.SupportsInt | typing.SupportsIndex' -> 'int', 'numpy.typing.NDArray[...]' -> 'array';
    a class of the module ('fastvgg._core.Graph', or 'Graph' in the stub) -> its name."""
    first = _split_top_level(annotation.strip("'\""), "|")[0]
    head = first.split("[", 1)[0].rsplit(".", 1)[-1]
    if first.startswith("fastvgg._core.") or isinstance(getattr(_core, head, None), type):
        return head
    if head in ("Annotated", "Optional"):  # Optional[X] is the module's 'X | None': X's kind first
        return type_kind(_split_top_level(first[first.index("[") + 1 : -1])[0])
    assert head in _KIND, f"no kind for the type {annotation!r}; add it to _KIND"
    return _KIND[head]


def runtime_signature(function, name: str):
    """[(parameter, kind, has default)], return kind, from pybind11's docstring line."""
    doc = (function.__doc__ or "").strip()
    line = doc.splitlines()[0] if doc else ""
    match = re.match(rf"^{re.escape(name)}\((.*)\) -> (.+)$", line)
    assert match, f"{name}: no pybind11 signature in the docstring {line!r}"
    parameters = []
    for index, part in enumerate(_split_top_level(match.group(1))):
        declared, _, default = part.partition(" = ")
        pname, _, annotation = declared.partition(": ")
        if index == 0 and (pname == "self" or (pname == "arg0" and annotation.startswith("fastvgg._core."))):
            parameters.append(("self", "self", False))  # the instance a method or property is bound to
        elif pname.startswith("*"):
            parameters.append((pname, "any", False))
        else:
            parameters.append((pname, type_kind(annotation), bool(default)))
    return parameters, type_kind(match.group(2))


def stub_signature(node: ast.FunctionDef):
    args = node.args
    defaults = [False] * (len(args.args) - len(args.defaults)) + [True] * len(args.defaults)
    parameters = []
    for arg, has_default in zip(args.args, defaults):
        kind = type_kind(ast.unparse(arg.annotation)) if arg.annotation is not None else "self"
        parameters.append((arg.arg, kind, has_default))
    if args.vararg is not None:
        parameters.append(("*" + args.vararg.arg, "any", False))
    if args.kwarg is not None:
        parameters.append(("**" + args.kwarg.arg, "any", False))
    return parameters, type_kind(ast.unparse(node.returns))


def stub_entries():
    """(qualified name, runtime object, ast node, is property) for every def in the stub."""
    tree = ast.parse(installed_stub().read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield node.name, getattr(_core, node.name, None), node, False
        elif isinstance(node, ast.ClassDef):
            owner = getattr(_core, node.name, None)
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    is_property = any(ast.unparse(d) == "property" for d in item.decorator_list)
                    yield f"{node.name}.{item.name}", getattr(owner, item.name, None), item, is_property


def test_every_stub_signature_matches_the_module():
    problems = []
    for name, runtime, node, is_property in stub_entries():
        if runtime is None:
            problems.append(f"{name}: in the stub, not in the module")
            continue
        short = name.rsplit(".", 1)[-1]
        if is_property:
            if not isinstance(runtime, property):
                problems.append(f"{name}: a property in the stub, not in the module")
                continue
            expected = runtime_signature(runtime.fget, "")
        else:
            expected = runtime_signature(runtime, short)
        actual = stub_signature(node)
        # pybind11 names a parameter without py::arg "arg0", "arg1", ...: it can only be passed
        # by position, so any name in the stub fits it.
        unnamed = [i for i, (pname, _, _) in enumerate(expected[0]) if re.fullmatch(r"arg\d+", pname)]
        if len(actual[0]) == len(expected[0]):
            for i in unnamed:
                actual[0][i] = (expected[0][i][0],) + actual[0][i][1:]
        if actual != expected:
            problems.append(f"{name}: stub {actual} but module {expected}")
    assert not problems, "python/fastvgg/_core.pyi does not match fastvgg._core:\n" + "\n".join(problems)


def test_the_stub_covers_every_function_of_the_testing_submodule():
    """stubtest skips _core.testing (see the allowlist), so its names are compared here."""
    tree = ast.parse(installed_stub().read_text())
    (testing,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "testing"]
    stubbed = {n.name for n in testing.body if isinstance(n, ast.FunctionDef)}
    runtime = {name for name in dir(_core.testing) if not name.startswith("_")}
    assert stubbed == runtime, f"only in the module: {runtime - stubbed}; only in the stub: {stubbed - runtime}"


def test_the_signature_check_can_fail():
    """A stub that renames, drops or retypes a parameter is caught."""
    (node,) = ast.parse("def set_isa(name: str) -> None: ...").body
    assert stub_signature(node) != runtime_signature(_core.set_isa, "set_isa")
    (node,) = ast.parse("def set_num_threads(n: str) -> None: ...").body
    assert stub_signature(node) != runtime_signature(_core.set_num_threads, "set_num_threads")
    (node,) = ast.parse("def set_num_threads(n: int) -> None: ...").body
    assert stub_signature(node) == runtime_signature(_core.set_num_threads, "set_num_threads")
