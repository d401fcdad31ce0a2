"""Regression tests for files from strangers (issue 10): each is a valid file the test writes,
with a few bytes patched as an attacker or a bad disk would, and each must end in a
ValueError that names the file and says what is wrong, with the model left as it was.

* libhdf5 runs only in a child process (fastvgg/_hdf5_reader.py): its crashes, hangs and
  allocations cannot reach the loading process;
* only IEEE binary16/32/64 floats load (HDF5 would silently convert other formats);
* zipfile, json and Unicode failures are wrapped, never leaked.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import zipfile

import h5py
import numpy as np
import pytest

import fastvgg
import hdf5_bytes as hb
import keras_h5
import numpy_vgg as nv
import weight_files as wf
from fastvgg import _hdf5_reader as reader

@pytest.fixture(scope="module")
def weights16():
    return nv.random_weights(16, False, seed=31, bias_scale=0.05)


@pytest.fixture(scope="module")
def keras3_file(tmp_path_factory, weights16):
    path = tmp_path_factory.mktemp("isolation") / "vgg16.weights.h5"
    wf.write_keras3_weights(path, weights16, 16, False)
    return path


@pytest.fixture(scope="module")
def model():
    return fastvgg.VGG16(None, include_top=False, input_shape=(32, 32, 3), seed=4)


def patched(source, target, patches, checksums: bool = False) -> None:
    """``target`` = ``source`` with ``{offset: bytes}`` written over it; ``checksums``
    recomputes the object header checksums afterwards, as a deliberate attacker would."""
    data = bytearray(source.read_bytes())
    for offset, new in patches.items():
        data[offset : offset + len(new)] = new
    target.write_bytes(bytes(hb.fix_checksums(data) if checksums else data))


def object_header(path, name) -> int:
    with h5py.File(path) as f:
        return h5py.h5o.get_info(f[name].id).addr


def refused_unchanged(model, path, match) -> ValueError:
    """Loading raises a ValueError matching ``match`` that names the file; the model keeps
    every weight it had."""
    before = model.get_weights()
    with pytest.raises(ValueError, match=match) as caught:
        model.load_weights(path)
    assert os.fspath(path) in str(caught.value)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    return caught.value


# Exact float formats ------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["bias", "mantissa", "both"])
def test_changed_float_format_is_refused(tmp_path, keras3_file, weights16, model, change):
    """The campaign's silent attack: the float datatype message of a bias says exponent bias 95
    (and/or a 21-bit mantissa). h5py converts the same bytes as that other format without a
    word; fastvgg must refuse, naming the layer and what differs."""
    header = object_header(keras3_file, "layers/conv2d_2/vars/1")  # block2_conv1's bias
    data = keras3_file.read_bytes()
    message = data.index(hb.FLOAT32_MESSAGE, header)
    assert message - header < 200, "the datatype message belongs to another object"
    patches = {}
    if change in ("bias", "both"):
        patches[message + hb.EXPONENT_BIAS_BYTE] = bytes([95])
    if change in ("mantissa", "both"):
        patches[message + hb.MANTISSA_SIZE_BYTE] = bytes([21])
    target = tmp_path / "odd_float.weights.h5"
    patched(keras3_file, target, patches)
    # The premise: plain h5py reads the patched dataset without any error, and wrongly.
    with h5py.File(target) as f:
        converted = f["layers/conv2d_2/vars/1"][()]
    assert not np.array_equal(converted, weights16["block2_conv1"][1])
    expected = {"bias": r"exponent bias 95 \(IEEE: 127\)", "mantissa": r"fields \(31, 23, 8, 0, 21\)",
                "both": r"fields \(31, 23, 8, 0, 21\).*exponent bias 95"}[change]
    refused_unchanged(model, target, rf"'block2_conv1': bias /layers/conv2d_2/vars/1 .*not IEEE 754: .*{expected}")


def test_extended_precision_float_is_refused(tmp_path, weights16, model):
    """numpy's longdouble (x87 80-bit in 16 bytes here): h5py said only "Insufficient precision
    in available types"; fastvgg names the layer and the format."""
    if np.finfo(np.longdouble).nmant == np.finfo(np.float64).nmant:
        pytest.skip("longdouble is float64 on this platform")
    path = tmp_path / "long.weights.h5"
    wf.write_keras3_weights(path, weights16, 16, False)
    with h5py.File(path, "r+") as f:
        del f["layers/conv2d_3/vars/1"]
        f["layers/conv2d_3/vars"].create_dataset("1", data=weights16["block2_conv2"][1].astype(np.longdouble))
    refused_unchanged(model, path, r"'block2_conv2': bias /layers/conv2d_3/vars/1 .*a 128-bit float, not IEEE binary16, "
                      r"binary32 or binary64")


