"""Broken and hostile weight files: each gives a clear Python exception that says what is
wrong, never a crash, a hang, a huge allocation, a followed link or a file written outside.

The classic-layout cases (truncated files, text named .h5, missing groups, other depths,
wrong shapes and dtypes) are in test_errors.py; these are the same attacks on Keras 3
``.weights.h5`` files and ``.keras`` archives, plus the ones only those formats allow.
"""

from __future__ import annotations

import zipfile

import h5py
import numpy as np
import pytest

import fastvgg
import numpy_vgg as nv
import weight_files as wf

BIAS_SCALE = 0.05


@pytest.fixture(scope="module")
def base16():
    return nv.random_weights(16, False, seed=22, bias_scale=BIAS_SCALE)


@pytest.fixture(scope="module")
def keras3_file(tmp_path_factory, base16):
    """A valid VGG16 (no top) .weights.h5 with layer names; tests copy and then break it."""
    path = tmp_path_factory.mktemp("valid") / "vgg16.weights.h5"
    wf.write_keras3_weights(path, base16, 16, False)
    return path


@pytest.fixture
def copy_of(tmp_path, keras3_file):
    path = tmp_path / "broken.weights.h5"
    path.write_bytes(keras3_file.read_bytes())
    return path


# Keras 3 files and .keras archives made hostile ---------------------------------------------------
def test_archive_with_a_compressed_member(tmp_path, base16):
    path = tmp_path / "bomb.keras"
    wf.write_keras_archive(path, wf.keras3_weights_bytes(base16, 16, False), wf.keras3_config(16, False),
                           compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(ValueError, match="is compressed, which Keras never does"):
        fastvgg.VGG16(path, include_top=False)


def test_archive_with_path_traversal(tmp_path, base16):
    path = tmp_path / "evil.keras"
    wf.write_keras_archive(path, wf.keras3_weights_bytes(base16, 16, False), wf.keras3_config(16, False),
                           extra_members=[("../../outside.txt", b"x")])
    with pytest.raises(ValueError, match="unsafe paths.*outside.txt"):
        fastvgg.VGG16(path, include_top=False)
    assert not (tmp_path.parent / "outside.txt").exists()


def test_archive_without_weights(tmp_path):
    path = tmp_path / "empty.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{}")
    with pytest.raises(ValueError, match="without 'model.weights.h5'.*config.json"):
        fastvgg.VGG16(path, include_top=False)


def test_truncated_archive(tmp_path, base16):
    path = tmp_path / "cut.keras"
    wf.write_keras_archive(path, wf.keras3_weights_bytes(base16, 16, False), wf.keras3_config(16, False))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        fastvgg.VGG16(path, include_top=False)


