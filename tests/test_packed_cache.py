"""The packed-weights cache file: format, checks and concurrent builders.

These tests use plain numpy arrays and a stand-in executor with the two methods the cache
needs (export_packed, import_packed); the model-level tests (VGG16 with a weights file loads
from the cache, bit for bit, sharing pages) are in test_packed_models.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
import zlib

import numpy as np
import pytest

from fastvgg import packed_cache as pc

IDENTITY = {"format": 1, "fastvgg": "0.1.0", "kernels": "avx2", "precision": "fast",
            "graph": [{"kind": "conv3x3", "in_channels": 3, "out_channels": 64}], "source": "sha256:" + "ab" * 32}


def sections(seed=0):
    rng = np.random.default_rng(seed)
    return [
        ("conv0.kernel", rng.standard_normal((3, 5, 7)).astype(np.float32)),      # small: 4 KiB aligned
        ("dense0.panels", rng.standard_normal((700, 1024)).astype(np.float32)),   # 2.7 MiB: 2 MiB aligned
        ("conv0.corrections", rng.integers(0, 255, 1000, dtype=np.uint8)),
        ("empty", np.zeros((0, 4), np.float32)),
    ]


class FakeExecutor:
    """Holds its packed arrays in a dict, as the C++ executors hold their buffers."""

    def __init__(self, packed=None):
        self.packed = dict(packed or {})
        self.imports = 0

    def export_packed(self):
        return list(self.packed.items())

    def import_packed(self, buffers):
        if set(buffers) != set(self.packed):
            raise ValueError(f"expected sections {sorted(self.packed)}, got {sorted(buffers)}")
        self.packed = dict(buffers)
        self.imports += 1


def test_round_trip_is_exact_aligned_and_read_only(tmp_path):
    path = str(tmp_path / "x.fvpack")
    pc.write_packed(path, IDENTITY, sections())
    arrays = pc.read_packed(path, IDENTITY)
    assert list(arrays) == [name for name, _ in sections()]
    for name, original in sections():
        assert arrays[name].dtype == original.dtype and arrays[name].shape == original.shape
        np.testing.assert_array_equal(arrays[name], original)
        assert not arrays[name].flags.writeable
    with open(path, "rb") as f:
        magic, version, length, crc, _ = struct.unpack("<8sIIII", f.read(24))
        header = json.loads(f.read(length))
    assert (magic, version) == (b"FVGGPACK", pc.FORMAT_VERSION)
    offsets = {s["name"]: s["offset"] for s in header["sections"]}
    assert offsets["dense0.panels"] % (2 << 20) == 0
    assert all(offset % 4096 == 0 for offset in offsets.values())
    assert header["identity"] == IDENTITY


def corrupt(path, how):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
    header_length = struct.unpack_from("<I", data, 12)[0]
    header = json.loads(bytes(data[24 : 24 + header_length]))
    panels = next(s for s in header["sections"] if s["name"] == "dense0.panels")
    if how == "truncated":
        data = data[: panels["offset"] + panels["nbytes"] - 1]
    elif how == "truncated-header":
        data = data[:100]
    elif how == "empty":
        data = b""
    elif how == "section-head":
        data[panels["offset"] + 10] ^= 0x01
    elif how == "section-tail":
        data[panels["offset"] + panels["nbytes"] - 3] ^= 0x40
    elif how == "header-byte":
        data[40] ^= 0x20
    elif how == "magic":
        data[:8] = b"NOTAPACK"
    elif how == "version":
        data[8:12] = struct.pack("<I", pc.FORMAT_VERSION + 1)
    elif how == "foreign":
        data = bytearray(b"\x89HDF\r\n\x1a\n" + os.urandom(5000))
    elif how == "overlap":
        # A consistent header (CRC fixed up) whose sections overlap: never mapped.
        header["sections"][1]["offset"] = header["sections"][0]["offset"]
        body = json.dumps(header).encode()
        data = bytearray(struct.pack("<8sIIII", b"FVGGPACK", pc.FORMAT_VERSION, len(body), zlib.crc32(body), 0)
                         + body + bytes(data[24 + len(body):]))
    elif how == "huge-header-length":
        data[12:16] = struct.pack("<I", 0xFFFFFFF0)
    with open(path, "wb") as f:
        f.write(data)


DAMAGE = ["truncated", "truncated-header", "empty", "section-head", "section-tail", "header-byte", "magic",
          "version", "foreign", "overlap", "huge-header-length"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_files_are_refused_with_a_reason(tmp_path, how):
    path = str(tmp_path / "x.fvpack")
    pc.write_packed(path, IDENTITY, sections())
    corrupt(path, how)
    with pytest.raises(pc.CacheMiss) as miss:
        pc.read_packed(path, IDENTITY)
    assert str(miss.value)


@pytest.mark.parametrize("field, value", [("fastvgg", "0.2.0"), ("kernels", "avx512"), ("precision", "highest"),
                                          ("source", "sha256:" + "cd" * 32), ("format", 2)])
def test_another_identity_is_a_miss(tmp_path, field, value):
    path = str(tmp_path / "x.fvpack")
    pc.write_packed(path, IDENTITY, sections())
    with pytest.raises(pc.CacheMiss, match="built for other"):
        pc.read_packed(path, {**IDENTITY, field: value})
    assert pc.cache_file_name(IDENTITY) != pc.cache_file_name({**IDENTITY, field: value})


@pytest.mark.parametrize("how", DAMAGE)
def test_load_through_cache_rebuilds_a_damaged_file(tmp_path, how):
    built = []
    original = dict(sections())

    def build():
        built.append(1)
        executor.packed = {k: v.copy() for k, v in original.items()}

    executor = FakeExecutor(original)
    assert pc.load_through_cache(executor, IDENTITY, build, tmp_path) == "built"
    path = str(tmp_path / pc.cache_file_name(IDENTITY))
    corrupt(path, how)
    executor = FakeExecutor(original)
    assert pc.load_through_cache(executor, IDENTITY, build, tmp_path) == "built"
    assert len(built) == 2
    executor = FakeExecutor(original)
    assert pc.load_through_cache(executor, IDENTITY, build, tmp_path) == "hit"
    assert len(built) == 2
    for name, array in original.items():
        np.testing.assert_array_equal(executor.packed[name], array)
        assert not executor.packed[name].flags.writeable  # the mapped file, not a private copy


def test_directory_from_keyword_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVGG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(pc.ENV, raising=False)
    assert pc.cache_directory() == str(tmp_path / "home" / "packed")
    monkeypatch.setenv(pc.ENV, str(tmp_path / "elsewhere"))
    assert pc.cache_directory() == str(tmp_path / "elsewhere")
    assert pc.cache_directory(tmp_path / "kw") == str(tmp_path / "kw")
    for word in ("off", "0", "False", "none"):
        monkeypatch.setenv(pc.ENV, word)
        assert pc.cache_directory() is None
        assert pc.cache_directory(True) == str(tmp_path / "home" / "packed")
    assert pc.cache_directory(False) is None
    with pytest.raises(TypeError, match="packed_cache"):
        pc.cache_directory(3)

    executor, built = FakeExecutor(dict(sections())), []
    monkeypatch.setenv(pc.ENV, "off")
    assert pc.load_through_cache(executor, IDENTITY, lambda: built.append(1)) == "off"
    assert built == [1] and not (tmp_path / "home").exists()


def test_unwritable_directory_still_loads(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    executor, built = FakeExecutor(dict(sections())), []
    assert pc.load_through_cache(executor, IDENTITY, lambda: built.append(1), blocker / "cache") == "built-uncached"
    assert built == [1]


def test_an_executor_that_refuses_the_sections_gets_them_rebuilt(tmp_path):
    pc.write_packed(str(tmp_path / pc.cache_file_name(IDENTITY)), IDENTITY, sections()[:2])
    executor, built = FakeExecutor(dict(sections())), []
    assert pc.load_through_cache(executor, IDENTITY, lambda: built.append(1), tmp_path) == "built"
    assert built == [1] and executor.imports == 1


def test_source_digest_follows_content_not_timestamps(tmp_path):
    source = tmp_path / "w.h5"
    source.write_bytes(b"a" * 100000)
    memo_dir = str(tmp_path / "cache")
    first = pc.source_digest(str(source), memo_dir)
    assert first == "sha256:" + __import__("hashlib").sha256(b"a" * 100000).hexdigest()
    stat = os.stat(source)
    with open(source, "r+b") as f:  # same size, same mtime afterwards: other content
        f.seek(5000)
        f.write(b"b")
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert pc.source_digest(str(source), memo_dir) != first
    assert pc.source_digest(str(source), memo_dir, known_md5="0123") == "md5:0123"


def _build_in_process(directory, seed, results):
    original = dict(sections(seed))
    executor = FakeExecutor(original)

    def build():
        executor.packed = {k: v.copy() for k, v in original.items()}

    status = pc.load_through_cache(executor, IDENTITY, build, directory)
    same = all(np.array_equal(executor.packed[k], v) for k, v in original.items())
    results.put((status, same))


def test_several_processes_building_at_once_give_one_valid_file(tmp_path):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_build_in_process, args=(str(tmp_path), 0, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    outcomes = [results.get(timeout=10) for _ in workers]
    assert all(same for _, same in outcomes)
    assert sorted(status for status, _ in outcomes).count("built") >= 1
    assert all(status in ("built", "hit") for status, _ in outcomes)
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert leftovers == []
    arrays = pc.read_packed(str(tmp_path / pc.cache_file_name(IDENTITY)), IDENTITY)
    for name, array in sections(0):
        np.testing.assert_array_equal(arrays[name], array)


def test_clear_removes_only_the_cache_s_files(tmp_path):
    executor = FakeExecutor(dict(sections()))
    assert pc.load_through_cache(executor, IDENTITY, lambda: None, tmp_path) == "built"
    source = tmp_path / "w.h5"
    source.write_bytes(b"weights")
    pc.source_digest(str(source), str(tmp_path))
    (tmp_path / "keep.txt").write_text("not the cache's")
    size = os.path.getsize(tmp_path / pc.cache_file_name(IDENTITY))
    assert pc.clear(tmp_path) == size
    assert sorted(os.listdir(tmp_path)) == ["keep.txt", "sources", "w.h5"]
    assert os.listdir(tmp_path / "sources") == []
    np.testing.assert_array_equal(executor.packed["dense0.panels"], sections()[1][1])  # still mapped
    assert pc.clear(tmp_path / "missing") == 0