def test_big_endian_ieee_floats_load(tmp_path, weights16):
    """IEEE floats in the other byte order are exact formats, and load bit for bit."""
    path = tmp_path / "big_endian.weights.h5"
    wf.write_keras3_weights(path, weights16, 16, False)
    kernel = weights16["block3_conv3"][0]
    with h5py.File(path, "r+") as f:
        del f["layers/conv2d_6/vars/0"]
        f["layers/conv2d_6/vars"].create_dataset("0", data=kernel.astype(">f4"))
    model = fastvgg.VGG16(path, include_top=False, input_shape=(32, 32, 3))
    np.testing.assert_array_equal(model.get_layer("block3_conv3").get_weights()[0], kernel)


# Declared sizes ------------------------------------------------------------------------------------
def test_contiguous_data_said_to_lie_past_the_end(tmp_path, keras3_file, model):
    """A dataset's layout message moved to point beyond the file: refused when the structure
    is read, before any byte is read from that offset."""
    with h5py.File(keras3_file) as f:
        dataset = f["layers/conv2d_4/vars/0"]
        offset, size = dataset.id.get_offset(), dataset.id.get_storage_size()
    data = keras3_file.read_bytes()
    layout = data.index(struct.pack("<QQ", offset, size))
    target = tmp_path / "far.weights.h5"
    patched(keras3_file, target, {layout: struct.pack("<Q", len(data) - 1000)})
    # libhdf5 notices this one itself; fastvgg checks offset + size against the file again.
    refused_unchanged(model, target, r"could not read /layers/conv2d_4/vars/0 .*invalid dataset size")


def test_attribute_declaring_a_huge_shape(tmp_path, weights16, model):
    """layer_names of a classic file with its dataspace patched to 2**40 names (and the header
    checksum recomputed): refused, nothing allocated."""
    path = tmp_path / "classic.h5"
    keras_h5.write_classic_h5(path, weights16, nv.layer_names(16, False))
    with h5py.File(path) as f:
        count = len(f.attrs["layer_names"])
    data = path.read_bytes()
    name = data.index(b"layer_names\x00")
    # Dataspace message version 1, rank 1, maximum size present: (count,), max (count,).
    dataspace = data.index(struct.pack("<BBB5xQQ", 1, 1, 1, count, count), name)
    target = tmp_path / "huge_attribute.h5"
    patched(path, target, {dataspace + 8: struct.pack("<QQ", 1 << 40, 1 << 40)}, checksums=True)
    # libhdf5 notices that the message is too short for 2**40 names before the reader's own
    # declared-size check (which guards the attributes whose data lies elsewhere) is reached.
    refused_unchanged(model, target, r"could not read attribute 0 of the root group .*ran off end of input buffer")


