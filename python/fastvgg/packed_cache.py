"""Packed weights on disk: written once, then memory-mapped read-only and shared.

Packing the weights (Winograd transforms, dense panels) is most of the time a model takes
to load. The packed arrays, exactly as the kernels use them, are written once to a cache
file; a later load of the same weights maps that file read-only instead of packing again,
and every process on the host that maps it shares its pages (one copy in memory).

Where: ``<fastvgg cache>/packed/`` (``$FASTVGG_HOME``, else ``~/.cache/fastvgg``, as for the
ImageNet weights). ``$FASTVGG_PACKED_CACHE`` set to a directory puts the cache there; set to
``off`` (or ``0``, ``false``, ``no``, ``none``) it turns it off. The ``packed_cache`` keyword of
``fastvgg.VGG16``/``VGG19`` does the same for one model (a path, or False).

The file name is a hash of the identity below; nothing in the name is trusted. A file is
used only if its header says exactly what the loading process expects:

======== ====================================================================================
bytes    content
======== ====================================================================================
0-7      magic ``b"FVGGPACK"``
8-11     format version (uint32, little-endian; this module writes and reads ``FORMAT_VERSION``)
12-15    length L of the header JSON (uint32)
16-19    CRC-32 of the header JSON (uint32)
20-23    zero
24-24+L  header JSON (UTF-8): ``identity`` (format, fastvgg version, kernel set, precision,
         the graph, and the source file's content hash: Keras's md5 for the ImageNet files,
         else SHA-256 of the whole file) and ``sections``: per array its ``name``, ``dtype``,
         ``shape``, ``offset``, ``nbytes`` and ``check``: the CRC-32 of its first and of its
         last MiB
...      each section's bytes at its offset: a multiple of 2 MiB for sections of 2 MiB or
         more (so big arrays start on huge-page boundaries), of 4 KiB for the others
======== ====================================================================================

Checks at load cost microseconds to a few milliseconds, not a hash of 700 MB: the magic,
version, header CRC, identity, that every section lies inside the file (a truncated file
fails here), aligned and without overlap, and the CRC-32 of each section's first and last
MiB. A file that fails any check is ignored and rebuilt (replaced atomically), never
trusted; the reason is logged to the ``fastvgg.packed_cache`` logger.

Writing is atomic (a temporary file in the same directory, fsync, rename), so a reader never
sees half a file, and several processes may build at once: a lock file (``<name>.lock``,
empty, left in place) lets one of them build while the others wait and then map its file; without the lock (a file system without
``flock``), each writes its own temporary file and the last rename wins, each result valid.

A source file's SHA-256 is computed once per version of the file and remembered in
``sources/`` of the cache directory, keyed by its path, inode, size, modification and change
times (the change time cannot be set by a user; a file changed within 2 s of being hashed is
hashed again next time).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import struct
import tempfile
import time
import zlib
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

log = logging.getLogger("fastvgg.packed_cache")

MAGIC = b"FVGGPACK"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIIII")  # magic, format version, JSON length, JSON CRC-32, zero
PAGE = 4096
HUGE_PAGE = 2 << 20
CHECK_SPAN = 1 << 20
_MAX_HEADER_BYTES = 16 << 20
SUFFIX = ".fvpack"
ENV = "FASTVGG_PACKED_CACHE"
OFF_WORDS = ("off", "0", "false", "no", "none")
# How long a process waits for another one building the same file before building its own.
LOCK_WAIT_SECONDS = 300.0
# A source file modified this close to the time it was hashed is hashed again next time (its
# timestamps might not yet reflect a write that landed in the same tick).
_RACY_SECONDS = 2.0
_HASH_CHUNK = 8 << 20
# dtypes a section may have: what the kernels pack (float32 weights, bytes of corrections and
# bf16 halves). Anything else in a header is refused.
ALLOWED_DTYPES = ("<f4", "|u1", "|i1", "<u2", "<i4", "<u4", "<f8")

CacheDirectory = Union[None, bool, str, "os.PathLike[str]"]


class CacheMiss(Exception):
    """A cache file that cannot be used; ``str()`` says why."""


def cache_directory(directory: CacheDirectory = None) -> Optional[str]:
    """The directory packed files go to, or None when the cache is off.

    ``directory``: None (from ``$FASTVGG_PACKED_CACHE``, else ``<fastvgg cache>/packed``),
    False (off), True (the default location even if the variable says off) or a path.
    """
    if directory is False:
        return None
    if directory is None or directory is True:
        configured = os.environ.get(ENV, "").strip()
        if configured and directory is None:
            if configured.lower() in OFF_WORDS:
                return None
            return os.path.abspath(os.path.expanduser(configured))
        from .download import weights_cache_dirs

        return os.path.join(weights_cache_dirs()[-1], "packed")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"`packed_cache` must be None, True, False or a directory path, got {directory!r}.")
    return os.path.abspath(os.path.expanduser(os.fspath(directory)))


# The source file's content -------------------------------------------------------------
def source_digest(path: str, directory: Optional[str] = None, known_md5: Optional[str] = None) -> str:
    """``"md5:<hex>"`` when the caller vouches for the file's md5 (the ImageNet files, checked
    at download), else ``"sha256:<hex>"`` of the file's bytes, remembered per file version in
    ``directory/sources`` when a directory is given."""
    if known_md5:
        return f"md5:{known_md5}"
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):  # a SavedModel directory: the digests of the files a load reads
        from .tf_saved_model import saved_model_files

        files = "\n".join(f"{name} {source_digest(os.path.join(path, name), directory)}" for name in saved_model_files(path))
        return "sha256:" + hashlib.sha256(files.encode("utf-8", "surrogateescape")).hexdigest()
    stat = os.stat(path)
    fingerprint = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    memo = None
    if directory is not None:
        memo = os.path.join(directory, "sources", hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".json")
        try:
            with open(memo) as f:
                saved = json.load(f)
            if (
                saved.get("path") == path and saved.get("fingerprint") == fingerprint
                and isinstance(saved.get("sha256"), str) and len(saved["sha256"]) == 64
                and saved.get("hashed_at", 0) - max(stat.st_mtime, stat.st_ctime) > _RACY_SECONDS
            ):
                return "sha256:" + saved["sha256"]
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    hashed_at = time.time()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    sha = digest.hexdigest()
    if memo is not None:
        try:
            os.makedirs(os.path.dirname(memo), exist_ok=True)
            _write_atomically(memo, json.dumps(
                {"path": path, "fingerprint": fingerprint, "sha256": sha, "hashed_at": hashed_at}).encode())
        except OSError as error:
            log.debug("could not remember the hash of %s: %s", path, error)
    return "sha256:" + sha


def cache_file_name(identity: dict) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:40] + SUFFIX


def _canonical(identity: dict) -> dict:
    """The identity as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(identity, sort_keys=True))


