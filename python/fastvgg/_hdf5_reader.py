"""Reading HDF5 files from strangers without letting libhdf5 loose on them in this process.

libhdf5 trusts the metadata it parses: a few changed bytes can make it crash (a segfault
while converting a variable-length string attribute), loop forever (its global-heap code)
or allocate gigabytes. None of that can be caught in-process, so by default the parsing
runs in a short-lived child process (this very file, run as a script, importing only numpy
and h5py) under a wall-clock limit, an address-space limit, no core dumps and no file
writes. The child reports the file's structure as JSON; the parent reads the weight bytes
of contiguous datasets itself, straight from the validated offsets, and asks a child for
the rest (chunked, compressed, compact or unallocated datasets), which sends them back as
raw bytes of exactly the declared size.

API (all sizes are checked before anything is allocated; every failure is a ``ValueError``,
or an ``OSError`` for I/O, whose message names the file)::

    source = HDF5Source(path)                      # a whole file
    source = HDF5Source(path, start, size)         # an HDF5 image inside another file (a
                                                   # stored zip member), read in place
    root = read_structure(source)                  # Group; isolated=False parses in-process
                                                   # (only for files already trusted)
    root.children            # {name: Group | Dataset | Link}, in h5py's (name) order
    root.attrs               # {name: value}; see below
    root.find("layers/conv2d/vars/0")              # a node by path, or None; never
                                                   # follows a Link
    dataset.shape, dataset.dtype, dataset.path     # dtype: numpy dtype, or None (see
    dataset.type_problem                           # type_problem, which says why)
    dataset.layout                                 # "contiguous", "chunked", "compact",
                                                   # "virtual"; dataset.external: bool
    read_arrays(source, [dataset, ...], max_bytes=None)  # -> [numpy array, ...], bytes
                                                   # exact; allocates the declared sizes
    read_rows(source, dataset, first, stop)        # rows [first, stop) of a contiguous
                                                   # dataset, read in this process
    Link: .kind ("SoftLink", "ExternalLink", "UserDefinedLink"), .target, .path

Attribute values are ``str`` (any string that is valid UTF-8), ``bytes`` (one that is not),
numpy arrays of dtype object holding those (string arrays), numpy numeric arrays (scalars as
0-d arrays), or :class:`Unsupported` (compound, reference, ... types: only described).

Only IEEE 754 floats get a numpy ``dtype`` of kind "f": binary16, binary32 and binary64, in
either byte order, with the standard exponent bias, field positions and sizes, implied
normalisation and no padding. Any other float (HDF5 lets a file describe, say, a 32-bit
float with exponent bias 95, which it then converts silently) has ``dtype`` None and a
``type_problem`` that says what differs. Integers get their numpy dtype; other classes None.

Limits (the defaults bound a file's metadata far above any Keras file and far below what
would hurt): objects, depth, attributes and their sizes, names, the child's time and memory.
Object names must be valid UTF-8; an object reached by two hard links (a loop) is refused.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

# Limits -------------------------------------------------------------------------------------
MAX_OBJECTS = 100_000
MAX_DEPTH = 64
MAX_ATTRIBUTES_PER_OBJECT = 4096
MAX_ATTRIBUTE_BYTES = 16 << 20  # one attribute (Keras's model_config is tens of KB)
MAX_TOTAL_ATTRIBUTE_BYTES = 64 << 20
MAX_NAME_BYTES = 4096
MAX_RANK = 32
# The child gets this much address space above what Python, numpy and h5py already use.
METADATA_MEMORY_BYTES = 768 << 20
# Wall-clock limits. Describing a Keras file takes tens of milliseconds; a loaded machine
# may take a few seconds to start Python and import h5py.
METADATA_SECONDS = 30.0
DATA_SECONDS_BASE = 30.0
DATA_BYTES_PER_SECOND = 50 << 20

_IEEE_FLOATS = {
    # size: (sign position, exponent position, exponent size, mantissa position, mantissa size, bias)
    2: (15, 10, 5, 0, 10, 15),
    4: (31, 23, 8, 0, 23, 127),
    8: (63, 52, 11, 0, 52, 1023),
}
_ERROR_PREFIX = b"FASTVGG-HDF5-ERROR: "


class HDF5ReadError(ValueError):
    """A file whose structure cannot be read safely; the message names the file."""


@dataclass(frozen=True)
class HDF5Source:
    """Where an HDF5 image lives: a file, or ``size`` bytes from ``start`` inside one."""

    path: str
    start: int = 0
    size: Optional[int] = None

    def describe(self) -> str:
        if self.start == 0 and self.size is None:
            return repr(self.path)
        return f"{self.path!r} (the HDF5 member at byte {self.start})"


@dataclass
class Unsupported:
    """An attribute of a type that is described, not decoded (compound, reference, ...)."""

    description: str


@dataclass
class Node:
    path: str
    attrs: Dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path


@dataclass
class Link:
    path: str
    kind: str  # "SoftLink", "ExternalLink", "UserDefinedLink"
    target: str = ""


@dataclass
class Dataset(Node):
    shape: Tuple[int, ...] = ()
    dtype: Optional[np.dtype] = None
    type_problem: Optional[str] = None
    layout: str = "contiguous"
    external: bool = False
    offset: Optional[int] = None  # of contiguous data, from the start of the HDF5 image
    storage_size: int = 0
    filters: int = 0

    @property
    def nbytes(self) -> int:
        if self.dtype is None:
            return 0
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize

    @property
    def is_virtual(self) -> bool:
        return self.layout == "virtual"

    @property
    def readable_in_place(self) -> bool:
        """Stored as one run of bytes in the file, which this process may read itself."""
        return (self.layout == "contiguous" and not self.external and self.offset is not None
                and self.dtype is not None and self.storage_size == self.nbytes)


@dataclass
class Group(Node):
    children: Dict[str, Union["Group", Dataset, Link]] = field(default_factory=dict)

    def keys(self):
        return self.children.keys()

    def find(self, relative_path: str):
        node: object = self
        for part in relative_path.strip("/").split("/"):
            if not isinstance(node, Group):
                return None
            node = node.children.get(part)
        return node


# The parent's side ---------------------------------------------------------------------------
def read_structure(source: HDF5Source, isolated: bool = True) -> Group:
    """The groups, datasets, links and attributes of an HDF5 file, parsed in a child process
    unless ``isolated`` is False."""
    if isolated:
        output = _run_child({"op": "describe"}, source, METADATA_SECONDS, METADATA_MEMORY_BYTES,
                            "reading its structure")
        try:
            description = json.loads(output.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            raise HDF5ReadError(f"{source.describe()}: the structure reader sent back nonsense ({error}).") from None
    else:
        description = _guarded(source, lambda: _describe(source))
    return _build_tree(description, source)


def read_arrays(source: HDF5Source, datasets: Sequence[Dataset], isolated: bool = True,
                max_bytes: Optional[int] = None) -> List[np.ndarray]:
    """Every dataset's data, as stored (dtype and byte order as ``dataset.dtype``). Contiguous
    data is read here; the rest by one child process for all of them. The declared sizes are
    allocated: check shapes against what you expect first, or pass ``max_bytes``."""
    total = sum(d.nbytes for d in datasets)
    if max_bytes is not None and total > max_bytes:
        raise HDF5ReadError(f"{source.describe()}: the datasets asked for declare {total} bytes, more than the "
                            f"{max_bytes} allowed.")
    for dataset in datasets:
        if dataset.dtype is None:
            raise HDF5ReadError(f"{source.describe()}: {dataset.path} is not numeric data ({dataset.type_problem}).")
        if dataset.external or dataset.is_virtual:
            raise HDF5ReadError(f"{source.describe()}: {dataset.path} keeps its data outside the file.")
    results: List[Optional[np.ndarray]] = [None] * len(datasets)
    elsewhere = [i for i, d in enumerate(datasets) if not d.readable_in_place]
    if elsewhere:
        wanted = [datasets[i] for i in elsewhere]
        arrays = [np.empty(d.shape, d.dtype) for d in wanted]
        if isolated:
            total = sum(d.nbytes for d in wanted)
            largest = max(d.nbytes for d in wanted)
            request = {"op": "read", "datasets": [d.path for d in wanted]}
            _run_child(request, source, DATA_SECONDS_BASE + total / DATA_BYTES_PER_SECOND,
                       METADATA_MEMORY_BYTES + 2 * largest, "reading its data", into=arrays)
        else:
            _guarded(source, lambda: _read_into(source, [d.path for d in wanted], arrays))
        for i, array in zip(elsewhere, arrays):
            results[i] = array
    for i, dataset in enumerate(datasets):
        if results[i] is None:
            results[i] = read_rows(source, dataset, 0, dataset.shape[0] if dataset.shape else None)
    return results  # type: ignore[return-value]


def read_rows(source: HDF5Source, dataset: Dataset, first: int, stop: Optional[int]) -> np.ndarray:
    """Rows [first, stop) of a contiguous dataset (all of a scalar one when ``stop`` is None),
    read from the file in this process: only offsets the structure reader validated are used."""
    if not dataset.readable_in_place:
        raise HDF5ReadError(f"{source.describe()}: {dataset.path} is not stored contiguously; use read_arrays.")
    assert dataset.dtype is not None and dataset.offset is not None
    if stop is None:
        shape, begin, count = dataset.shape, 0, dataset.nbytes
    else:
        rows = dataset.shape[0]
        if not 0 <= first <= stop <= rows:
            raise ValueError(f"rows {first}:{stop} of {dataset.path}, which has {rows}")
        row_bytes = dataset.nbytes // rows if rows else 0
        shape, begin, count = (stop - first,) + tuple(dataset.shape[1:]), first * row_bytes, (stop - first) * row_bytes
    array = np.empty(shape, dataset.dtype)
    limit = source.size
    with open(source.path, "rb") as raw:
        file_size = os.fstat(raw.fileno()).st_size
        end = source.start + dataset.offset + dataset.nbytes
        if dataset.offset + dataset.nbytes > (limit if limit is not None else file_size - source.start) or end > file_size:
            raise HDF5ReadError(
                f"{source.describe()}: {dataset.path} claims bytes {dataset.offset}..{dataset.offset + dataset.nbytes} "
                f"beyond the end of the file (truncated?)."
            )
        raw.seek(source.start + dataset.offset + begin)
        view = memoryview(array.reshape(-1).view(np.uint8)) if count else memoryview(b"")
        got = 0
        while got < count:
            read = raw.readinto(view[got:])
            if not read:
                raise HDF5ReadError(f"{source.describe()}: {dataset.path} ends early; the file was cut short while reading.")
            got += read
    return array


def _guarded(source: HDF5Source, work):
    """Runs parsing in this process (trusted files), with its exceptions made ours."""
    try:
        return work()
    except _ChildError as error:
        raise HDF5ReadError(f"{source.describe()}: {error}") from None
    except (Exception, MemoryError, RecursionError) as error:  # h5py raises many types
        raise HDF5ReadError(f"{source.describe()}: libhdf5 could not read {_reading[0]} ({type(error).__name__}: "
                            f"{error}); the file is damaged or not HDF5.") from None


def _child_environment() -> Dict[str, str]:
    environment = dict(os.environ)
    environment.update({
        # One thread: the child parses, and thread stacks would eat its address space.
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        # No filter plugin is ever loaded on a file's behalf.
        "HDF5_PLUGIN_PRELOAD": "::",
    })
    return environment


def _run_child(request: dict, source: HDF5Source, seconds: float, memory: int, what: str,
               into: Optional[List[np.ndarray]] = None) -> bytes:
    """Runs this file as a script on ``source``; returns its stdout, or with ``into`` fills
    those arrays, in order, with exactly their size in bytes from it."""
    request = dict(request, path=source.path, start=source.start, size=source.size, memory=memory)
    bootstrap = (
        "import json, runpy, sys; setup = json.loads(sys.stdin.readline()); "
        "sys.path[:0] = setup['sys_path']; runpy.run_path(setup['script'], run_name='__main__')"
    )
    setup = {"sys_path": [p for p in sys.path if p], "script": os.path.abspath(__file__)}
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-c", bootstrap], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=_child_environment(), close_fds=True,
        )
    except OSError as error:
        raise OSError(f"{source.describe()}: cannot start the process that reads HDF5 files ({error}).") from None
    # stderr is a pipe drained by a thread (the child may write no file at all, and must never
    # block on a full pipe); its first 64 KB are kept for the error message.
    messages: List[bytes] = []
    drain = threading.Thread(target=_drain, args=(child.stderr, messages), daemon=True)
    drain.start()
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        child.kill()

    timer = threading.Timer(seconds, stop)
    timer.start()
    complete = True
    try:
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write((json.dumps(setup) + "\n" + json.dumps(request) + "\n").encode("utf-8"))
            child.stdin.close()
        except OSError:
            pass  # it died before reading: its exit status says why
        if into is None:
            output = child.stdout.read(MAX_TOTAL_ATTRIBUTE_BYTES * 4 + (16 << 20))
        else:
            output = b""
            complete = all(_read_exactly(child.stdout, array) for array in into)
            complete = complete and not child.stdout.read(1)
        child.stdout.close()
        returncode = child.wait()
    finally:
        timer.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
        drain.join(5)
    message = b"".join(messages)
    if returncode != 0:
        raise HDF5ReadError(_explain_failure(source, returncode, message, expired.is_set(), seconds, memory, what))
    if not complete:
        raise HDF5ReadError(f"{source.describe()}: the data reader sent back the wrong amount of data.")
    return output


def _drain(stream, kept: List[bytes]) -> None:
    size = 0
    for chunk in iter(lambda: stream.read(4096), b""):
        if size < (64 << 10):
            kept.append(chunk)
            size += len(chunk)
    stream.close()


def _read_exactly(stream, array: np.ndarray) -> bool:
    """Fills the array from the stream; False if the stream ended first."""
    view = memoryview(array.reshape(-1).view(np.uint8))
    got = 0
    while got < len(view):
        read = stream.readinto(view[got:])
        if not read:
            return False
        got += read
    return True


def _explain_failure(source: HDF5Source, returncode: int, stderr: bytes, expired: bool, seconds: float,
                     memory: int, what: str) -> str:
    where = source.describe()
    for line in stderr.splitlines():
        if line.startswith(_ERROR_PREFIX):
            return f"{where}: {line[len(_ERROR_PREFIX):].decode('utf-8', 'replace')}"
    if expired:
        return (f"{where}: libhdf5 was still {what} after {seconds:.0f} s and was stopped; the file is damaged or "
                "built to make readers loop. It was not loaded.")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return (f"{where}: libhdf5 crashed ({name}) while {what}; the file is damaged or hostile. The crash "
                "happened in a separate process, so nothing here was affected, and the file was not loaded.")
    if b"MemoryError" in stderr:
        return (f"{where}: {what} needed more than {memory >> 20} MiB of memory, far more than the file's "
                "contents justify; the file is damaged or hostile. It was not loaded.")
    tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
    return f"{where}: the HDF5 reader failed while {what} (exit status {returncode}: {tail[0]})."


def _numeric_dtype(text) -> np.dtype:
    """A dtype the child may name: plain integers and floats only (never object dtypes)."""
    dtype = np.dtype(str(text))
    if dtype.kind not in "fiu" or dtype.itemsize not in (1, 2, 4, 8) or dtype.fields is not None or dtype.subdtype:
        raise ValueError(f"dtype {text!r} is not a plain number type")
    return dtype


def _shape(values) -> Tuple[int, ...]:
    shape = tuple(values)
    if len(shape) > MAX_RANK or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"shape {shape[:MAX_RANK + 1]!r}")
    return shape


def _decode_attribute(value, source: HDF5Source):
    kind = value.get("t")
    if kind == "str":
        return value["v"]
    if kind == "bytes":
        return base64.b64decode(value["v"])
    if kind == "strs":
        items = [base64.b64decode(v["b"]) if isinstance(v, dict) else v for v in value["v"]]
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(_shape(value["shape"]))
    if kind == "array":
        dtype = _numeric_dtype(value["dtype"])
        data = base64.b64decode(value["v"])
        shape = _shape(value["shape"])
        if len(data) != int(np.prod(shape, dtype=object)) * dtype.itemsize:
            raise HDF5ReadError(f"{source.describe()}: an attribute's size does not match its shape.")
        return np.frombuffer(data, dtype).reshape(shape).copy()
    return Unsupported(str(value.get("desc", "unknown type")))


def _build_tree(description: dict, source: HDF5Source) -> Group:
    """Objects from the child's JSON, rebuilt without recursion (depth was bounded there)."""
    try:
        nodes = description["nodes"]
        built: List[object] = []
        for entry in nodes:
            attrs = {name: _decode_attribute(v, source) for name, v in entry.get("attrs", [])}
            kind = entry["kind"]
            if kind == "group":
                node: object = Group(str(entry["path"]), attrs)
            elif kind == "dataset":
                dtype = _numeric_dtype(entry["dtype"]) if entry.get("dtype") else None
                offset = entry.get("offset")
                if offset is not None and (not isinstance(offset, int) or offset < 0):
                    raise ValueError(f"offset {offset!r}")
                node = Dataset(str(entry["path"]), attrs, _shape(entry["shape"]), dtype, entry.get("type_problem"),
                               str(entry["layout"]), bool(entry["external"]), offset, int(entry["storage_size"]),
                               int(entry["filters"]))
            else:
                node = Link(str(entry["path"]), str(kind), str(entry.get("target", "")))
            built.append(node)
            parent = entry.get("parent")
            if parent is not None:
                owner = built[parent]
                assert isinstance(owner, Group)
                owner.children[str(entry["name"])] = node  # type: ignore[assignment]
        root = built[0]
        assert isinstance(root, Group)
        return root
    except HDF5ReadError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, AssertionError, OverflowError,
            RecursionError, MemoryError, base64.binascii.Error) as error:
        # Only a broken or subverted child sends these: the parent trusts its output no more than the file.
        raise HDF5ReadError(f"{source.describe()}: the structure reader sent back an incomplete description ({error!r}).") from None