def test_external_link_is_not_followed(tmp_path, base16):
    path = tmp_path / "linked.weights.h5"
    wf.write_keras3_weights(path, base16, 16, False)
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other.create_dataset("kernel", data=np.zeros((3, 3, 3, 64), np.float32))
    with h5py.File(path, "r+") as f:
        del f["layers/conv2d/vars/0"]
        f["layers/conv2d/vars/0"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/kernel")
    with pytest.raises(ValueError, match="ExternalLink.*does not follow links"):
        fastvgg.VGG16(path, include_top=False)


def test_absurd_declared_shape_is_refused_before_reading(tmp_path, base16):
    path = tmp_path / "huge.weights.h5"
    wf.write_keras3_weights(path, base16, 16, False)
    with h5py.File(path, "r+") as f:
        del f["layers/conv2d_3/vars/0"]
        # 4 PB declared, nothing written: reading it would try to allocate all of it.
        f["layers/conv2d_3/vars"].create_dataset("0", shape=(1 << 20, 1 << 20, 1 << 10), dtype="f4", chunks=(1, 1, 1024))
    with pytest.raises(ValueError, match=r"block2_conv2.*shape \(1048576, 1048576, 1024\)"):
        fastvgg.VGG16(path, include_top=False)


@pytest.mark.parametrize("dtype, ok", [("float16", True), ("float64", True), ("int32", False), ("S8", False)])
def test_weight_dtypes(tmp_path, base16, dtype, ok):
    path = tmp_path / "typed.weights.h5"
    wf.write_keras3_weights(path, base16, 16, False)
    kernel = base16["block1_conv2"][0]
    with h5py.File(path, "r+") as f:
        del f["layers/conv2d_1/vars/0"]
        data = kernel.astype(dtype) if dtype != "S8" else np.full(kernel.shape, b"w", dtype="S8")
        f["layers/conv2d_1/vars"].create_dataset("0", data=data)
    if ok:
        model = fastvgg.VGG16(path, include_top=False)
        np.testing.assert_array_equal(model.get_layer("block1_conv2").get_weights()[0], kernel.astype(dtype).astype(np.float32))
    else:
        with pytest.raises(ValueError, match=f"block1_conv2.*dtype.*must be floating point"):
            fastvgg.VGG16(path, include_top=False)


def test_nan_weights_warn(tmp_path, base16):
    path = tmp_path / "nan.weights.h5"
    bad = dict(base16)
    kernel = base16["block3_conv1"][0].copy()
    kernel[1, 1, 0, 0] = np.nan
    bad["block3_conv1"] = (kernel, base16["block3_conv1"][1])
    wf.write_keras3_weights(path, bad, 16, False)
    with pytest.warns(RuntimeWarning, match="'block3_conv1'.*NaN or infinite"):
        fastvgg.VGG16(path, include_top=False)


def test_duplicate_layer_names_are_refused(tmp_path, base16):
    path = tmp_path / "twice.weights.h5"
    wf.write_keras3_weights(path, base16, 16, False, head={"block1_conv1": base16["block1_conv1"]})
    with pytest.raises(ValueError, match="weights for layer 'block1_conv1' twice"):
        fastvgg.VGG16(path, include_top=False)


def test_unknown_layout_says_what_it_found(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_group("model")
        f.attrs["creator"] = "someone"
    with pytest.raises(ValueError, match=r"no Keras weights layout.*\['model'\].*\['creator'\]"):
        fastvgg.VGG16(path, include_top=False)


def test_text_file_named_keras(tmp_path):
    path = tmp_path / "notes.keras"
    path.write_text("these are not weights\n")
    with pytest.raises(ValueError, match=r"not a readable HDF5 file.*\.keras"):
        fastvgg.VGG16(path, include_top=False)


@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.9])
def test_truncated_keras3_file(copy_of, fraction):
    data = copy_of.read_bytes()
    copy_of.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match=r"(?i)truncated|damaged|not a readable HDF5"):
        fastvgg.VGG16(copy_of, include_top=False)


def test_keras3_file_missing_a_layer(copy_of):
    with h5py.File(copy_of, "r+") as f:
        del f["layers/conv2d_5"]
    with pytest.raises(ValueError, match=r"no weights for layer\(s\) \['block3_conv2'\]"):
        fastvgg.VGG16(copy_of, include_top=False)


def test_keras3_file_with_a_missing_bias(copy_of):
    with h5py.File(copy_of, "r+") as f:
        del f["layers/conv2d_5/vars/1"]
    with pytest.raises(ValueError, match=r"'block3_conv2'.*1 weights; expected 2"):
        fastvgg.VGG16(copy_of, include_top=False)


def test_keras3_vgg19_file_into_vgg16(tmp_path):
    path = tmp_path / "vgg19.weights.h5"
    wf.write_keras3_weights(path, nv.random_weights(19, False, seed=2), 19, False)
    with pytest.raises(ValueError, match=r"'block3_conv4'.*does not have.*VGG of this depth"):
        fastvgg.VGG16(path, include_top=False)


def test_early_keras3_vgg19_file_into_vgg16(tmp_path):
    """Without names only the order maps layers: a count that differs must not load by position."""
    path = tmp_path / "vgg19.weights.h5"
    wf.write_keras3_weights(path, nv.random_weights(19, False, seed=2), 19, False, name_attributes=False)
    with pytest.raises(ValueError, match=r"names no layers.*16 convolutions.*has 13"):
        fastvgg.VGG16(path, include_top=False)