# Writing --------------------------------------------------------------------------------
def _align(offset: int, nbytes: int) -> int:
    alignment = HUGE_PAGE if nbytes >= HUGE_PAGE else PAGE
    return -(-offset // alignment) * alignment


def _crc(view: memoryview) -> int:
    return zlib.crc32(view) & 0xFFFFFFFF


def _section_check(data: memoryview) -> Dict[str, int]:
    return {"head_crc32": _crc(data[:CHECK_SPAN]), "tail_crc32": _crc(data[max(0, len(data) - CHECK_SPAN):])}


def _as_bytes(array) -> memoryview:
    array = np.asarray(array)
    if not array.flags.c_contiguous:
        raise ValueError("packed sections must be C-contiguous arrays")
    return memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")


def _layout(identity: dict, sections: Sequence[Tuple[str, np.ndarray]]) -> Tuple[bytes, List[dict], int]:
    """The header bytes (prefix + JSON, padded to whole pages), the section entries and the
    file size. The JSON's length does not depend on the offsets' values beyond their digits,
    so the offsets are computed for a header size that is then checked to hold."""
    entries = []
    for name, array in sections:
        array = np.asarray(array)
        dtype = array.dtype.str
        if dtype not in ALLOWED_DTYPES:
            raise ValueError(f"section {name!r}: dtype {dtype} cannot be stored")
        data = _as_bytes(array)
        entries.append({"name": str(name), "dtype": dtype, "shape": list(array.shape), "nbytes": len(data),
                        "offset": 0, "check": _section_check(data)})
    header_pages = 1
    while True:
        offset = header_pages * PAGE
        for entry in entries:
            offset = _align(offset, entry["nbytes"])
            entry["offset"] = offset
            offset += entry["nbytes"]
        body = json.dumps({"identity": identity, "sections": entries}, sort_keys=True).encode()
        needed = _PREFIX.size + len(body)
        if needed <= header_pages * PAGE:
            prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), zlib.crc32(body) & 0xFFFFFFFF, 0)
            return (prefix + body).ljust(header_pages * PAGE, b"\0"), entries, offset
        header_pages = -(-needed // PAGE)


def _write_atomically(path: str, content: bytes) -> None:
    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def write_packed(path: str, identity: dict, sections: Sequence[Tuple[str, np.ndarray]]) -> None:
    """Writes ``sections`` (name, array) with ``identity`` to ``path`` atomically: a
    temporary file beside it, flushed to disk, then renamed over ``path``."""
    header, entries, size = _layout(_canonical(identity), sections)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for entry, (_, array) in zip(entries, sections):
                f.seek(entry["offset"])  # the gap since the last section stays a hole
                f.write(_as_bytes(array))
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise


# Reading --------------------------------------------------------------------------------
def read_packed(path: str, identity: dict) -> Dict[str, np.ndarray]:
    """The sections of the cache file ``path`` as read-only numpy arrays over a shared,
    read-only mapping of the file (the arrays keep it open). Raises CacheMiss saying why
    when the file is missing, foreign, of another version or identity, truncated or corrupt."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CacheMiss("no cache file") from None
    except OSError as error:
        raise CacheMiss(f"cannot open: {error}") from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise CacheMiss(f"only {size} bytes: not a packed-weights file, or truncated")
            magic, version, body_length, body_crc, _ = _PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise CacheMiss("not a fastvgg packed-weights file (wrong magic)")
            if version != FORMAT_VERSION:
                raise CacheMiss(f"format version {version}, this fastvgg reads {FORMAT_VERSION}")
            if body_length > min(_MAX_HEADER_BYTES, size - _PREFIX.size):
                raise CacheMiss(f"header of {body_length} bytes does not fit in a file of {size}: truncated or corrupt")
            body = f.read(body_length)
            if zlib.crc32(body) & 0xFFFFFFFF != body_crc:
                raise CacheMiss("header checksum mismatch: corrupt")
            try:
                header = json.loads(body)
                sections = header["sections"]
                stored_identity = header["identity"]
            except (ValueError, KeyError, TypeError):
                raise CacheMiss("header is not the expected JSON: corrupt") from None
            if stored_identity != _canonical(identity):
                raise CacheMiss("built for other weights, graph, precision, kernels or fastvgg version")
            entries = _checked_entries(sections, size, _PREFIX.size + body_length)
            if not entries:
                raise CacheMiss("no sections")
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except CacheMiss:
            raise
        except (OSError, ValueError) as error:
            raise CacheMiss(f"unreadable: {error}") from None
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
        try:
            mapping.madvise(mmap.MADV_WILLNEED)  # start reading ahead; returns at once
        except OSError:
            pass
    view = memoryview(mapping)
    arrays = {}
    for entry in entries:
        data = view[entry["offset"] : entry["offset"] + entry["nbytes"]]
        if _section_check(data) != entry["check"]:
            raise CacheMiss(f"section {entry['name']!r} fails its checksum: corrupt")
        arrays[entry["name"]] = np.frombuffer(mapping, dtype=entry["dtype"], count=entry["count"],
                                              offset=entry["offset"]).reshape(entry["shape"])
    view.release()
    return arrays


def _checked_entries(sections, file_size: int, header_end: int) -> List[dict]:
    if not isinstance(sections, list):
        raise CacheMiss("section table is not a list: corrupt")
    checked, names, end = [], set(), header_end
    for entry in sections:
        try:
            name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
            offset, nbytes, check = entry["offset"], entry["nbytes"], entry["check"]
            valid = (
                isinstance(name, str) and name not in names and dtype in ALLOWED_DTYPES
                and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offset, int) and isinstance(nbytes, int) and nbytes >= 0
                and isinstance(check, dict) and set(check) == {"head_crc32", "tail_crc32"}
            )
        except (KeyError, TypeError):
            valid = False
        if not valid:
            raise CacheMiss("malformed section entry: corrupt")
        itemsize = np.dtype(dtype).itemsize
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * itemsize != nbytes:
            raise CacheMiss(f"section {name!r}: shape {shape} of {dtype} is not {nbytes} bytes: corrupt")
        if offset < end or offset % PAGE or (nbytes >= HUGE_PAGE and offset % HUGE_PAGE):
            raise CacheMiss(f"section {name!r}: offset {offset} overlaps or is misaligned: corrupt")
        if offset + nbytes > file_size:
            raise CacheMiss(f"section {name!r} ends at byte {offset + nbytes} of a {file_size}-byte file: truncated")
        names.add(name)
        end = offset + nbytes
        checked.append({**entry, "count": count})
    return checked


def clear(directory: CacheDirectory = None) -> int:
    """Deletes every packed-weights file (and its lock and the remembered source hashes) in
    the cache directory; returns the bytes freed. Processes that have a file mapped keep
    their pages until they exit. Only files this module names are touched."""
    root = cache_directory(directory)
    if root is None and directory is None:  # turned off by the variable: clear the default place
        root = cache_directory(True)
    if root is None or not os.path.isdir(root):
        return 0
    freed = 0
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.endswith((SUFFIX, SUFFIX + ".lock")) or (name.startswith(".tmp-") and name.endswith(SUFFIX)):
            try:
                freed += os.path.getsize(path)
                os.remove(path)
            except OSError:
                pass
    sources = os.path.join(root, "sources")
    if os.path.isdir(sources):
        for name in os.listdir(sources):
            if name.endswith(".json"):
                _remove_quietly(os.path.join(sources, name))
    return freed


# Loading a model through the cache -----------------------------------------------------------
@contextmanager
def _build_lock(path: str, timeout: float) -> Iterator[bool]:
    """Holds an exclusive flock on ``path`` (True), or gives up after ``timeout`` seconds or
    where locks cannot be taken (False); the caller then proceeds without it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield False
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    locked = False
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        yield locked
    finally:
        os.close(fd)  # releases the lock


def load_through_cache(
    executor,
    identity: dict,
    build: Callable[[], None],
    directory: CacheDirectory = None,
    lock_timeout: float = LOCK_WAIT_SECONDS,
) -> str:
    """Gives ``executor`` its packed weights from the cache, or builds them with ``build()``
    (the ordinary load) and stores them for next time.

    ``executor`` offers ``export_packed() -> [(name, array)]`` and ``import_packed({name:
    buffer})`` (adopting read-only buffers without copying). Returns what happened:
    "hit" (mapped from the cache), "built" (loaded, stored and then mapped, so this process
    too shares the file's pages), "built-uncached" (loaded; the file could not be written or
    read back) or "off" (no cache directory).
    """
    root = cache_directory(directory)
    if root is None:
        build()
        return "off"
    if getattr(executor, "device", "cpu") != "cpu":  # the GPU executor keeps its weights on the device
        build()
        return "not-cacheable"
    path = os.path.join(root, cache_file_name(identity))
    if _adopt(executor, path, identity):
        return "hit"
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as error:
        log.info("packed-weights cache %s unavailable (%s); loading without it", root, error)
        build()
        return "built-uncached"
    with _build_lock(path + ".lock", lock_timeout):
        if _adopt(executor, path, identity):  # built by another process while this one waited
            return "hit"
        build()
        try:
            write_packed(path, identity, executor.export_packed())
        except (OSError, ValueError) as error:
            log.info("could not write the packed-weights cache %s: %s", path, error)
            return "built-uncached"
    return "built" if _adopt(executor, path, identity) else "built-uncached"


def _adopt(executor, path: str, identity: dict) -> bool:
    try:
        sections = read_packed(path, identity)
    except CacheMiss as miss:
        log.info("packed-weights cache %s not used: %s", path, miss)
        return False
    try:
        executor.import_packed(sections)
    except (ValueError, TypeError) as error:  # sections the executor does not accept
        log.info("packed-weights cache %s refused by the executor: %s", path, error)
        return False
    return True


# The compiled executors ------------------------------------------------------------------
class ExecutorSections:
    """``export_packed``/``import_packed`` over a ``_core`` executor's ``packed_sections`` and
    ``adopt_section``. Import adopts every section and then checks that the executor now
    reports exactly the file's sections, so a file that lacks one is refused."""

    def __init__(self, executor) -> None:
        self.executor = executor

    def export_packed(self) -> List[Tuple[str, np.ndarray]]:
        return list(self.executor.packed_sections())

    def import_packed(self, sections: Dict[str, np.ndarray]) -> None:
        try:
            # One update: the executor settles what depends on several sections (a folded
            # BatchNormalization) once, after the last.
            with self.executor.updating():
                for name, buffer in sections.items():
                    self.executor.adopt_section(name, buffer.reshape(-1).view(np.uint8))
            reported = {name for name, _ in self.executor.packed_sections()}
        except (RuntimeError, IndexError) as error:  # e.g. a layer left without weights
            raise ValueError(str(error)) from None
        if reported != set(sections):
            raise ValueError(f"the file lacks sections {sorted(reported - set(sections))}")


def _build_identity(directory: Optional[str]) -> Dict[str, str]:
    """Content hashes of what turns a weights file into packed bytes besides the executor: the
    compiled core and the Python loader. A rebuilt core or a changed loader with the same
    version number therefore never reads an older build's cache files."""
    from . import _core, layers, weights

    return {os.path.basename(module.__file__): source_digest(module.__file__, directory)
            for module in (_core, weights, layers)}


def model_identity(executor, source_path: str, directory: Optional[str], known_md5: Optional[str] = None,
                   part: Optional[str] = None) -> dict:
    """Everything the packed bytes depend on: this module's format, fastvgg's version and
    build, the kernel set, the precision, the graph, and the weights file's content and name
    (the name decides the layout of Theano-ordered files)."""
    from . import __version__

    graph = executor.graph
    # One of several executors loaded from one file (the chains of a model whose heads split
    # from one trunk): two heads of the same shape must not share an entry.
    named_part = {"part": part} if part else {}
    return {
        **named_part,
        "format": FORMAT_VERSION,
        "fastvgg": __version__,
        "build": _build_identity(directory),
        "kernels": executor.kernel_set,
        "precision": executor.precision,
        "input_channels": graph.input_channels,
        "graph": graph.describe(),
        "source": source_digest(source_path, directory, known_md5),
        "source_name": os.path.basename(os.fspath(source_path)),
    }


def load_model_weights(
    executor, source_path: str, build: Callable[[], None], directory: CacheDirectory = None,
    known_md5: Optional[str] = None, part: Optional[str] = None,
) -> str:
    """Loads the weights of ``source_path`` into ``executor`` through the cache (see
    :func:`load_through_cache`); ``build()`` is the ordinary load."""
    root = cache_directory(directory)
    if root is None:
        build()
        return "off"
    if getattr(executor, "device", "cpu") != "cpu":  # the GPU executor keeps its weights on the device
        build()
        return "not-cacheable"
    try:
        identity = model_identity(executor, source_path, root, known_md5, part)
    except OSError as error:  # the source cannot be hashed: the ordinary load says why
        log.info("packed-weights cache not used for %s: %s", source_path, error)
        build()
        return "built-uncached"
    return load_through_cache(ExecutorSections(executor), identity, build, root)