# The child's side (also used in-process for trusted files) ----------------------------------
class _ChildError(Exception):
    """A refusal with a message for the user (not a crash)."""


# What the reader was at, for messages about failures inside h5py (which rarely say).
_reading = ["the file's superblock"]


class _Window:
    """A read-only file object onto ``size`` bytes from ``start`` of a file, for h5py."""

    def __init__(self, path: str, start: int, size: int) -> None:
        self._file = open(path, "rb")
        self._start, self._size, self._position = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._position, self._size)[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._size - self._position))
        if count == 0:
            return 0
        self._file.seek(self._start + self._position)
        read = self._file.readinto(memoryview(buffer)[:count])
        self._position += read
        return read

    def read(self, count: int = -1) -> bytes:
        count = self._size - self._position if count < 0 else count
        buffer = bytearray(max(0, min(count, self._size - self._position)))
        return bytes(buffer[: self.readinto(buffer)])

    def close(self) -> None:
        self._file.close()


def _open(source: HDF5Source):
    import h5py

    if source.start == 0 and source.size is None:
        return h5py.File(source.path, "r"), None
    window = _Window(source.path, source.start, int(source.size or 0))
    return h5py.File(window, "r"), window


def _image_size(source: HDF5Source) -> int:
    return int(source.size) if source.size is not None else os.path.getsize(source.path)