def test_keras3_file_with_a_wrong_shape(copy_of):
    with h5py.File(copy_of, "r+") as f:
        del f["layers/conv2d_2/vars/0"]
        f["layers/conv2d_2/vars"].create_dataset("0", data=np.zeros((3, 3, 64, 100), np.float32))
    with pytest.raises(ValueError, match=r"'block2_conv1'.*\(3, 3, 64, 100\), expected \(3, 3, 64, 128\)"):
        fastvgg.VGG16(copy_of, include_top=False)


def test_vars_that_are_not_numbered(copy_of):
    with h5py.File(copy_of, "r+") as f:
        f.move("layers/conv2d/vars/1", "layers/conv2d/vars/bias")
    with pytest.raises(ValueError, match=r"not Keras's numbered variables"):
        fastvgg.VGG16(copy_of, include_top=False)


@pytest.mark.parametrize("target", ["/layers/conv2d_1/vars/0", "/nowhere"])
def test_soft_link_is_not_followed(copy_of, target):
    with h5py.File(copy_of, "r+") as f:
        del f["layers/conv2d/vars/0"]
        f["layers/conv2d/vars/0"] = h5py.SoftLink(target)
    with pytest.raises(ValueError, match=r"SoftLink.*does not follow links"):
        fastvgg.VGG16(copy_of, include_top=False)


def test_external_storage_is_refused(tmp_path, copy_of, base16):
    raw = tmp_path / "outside.bin"
    kernel = base16["block1_conv1"][0]
    raw.write_bytes(kernel.tobytes())
    with h5py.File(copy_of, "r+") as f:
        del f["layers/conv2d/vars/0"]
        f["layers/conv2d/vars"].create_dataset("0", shape=kernel.shape, dtype="f4", external=[(str(raw), 0, kernel.nbytes)])
    with pytest.raises(ValueError, match=r"keeps its data outside this file"):
        fastvgg.VGG16(copy_of, include_top=False)


def test_damaged_chunk_is_found_before_the_model_changes(copy_of, base16):
    """A compressed chunk that no longer inflates is found only when read; every chunked dataset
    is read before the first layer is written, so the error names the dataset and the model
    keeps its weights."""
    kernel = base16["block5_conv3"][0]
    with h5py.File(copy_of, "r+") as f:
        del f["layers/conv2d_12/vars/0"]
        dataset = f["layers/conv2d_12/vars"].create_dataset("0", data=kernel, compression="gzip", chunks=kernel.shape)
        chunk = dataset.id.get_chunk_info(0)
        offset, size = chunk.byte_offset, chunk.size
    data = bytearray(copy_of.read_bytes())
    data[offset : offset + size] = bytes(size)  # zeros are not a deflate stream
    copy_of.write_bytes(bytes(data))
    model = fastvgg.VGG16(None, include_top=False, seed=3)
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"conv2d_12/vars/0 cannot be read back.*corrupt compressed chunk.*left as it was"):
        model.load_weights(copy_of)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_archive_member_declared_larger_than_the_archive(tmp_path, base16):
    path = tmp_path / "liar.keras"
    wf.write_keras_archive(path, wf.keras3_weights_bytes(base16, 16, False), wf.keras3_config(16, False))
    data = bytearray(path.read_bytes())
    # Patch the central directory's uncompressed size of model.weights.h5 to 1 TB.
    entry = data.rindex(b"PK\x01\x02", 0, data.rindex(b"model.weights.h5"))
    data[entry + 24 : entry + 28] = (0xFFFFFFF0).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.weights.h5 claims 4294967280 bytes in a \d+-byte file"):
        fastvgg.VGG16(path, include_top=False)


def test_hostile_config_json_is_only_data(tmp_path, base16):
    """An archive whose config.json is garbage or names other layers still loads by the names
    in the weights file: the config is read as data, never trusted over the file."""
    path = tmp_path / "odd.keras"
    config = {"class_name": "Lambda", "config": {"function": "__import__('os').system('false')", "layers": "x"}}
    wf.write_keras_archive(path, wf.keras3_weights_bytes(base16, 16, False), config)
    model = fastvgg.VGG16(path, include_top=False)
    np.testing.assert_array_equal(model.get_layer("block4_conv2").get_weights()[0], base16["block4_conv2"][0])