def test_vlen_string_declaring_gigabytes(tmp_path, weights16, model):
    """Found by tests/fuzz (in-process libhdf5 ran out of memory): a variable-length string's
    heap ID in a layer's weight_names says the name is ~4 GiB long; libhdf5 allocates that
    before finding the heap too short. The reader's memory limit stops it; this process
    does not grow."""
    path = tmp_path / "classic.h5"
    keras_h5.write_classic_h5(path, weights16, nv.layer_names(16, False))
    data = path.read_bytes()
    name = b"block3_conv1/kernel:0"  # every conv kernel name has these 21 characters
    # A vlen heap ID: string length (4), global heap collection address (8), object index (4).
    heap_id = data.index(struct.pack("<IQ", len(name), hb.global_heap(data)))
    target = tmp_path / "gigabyte_name.h5"
    patched(path, target, {heap_id: struct.pack("<I", 0xFFFF0000 + len(name))}, checksums=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused_unchanged(model, target, r"reading its structure needed more than 768 MiB of memory")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KiB


def test_child_memory_is_bounded(tmp_path, monkeypatch):
    """A structure that needs more memory than the limit stops the child, not this process:
    with a 4 MiB allowance a 12 MiB attribute cannot be read, and the message says so."""
    path = tmp_path / "big_attribute.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = "x" * (12 << 20)
    monkeypatch.setattr(reader, "METADATA_MEMORY_BYTES", 4 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"reading its structure needed more than 4 MiB of memory"):
        reader.read_structure(reader.HDF5Source(str(path)))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 8 << 10  # KiB: this process grew < 8 MiB


# The child process -------------------------------------------------------------------------------
def test_global_heap_hang_in_layer_names(tmp_path, weights16, model, monkeypatch):
    """Found by the campaign and again by tests/fuzz: tf_keras keeps layer_names as vlen
    strings; with the global heap's free-space object shrunk (one byte), libhdf5 spins
    forever in H5HG__cache_heap_deserialize. The reader is stopped at its time limit."""
    path = tmp_path / "classic.h5"
    keras_h5.write_classic_h5(path, weights16, nv.layer_names(16, False))
    data = path.read_bytes()
    free = hb.free_space_object(data, hb.global_heap(data))
    assert data[free + 9] != 0
    target = tmp_path / "hang.h5"
    patched(path, target, {free + 9: b"\x00"})
    monkeypatch.setattr(reader, "METADATA_SECONDS", 3.0)
    refused_unchanged(model, target, r"still reading its structure after 3 s and was stopped")


def test_global_heap_hang_in_name_attributes(tmp_path, keras3_file, model, monkeypatch):
    """The same hang from a Keras 3 file: the collection's size field (one byte) says 65 KB."""
    data = keras3_file.read_bytes()
    collection = hb.global_heap(data)
    target = tmp_path / "hang.weights.h5"
    patched(keras3_file, target, {collection + 9: b"\xff"})
    monkeypatch.setattr(reader, "METADATA_SECONDS", 3.0)
    refused_unchanged(model, target, r"still reading its structure after 3 s and was stopped")


def test_time_limit_stops_the_reader(keras3_file, monkeypatch):
    """A reader still at work at the time limit is killed and reported as such (the campaign's
    global-heap hangs; here a limit shorter than any start-up forces the same path)."""
    monkeypatch.setattr(reader, "METADATA_SECONDS", 0.05)
    with pytest.raises(reader.HDF5ReadError, match=r"still reading its structure after 0 s and was stopped"):
        reader.read_structure(reader.HDF5Source(str(keras3_file)))


def test_a_crashed_reader_is_reported_as_such():
    """No file here crashes libhdf5 on demand (the campaign's segfault was not reproduced), so
    the exit status of a reader killed by SIGSEGV is explained directly."""
    import signal

    message = reader._explain_failure(reader.HDF5Source("x.h5"), -signal.SIGSEGV, b"", False, 30, 1 << 20,
                                      "reading its structure")
    assert "'x.h5': libhdf5 crashed (SIGSEGV) while reading its structure" in message
    assert "nothing here was affected" in message


def test_data_offsets_are_checked_again_when_read(tmp_path):
    """A file cut short after its structure was read: the in-place read refuses the offsets
    rather than returning a short array."""
    path = tmp_path / "cut.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.ones((1000, 10), np.float32))
    source = reader.HDF5Source(str(path))
    dataset = reader.read_structure(source).find("x")
    with open(path, "r+b") as raw:
        raw.truncate(dataset.offset + 100)
    with pytest.raises(reader.HDF5ReadError, match=r"/x claims bytes \d+\.\.\d+ beyond the end of the file"):
        reader.read_rows(source, dataset, 0, 1000)


def test_structure_and_arrays_from_the_reader(tmp_path):
    """The reusable API: structure, attribute values, links not followed, and data of every
    layout read back exactly, in place (contiguous) or through a child (chunked, compact)."""
    path = tmp_path / "mixed.h5"
    contiguous = np.arange(24, dtype="<f4").reshape(4, 6)
    chunked = np.linspace(-1, 1, 300).astype(">f8")
    compact = np.array([1.5, -2.0], dtype="<f2")
    with h5py.File(path, "w") as f:
        f.attrs["text"] = "héllo"
        f.attrs["names"] = np.array([b"a", b"bc"])
        f.attrs["number"] = np.int32(7)
        group = f.create_group("g")
        group.create_dataset("contiguous", data=contiguous)
        group.create_dataset("chunked", data=chunked, chunks=(64,), compression="gzip", shuffle=True)
        space = h5py.h5s.create_simple((2,))
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_layout(h5py.h5d.COMPACT)
        h5py.h5d.create(group.id, b"compact", h5py.h5t.IEEE_F16LE, space, dcpl=plist).write(
            h5py.h5s.ALL, h5py.h5s.ALL, compact)
        group["soft"] = h5py.SoftLink("/g/contiguous")
        group["integers"] = np.arange(3, dtype="<i2")
    source = reader.HDF5Source(str(path))
    root = reader.read_structure(source)
    assert root.attrs["text"] == "héllo" and root.attrs["names"].tolist() == ["a", "bc"]
    assert int(root.attrs["number"]) == 7
    assert list(root.find("g").children) == ["chunked", "compact", "contiguous", "integers", "soft"]
    soft = root.find("g/soft")
    assert isinstance(soft, reader.Link) and soft.kind == "SoftLink" and soft.target == "/g/contiguous"
    datasets = [root.find(f"g/{n}") for n in ("contiguous", "chunked", "compact", "integers")]
    assert [d.layout for d in datasets] == ["contiguous", "chunked", "compact", "contiguous"]
    assert datasets[0].readable_in_place and not datasets[1].readable_in_place
    arrays = reader.read_arrays(source, datasets)
    for array, expected in zip(arrays, (contiguous, chunked, compact, np.arange(3, dtype="<i2"))):
        assert array.dtype == expected.dtype
        np.testing.assert_array_equal(array, expected)
    np.testing.assert_array_equal(reader.read_rows(source, datasets[0], 1, 3), contiguous[1:3])
    with pytest.raises(reader.HDF5ReadError, match=r"declare 4800 bytes, more than the 1000 allowed"):
        reader.read_arrays(source, [datasets[1], datasets[1]], max_bytes=1000)
    trusted = reader.read_structure(source, isolated=False)
    assert trusted.find("g/chunked").shape == (300,)


# Names that are not text -----------------------------------------------------------------------------
def test_undecodable_link_name(tmp_path, keras3_file, model):
    data = keras3_file.read_bytes()
    name = data.index(b"conv2d_7\x00")
    target = tmp_path / "bad_name.weights.h5"
    patched(keras3_file, target, {name + 6: b"\xff"})
    refused_unchanged(model, target, r"a name in /layers .*conv2d\\xff7.* is not UTF-8 text")


def test_undecodable_layer_name_attribute(tmp_path, keras3_file, model):
    data = keras3_file.read_bytes()
    name = data.index(b"block4_conv1")
    target = tmp_path / "bad_attribute.weights.h5"
    patched(keras3_file, target, {name: b"\xfe"})
    refused_unchanged(model, target, r"'name' attribute of /layers/conv2d_7/vars holds b'\\xfelock4_conv1'.*not UTF-8")


# .keras archives ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def archive(tmp_path_factory, weights16):
    path = tmp_path_factory.mktemp("archives") / "vgg16.keras"
    wf.write_keras_archive(path, wf.keras3_weights_bytes(weights16, 16, False), wf.keras3_config(16, False))
    return path


def central_entry(data: bytes, member: str) -> int:
    """Offset of ``member``'s central directory header."""
    return data.rindex(b"PK\x01\x02", 0, data.rindex(member.encode()))


def local_entry(data: bytes, member: str) -> int:
    return data.rindex(b"PK\x03\x04", 0, data.index(member.encode()) + 1)


def test_encrypted_weights_member(tmp_path, archive, model):
    data = archive.read_bytes()
    entry = central_entry(data, "model.weights.h5")
    target = tmp_path / "encrypted.keras"
    patched(archive, target, {entry + 8: bytes([data[entry + 8] | 1])})
    refused_unchanged(model, target, r"model.weights.h5 is encrypted")


def test_unsupported_zip_version(tmp_path, archive, model):
    """'Version needed to extract' 9.9 makes zipfile raise NotImplementedError."""
    data = archive.read_bytes()
    target = tmp_path / "future.keras"
    patched(archive, target, {central_entry(data, "config.json") + 6: struct.pack("<H", 99)})
    refused_unchanged(model, target, r"zip directory is damaged or uses features Keras never writes \(NotImplementedError")


def test_zip_directory_offset_past_its_real_place(tmp_path, archive, model):
    """The end record's directory offset moved forward: zipfile computes negative member
    offsets from it ([Errno 22] Invalid argument when seeking)."""
    data = archive.read_bytes()
    end = data.rindex(b"PK\x05\x06")
    (offset,) = struct.unpack_from("<I", data, end + 16)
    target = tmp_path / "shifted.keras"
    patched(archive, target, {end + 16: struct.pack("<I", offset + 4096)})
    refused_unchanged(model, target, r"zip|archive")


def test_undecodable_member_name(tmp_path, archive, model):
    """A member name flagged UTF-8 that is not: zipfile raises UnicodeDecodeError."""
    data = archive.read_bytes()
    entry = central_entry(data, "metadata.json")
    flags = struct.unpack_from("<H", data, entry + 8)[0] | 0x800
    target = tmp_path / "bad_member_name.keras"
    patched(archive, target, {entry + 8: struct.pack("<H", flags), entry + 46: b"\xff"})
    refused_unchanged(model, target, r"zip directory is damaged .*UnicodeDecodeError")


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA, zipfile.ZIP_STORED])
def test_corrupt_config_member(tmp_path, weights16, model, compression):
    """config.json whose bytes no longer decompress (zlib.error, LZMAError) or whose CRC fails."""
    path = tmp_path / "config.keras"
    with zipfile.ZipFile(path, "w") as out:
        out.writestr("metadata.json", "{}")
        out.writestr("config.json", json.dumps(wf.keras3_config(16, False)), compress_type=compression)
        out.writestr("model.weights.h5", wf.keras3_weights_bytes(weights16, 16, False))
    data = path.read_bytes()
    start = local_entry(data, "config.json") + 30 + len("config.json")
    target = tmp_path / "broken_config.keras"
    patched(path, target, {start + 20: b"\xff\x00\xff\x00\xff"})
    refused_unchanged(model, target, r"config.json in the archive cannot be extracted")