def _float_problem(type_id) -> Optional[str]:
    """Why an HDF5 float type is not exactly IEEE binary16/32/64, or None."""
    import h5py

    size = type_id.get_size()
    if size not in _IEEE_FLOATS:
        return f"a {size * 8}-bit float, not IEEE binary16, binary32 or binary64"
    spos, epos, esize, mpos, msize, bias = _IEEE_FLOATS[size]
    found = {
        "precision": (type_id.get_precision(), size * 8), "bit offset": (type_id.get_offset(), 0),
        "sign/exponent/mantissa fields": (tuple(type_id.get_fields()), (spos, epos, esize, mpos, msize)),
        "exponent bias": (type_id.get_ebias(), bias), "normalisation": (type_id.get_norm(), h5py.h5t.NORM_IMPLIED),
        "padding": (tuple(type_id.get_pad()) + (type_id.get_inpad(),), (h5py.h5t.PAD_ZERO,) * 3),
    }
    differs = [f"{what} {got} (IEEE: {want})" for what, (got, want) in found.items() if got != want]
    if type_id.get_order() not in (h5py.h5t.ORDER_LE, h5py.h5t.ORDER_BE):
        differs.append("a mixed byte order")
    if differs:
        return f"a {size * 8}-bit float that is not IEEE 754: " + ", ".join(differs)
    return None


