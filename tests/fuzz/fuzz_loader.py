"""Coverage-guided fuzzing (atheris) of fastvgg's weights loader: every input must load or end
in a ValueError / OSError; any other exception, a crash or a hang is a finding.

    python tests/fuzz/fuzz_loader.py TARGET CORPUS_DIR [libFuzzer options, e.g. -max_total_time=60]

Targets:
  archive    .keras bytes: zip directory and headers, config.json, then the model config
             mapping Keras 3 auto-names onto a fixed weights structure (all in-process)
  structure  the JSON a structure-reader child sends back, fuzzed as if the child were
             subverted: the parent's tree building and layer matching (in-process)
  loader     whole weight files through the production path: structure read in an isolated
             child process, layers matched and checked (a few executions a second)
  hdf5       whole weight files with libhdf5 in this process (the path only trusted files take):
             for long runs that look for libhdf5 crashes and hangs, which the isolation contains

Inputs that are HDF5 or zip files are mutated by a structured mutator half of the time
(fields of zip records; bytes of HDF5 metadata with object header checksums recomputed, so
mutations get past libhdf5's checksum checks), and by libFuzzer's own mutations otherwise.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy  # noqa: F401,E402  (imported first, so that only the modules under test are instrumented)

with atheris.instrument_imports(include=["fastvgg", "zipfile"]):
    import importlib
    import zipfile

    importlib.reload(zipfile)  # already imported by Python's start-up: load it again, instrumented
    import fastvgg._hdf5_reader as reader
    import fastvgg.weights as weights

import hdf5_bytes  # noqa: E402
import fastvgg  # noqa: E402

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MODEL = fastvgg.VGG16(None, include_top=False, input_shape=(32, 32, 3), seed=0)
SCRATCH = tempfile.mkdtemp(prefix="fastvgg-fuzz-")
TARGETS = ("archive", "structure", "loader", "hdf5")
# The target is the first argument; it is also passed on in the environment, because
# libFuzzer's -fork mode starts this script again with the libFuzzer options only.
if len(sys.argv) > 1 and sys.argv[1] in TARGETS:
    os.environ["FASTVGG_FUZZ_TARGET"] = sys.argv.pop(1)
TARGET = os.environ.get("FASTVGG_FUZZ_TARGET", "archive")
# The archive target maps its config onto this structure: an early Keras 3 file (no names),
# whose layer names then come from config.json alone.
_FIXED_ROOT = None


def _fixed_root():
    global _FIXED_ROOT
    if _FIXED_ROOT is None:
        import build_corpus

        seeds = os.path.join(SCRATCH, "fixed")
        build_corpus.build(seeds)
        _FIXED_ROOT = reader.read_structure(reader.HDF5Source(os.path.join(seeds, "keras3_unnamed.weights.h5")),
                                            isolated=False)
    return _FIXED_ROOT


def _write(data: bytes, suffix: str) -> str:
    path = os.path.join(SCRATCH, "input" + suffix)
    with open(path, "wb") as out:
        out.write(data)
    return path


def _check_file(path: str, trusted: bool) -> None:
    def work():
        with weights._checked_file(MODEL, path, trusted):
            pass
    weights._with_clear_errors(path, work)


def _archive(data: bytes) -> None:
    path = _write(data, ".keras")

    def work():
        source, config = weights._archive_member(path)
        weights._looks_like_hdf5(source)
        layers = weights._child(_fixed_root(), "layers", path)
        stored = weights._keras3_layers(layers, weights._config_of(config).get("layers"), MODEL, path)
        weights._checked_plan(MODEL, stored, path)
    weights._with_clear_errors(path, work)


def _structure(data: bytes) -> None:
    try:
        description = json.loads(data)
    except (ValueError, RecursionError):
        return  # not JSON at all: the child never sends that (and json is not under test)
    path = "fuzzed-structure.h5"

    def work():
        root = reader._build_tree(description, reader.HDF5Source(path))
        weights._checked_plan(MODEL, weights._stored_layers(root, None, MODEL, path), path)
    weights._with_clear_errors(path, work)


def test_one_input(data: bytes) -> None:
    try:
        if TARGET == "archive":
            _archive(data)
        elif TARGET == "structure":
            _structure(data)
        else:
            _check_file(_write(data, ".h5"), trusted=TARGET == "hdf5")
    except (ValueError, OSError) as error:
        if not str(error):
            raise AssertionError("an error without a message") from error


# Structured mutations ------------------------------------------------------------------------
_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]


def _mutate_hdf5(data: bytearray, rng: random.Random) -> bytearray:
    """Overwrites 1-4 metadata bytes near a structure signature, then fixes checksums."""
    signatures = [b"OHDR", b"GCOL", b"TREE", b"HEAP", b"SNOD", b"BTHD", b"BTLF", b"FRHP", b"\x89HDF"]
    positions = []
    for signature in signatures:
        found = data.find(signature)
        while found != -1 and len(positions) < 400:
            positions.append(found)
            found = data.find(signature, found + 1)
    for _ in range(rng.randint(1, 4)):
        base = rng.choice(positions) if positions else 0
        position = min(len(data) - 1, base + rng.randrange(0, 256))
        choice = rng.random()
        if choice < 0.4:
            data[position] ^= 1 << rng.randrange(8)
        elif choice < 0.7:
            data[position] = rng.choice([0, 0xFF, 0x7F, 0x80, data[position] + 1 & 0xFF])
        else:
            width = rng.choice([2, 4, 8])
            value = rng.choice(_INTERESTING) & ((1 << (8 * width)) - 1)
            data[position : position + width] = value.to_bytes(width, "little")[: max(0, len(data) - position)]
    return hdf5_bytes.fix_checksums(data) if rng.random() < 0.8 else data


# (record signature, [(field offset, width)]) of the zip records Keras archives have.
_ZIP_FIELDS = {
    b"PK\x03\x04": [(4, 2), (6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
    b"PK\x01\x02": [(6, 2), (8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (42, 4)],
    b"PK\x05\x06": [(8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
}


def _mutate_zip(data: bytearray, rng: random.Random) -> bytearray:
    records = [(found, signature) for signature in _ZIP_FIELDS for found in _find_all(data, signature)]
    if not records:
        return data
    for _ in range(rng.randint(1, 2)):
        start, signature = rng.choice(records)
        offset, width = rng.choice(_ZIP_FIELDS[signature])
        if start + offset + width > len(data):
            continue
        old = int.from_bytes(data[start + offset : start + offset + width], "little")
        value = rng.choice([old + 1, old - 1, old ^ 1, old | 0x800, 99, 12, 14] + _INTERESTING) % (1 << (8 * width))
        data[start + offset : start + offset + width] = value.to_bytes(width, "little")
    return data


def _find_all(data: bytearray, signature: bytes):
    found = data.find(signature)
    while found != -1:
        yield found
        found = data.find(signature, found + 1)


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if rng.random() < 0.5:
        if data.startswith(HDF5_SIGNATURE):
            return bytes(_mutate_hdf5(bytearray(data), rng))[:max_size]
        if data.startswith(b"PK"):
            mutated = _mutate_zip(bytearray(data), rng)
            if rng.random() < 0.3:  # and sometimes the HDF5 member inside
                member = mutated.find(HDF5_SIGNATURE)
                if member != -1:
                    mutated[member:] = _mutate_hdf5(mutated[member:], rng)
            return bytes(mutated)[:max_size]
    return atheris.Mutate(data, max_size)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()