def test_deeply_nested_config(tmp_path, weights16, model):
    path = tmp_path / "deep.keras"
    with zipfile.ZipFile(path, "w") as out:
        out.writestr("config.json", "[" * 200_000 + "]" * 200_000)
        out.writestr("model.weights.h5", wf.keras3_weights_bytes(weights16, 16, False))
    refused_unchanged(model, path, r"config.json in the archive nests deeper")


@pytest.mark.parametrize("config", [
    {"config": [1, 2]},
    {"config": {"layers": "not a list"}},
    {"config": {"layers": [7, None, {"class_name": "Conv2D", "config": 5}, {"class_name": ["x"], "config": {"name": 3}}]}},
])
def test_config_of_the_wrong_shape_is_only_data(tmp_path, weights16, config):
    """A config whose parts are not the dicts and lists Keras writes (AttributeError before):
    an early Keras 3 file then maps by order, and loads bit for bit."""
    path = tmp_path / "odd_config.keras"
    data = wf.keras3_weights_bytes(weights16, 16, False, name_attributes=False)
    wf.write_keras_archive(path, data, config)
    model = fastvgg.VGG16(path, include_top=False, input_shape=(32, 32, 3))
    np.testing.assert_array_equal(model.get_layer("block5_conv1").get_weights()[0], weights16["block5_conv1"][0])


def test_unexpected_errors_are_wrapped(tmp_path, keras3_file, model, monkeypatch):
    """Whatever slips past every check (here: a bug injected into the layout walker) still
    reaches the caller as a ValueError naming the file, with the cause chained."""
    import fastvgg.weights as weights

    def broken(*_):
        raise KeyError("injected")

    monkeypatch.setattr(weights, "_stored_layers", broken)
    error = refused_unchanged(model, keras3_file, r"could not be loaded: KeyError: 'injected'")
    assert isinstance(error.__cause__, KeyError)