def _dataset_type(type_id) -> Tuple[Optional[str], Optional[str]]:
    import h5py

    type_class = type_id.get_class()
    if type_class == h5py.h5t.FLOAT:
        problem = _float_problem(type_id)
        if problem:
            return None, problem
        order = "<" if type_id.get_order() == h5py.h5t.ORDER_LE else ">"
        return f"{order}f{type_id.get_size()}", None
    if type_class == h5py.h5t.INTEGER:
        size = type_id.get_size()
        if size in (1, 2, 4, 8) and type_id.get_precision() == size * 8 and type_id.get_offset() == 0:
            order = "<" if type_id.get_order() == h5py.h5t.ORDER_LE else ">"
            signed = type_id.get_sign() == h5py.h5t.SGN_2
            return f"{order}{'i' if signed else 'u'}{size}", None
        return None, f"a {size}-byte integer with unusual precision or padding"
    names = {h5py.h5t.STRING: "strings", h5py.h5t.COMPOUND: "a compound type", h5py.h5t.OPAQUE: "opaque bytes",
             h5py.h5t.ENUM: "an enumeration", h5py.h5t.VLEN: "variable-length data", h5py.h5t.ARRAY: "an array type",
             h5py.h5t.REFERENCE: "references", h5py.h5t.BITFIELD: "a bit field", h5py.h5t.TIME: "times"}
    described = names.get(type_class, f"HDF5 type class {type_class}")
    try:
        return None, f"{type_id.dtype} ({described})"  # what h5py would call it: bool for its enums
    except Exception:  # h5py cannot map every HDF5 type to numpy
        return None, described


def _text(raw: bytes, what: str) -> str:
    if len(raw) > MAX_NAME_BYTES:
        raise _ChildError(f"{what} is {len(raw)} bytes long; no Keras file has names that long.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _ChildError(f"{what} {raw[:60]!r} is not UTF-8 text; the file is damaged or not a Keras file.") from None


def _encode_string(value):
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b": base64.b64encode(value).decode("ascii")}
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # lone surrogates from a bad vlen string
            return value
        except UnicodeEncodeError:
            return {"b": base64.b64encode(value.encode("utf-8", "surrogateescape")).decode("ascii")}
    return str(value)


def _attributes(obj, where: str, budget: List[int]) -> List[list]:
    import h5py

    count = h5py.h5o.get_info(obj.id).num_attrs
    if count > MAX_ATTRIBUTES_PER_OBJECT:
        raise _ChildError(f"{where} has {count} attributes; no Keras file has more than a few.")
    result = []
    for index in range(count):
        _reading[0] = f"attribute {index} of {where}"
        attribute = h5py.h5a.open(obj.id, index=index)
        name = _text(attribute.name, f"an attribute name of {where}")
        _reading[0] = f"attribute {name!r} of {where}"
        shape = attribute.shape
        if shape is None:
            shape = ()
        if len(shape) > MAX_RANK:
            raise _ChildError(f"attribute {name!r} of {where} has {len(shape)} dimensions.")
        elements = int(np.prod(shape, dtype=object))
        type_id = attribute.get_type()
        type_class = type_id.get_class()
        stored = elements * type_id.get_size()
        if stored > MAX_ATTRIBUTE_BYTES or elements > MAX_ATTRIBUTE_BYTES // 8:
            raise _ChildError(f"attribute {name!r} of {where} declares {stored} bytes; no Keras file has one that large.")
        if type_class == h5py.h5t.FLOAT:
            problem = _float_problem(type_id)
            if problem:
                result.append([name, {"t": "unsupported", "desc": problem}])
                continue
        if type_class not in (h5py.h5t.STRING, h5py.h5t.FLOAT, h5py.h5t.INTEGER):
            result.append([name, {"t": "unsupported", "desc": f"HDF5 type class {type_class}"}])
            continue
        value = obj.attrs[name]
        if not isinstance(value, (np.ndarray, np.generic, bytes, str)):  # h5py.Empty: a null dataspace
            result.append([name, {"t": "unsupported", "desc": "an empty attribute"}])
            continue
        if type_class == h5py.h5t.STRING:
            if isinstance(value, np.ndarray):
                items = [_encode_string(v) for v in value.reshape(-1).tolist()]
                size = sum(len(v) if isinstance(v, str) else len(v["b"]) for v in items)
                encoded = {"t": "strs", "shape": list(value.shape), "v": items}
            else:
                item = _encode_string(value)
                size = len(item) if isinstance(item, str) else len(item["b"])
                encoded = {"t": "str", "v": item} if isinstance(item, str) else {"t": "bytes", "v": item["b"]}
        else:
            array = np.asarray(value)
            size = array.nbytes
            encoded = {"t": "array", "dtype": array.dtype.str, "shape": list(array.shape),
                       "v": base64.b64encode(array.tobytes()).decode("ascii")}
        if size > MAX_ATTRIBUTE_BYTES:
            raise _ChildError(f"attribute {name!r} of {where} holds {size} bytes; no Keras file has one that large.")
        budget[0] -= size
        if budget[0] < 0:
            raise _ChildError(f"the attributes hold more than {MAX_TOTAL_ATTRIBUTE_BYTES >> 20} MiB; no Keras file does.")
        result.append([name, encoded])
    return result


def _dataset_entry(dataset, path: str, image_size: int) -> dict:
    import h5py

    dataset_id = dataset.id
    shape = dataset_id.shape
    if shape is None:
        shape = ()
    if len(shape) > MAX_RANK:
        raise _ChildError(f"dataset {path} has {len(shape)} dimensions.")
    dtype, problem = _dataset_type(dataset_id.get_type())
    plist = dataset_id.get_create_plist()
    layouts = {h5py.h5d.CONTIGUOUS: "contiguous", h5py.h5d.CHUNKED: "chunked", h5py.h5d.COMPACT: "compact",
               h5py.h5d.VIRTUAL: "virtual"}
    layout = layouts.get(plist.get_layout(), "unknown")
    external = plist.get_external_count() > 0
    offset = dataset_id.get_offset() if layout == "contiguous" and not external else None
    storage = dataset_id.get_storage_size()
    if offset is not None and dtype is not None:
        nbytes = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
        if storage != nbytes or offset < 0 or offset + nbytes > image_size:
            raise _ChildError(
                f"dataset {path} declares {nbytes} bytes of data at byte {offset} ({storage} stored) in a "
                f"{image_size}-byte file; the file is truncated or damaged."
            )
    return {"kind": "dataset", "shape": [int(n) for n in shape], "dtype": dtype, "type_problem": problem,
            "layout": layout, "external": external, "offset": offset, "storage_size": int(storage),
            "filters": plist.get_nfilters() if layout == "chunked" else 0}


def _describe(source: HDF5Source) -> dict:
    """The whole structure as plain data: a list of nodes, each naming its parent's index."""
    import h5py

    _reading[0] = "the file's superblock"
    handle, window = _open(source)
    try:
        image_size = _image_size(source)
        budget = [MAX_TOTAL_ATTRIBUTE_BYTES]
        root = {"kind": "group", "path": "/", "parent": None, "name": "",
                "attrs": _attributes(handle, "the root group", budget)}
        nodes = [root]
        seen = {h5py.h5o.get_info(handle.id).addr: "/"}
        pending = collections.deque([(handle, "/", 0, 0)])  # (group, path, its index in nodes, depth)
        while pending:
            group, path, index, depth = pending.popleft()
            if depth >= MAX_DEPTH:
                raise _ChildError(f"groups nest more than {MAX_DEPTH} deep at {path}; no Keras file does.")
            for raw_name in group.id.__iter__():
                name = _text(raw_name, f"a name in {path}")
                child_path = path.rstrip("/") + "/" + name
                _reading[0] = child_path
                if len(nodes) >= MAX_OBJECTS:
                    raise _ChildError(f"the file has more than {MAX_OBJECTS} objects; no Keras file does.")
                info = group.id.links.get_info(raw_name)
                entry: dict = {"path": child_path, "parent": index, "name": name}
                if info.type != h5py.h5l.TYPE_HARD:
                    kinds = {h5py.h5l.TYPE_SOFT: "SoftLink", h5py.h5l.TYPE_EXTERNAL: "ExternalLink"}
                    entry["kind"] = kinds.get(info.type, "UserDefinedLink")
                    if info.type == h5py.h5l.TYPE_SOFT:
                        entry["target"] = _encode_string(group.id.links.get_val(raw_name))
                        if not isinstance(entry["target"], str):
                            entry["target"] = repr(entry["target"])
                    nodes.append(entry)
                    continue
                obj = group[name]
                address = h5py.h5o.get_info(obj.id).addr
                if address in seen:
                    raise _ChildError(f"{child_path} is the same object as {seen[address]} (a second hard link, or a "
                                      "loop); Keras never writes that.")
                seen[address] = child_path
                if isinstance(obj, h5py.Dataset):
                    entry.update(_dataset_entry(obj, child_path, image_size))
                elif isinstance(obj, h5py.Group):
                    entry["kind"] = "group"
                    pending.append((obj, child_path, len(nodes), depth + 1))
                else:
                    entry["kind"] = "UserDefinedLink"  # a named datatype: no data, nothing to load
                    nodes.append(entry)
                    continue
                entry["attrs"] = _attributes(obj, child_path, budget)
                nodes.append(entry)
        return {"nodes": nodes}
    finally:
        handle.close()
        if window is not None:
            window.close()


def _read_into(source: HDF5Source, paths: Sequence[str], arrays: Sequence[np.ndarray], sink=None) -> None:
    """Reads each dataset into its array (checked against the file again), then hands the array
    to ``sink``, if given, instead of keeping it."""
    import h5py

    handle, window = _open(source)
    try:
        for path, array in zip(paths, arrays):
            node = handle.get(path)
            if not isinstance(node, h5py.Dataset):
                raise _ChildError(f"{path} is no longer a dataset (the file changed while it was read).")
            dtype, _ = _dataset_type(node.id.get_type())
            if tuple(node.shape or ()) != array.shape or dtype != array.dtype.str:
                raise _ChildError(f"{path} changed shape or type while the file was read.")
            try:
                if array.size:
                    node.read_direct(array)
            except (OSError, RuntimeError, ValueError, TypeError, KeyError) as error:
                raise _ChildError(f"the data of {path} cannot be read back ({type(error).__name__}: {error}); the "
                                  "file is damaged (a corrupt compressed chunk?).") from None
            if sink is not None:
                sink(array)
    finally:
        handle.close()
        if window is not None:
            window.close()


def _limit_resources(extra_memory: int) -> None:
    """No core files, no file writes, and an address space bounded above what is mapped now."""
    try:
        import resource
    except ImportError:  # not POSIX: only the wall-clock limit applies
        return
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    try:
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return  # no /proc: no reliable base to add to
    limit = mapped + extra_memory
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _child_main() -> int:
    request = json.loads(sys.stdin.readline())
    import h5py  # noqa: F401  (imported before the address-space limit is set)

    _limit_resources(int(request["memory"]))
    source = HDF5Source(request["path"], int(request["start"]), request["size"])
    out = sys.stdout.buffer
    try:
        if request["op"] == "describe":
            out.write(json.dumps(_describe(source)).encode("utf-8"))
        else:
            structure = _build_tree(_describe(source), source)
            arrays = []
            for path in request["datasets"]:
                node = structure.find(path)
                if not isinstance(node, Dataset) or node.dtype is None:
                    raise _ChildError(f"{path} is not a numeric dataset.")
                arrays.append(node)
            for node in arrays:  # one at a time, so memory holds the largest only
                _read_into(source, [node.path], [np.empty(node.shape, node.dtype)],
                           sink=lambda array: out.write(memoryview(array.reshape(-1).view(np.uint8))))
        out.flush()
    except _ChildError as error:
        sys.stderr.buffer.write(_ERROR_PREFIX + str(error).encode("utf-8", "replace") + b"\n")
        return 3
    except MemoryError:
        sys.stderr.buffer.write(b"MemoryError\n")
        return 4
    except Exception as error:  # h5py raises many types; each means "cannot be read"
        if "allocation failed" in str(error):  # libhdf5's malloc hit the address-space limit
            sys.stderr.buffer.write(b"MemoryError\n")
            return 4
        text = f"libhdf5 could not read {_reading[0]} ({type(error).__name__}: {error}); the file is damaged or not HDF5."
        sys.stderr.buffer.write(_ERROR_PREFIX + text.encode("utf-8", "replace") + b"\n")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
