"""TensorFlow SavedModel directories (tf.keras's model.save("dir")), read without TensorFlow.

The Keras-parity checks of each fine-tuned shape saved as a SavedModel are in
test_load_model.py (TF_KERAS_CASES); here: the formats' pieces against TensorFlow's own
readers, the packed cache, what is refused and why, and damaged directories.
"""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest

import fastvgg
import keras_finetuned as kf
from fastvgg import _core, tf_saved_model
from fastvgg.keras_model import UnsupportedModelError

KERAS_ATOL = 1e-4  # test_load_model's bound against Keras; not to be loosened


def _tf():
    try:
        import tensorflow as tf
        import tf_keras
    except Exception as error:  # pragma: no cover - only without TensorFlow
        pytest.skip(f"TensorFlow or tf_keras cannot be imported ({error}); nothing writes SavedModels here")
    return tf, tf_keras


def _quiet_save(model, path, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(path, **options)
    return path


def test_snappy_blocks_decode_by_the_format():
    # "abc", then a 1-byte-offset copy of 9 bytes at offset 3 (overlapping), then a
    # 2-byte-offset copy of 4 bytes at offset 12, then the literal "!".
    stream = bytes([17, 0x08]) + b"abc" + bytes([0x15, 3]) + bytes([(4 - 1) << 2 | 2, 12, 0]) + bytes([0x00]) + b"!"
    assert tf_saved_model._snappy_decompress(stream) == b"abcabcabcabc" + b"abca" + b"!"
    # Copies longer than their offset repeat the last bytes (offsets 1 and 2).
    assert tf_saved_model._snappy_decompress(bytes([9, 0x00]) + b"z" + bytes([(8 - 4) << 2 | 1, 1])) == b"z" * 9
    assert tf_saved_model._snappy_decompress(bytes([10, 0x04]) + b"ab" + bytes([(8 - 4) << 2 | 1, 2])) == b"ab" * 5
    for broken in (stream[:-1], bytes([18]) + stream[1:], bytes([16, 0x15, 3])):
        with pytest.raises(ValueError):
            tf_saved_model._snappy_decompress(broken)


# The checkpoint's tensors against TensorFlow's reader ------------------------------------------------
def test_checkpoint_tensors_read_as_tensorflow_reads_them(tmp_path):
    tf, _ = _tf()
    rng = np.random.default_rng(0)
    values = {
        "f32": rng.standard_normal((3, 5, 7)).astype(np.float32),
        "f16": rng.standard_normal((11,)).astype(np.float16),
        "f64": rng.standard_normal((2, 2)),
        "i64": np.array(123456789012, dtype=np.int64),
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "empty": np.zeros((0, 4), np.float32),
    }
    variables = {k: tf.Variable(v) for k, v in values.items()}
    variables["bf16"] = tf.Variable(tf.constant(rng.standard_normal(9), dtype=tf.bfloat16))
    variables["flag"] = tf.Variable([True, False])  # a dtype no weight has: listed, never read as numbers
    # Hundreds of long, similar keys: several index blocks, keys that share prefixes.
    for i in range(400):
        variables[f"layer_with_a_long_name_{i:04d}"] = tf.Variable(np.full((2,), i, np.float32))
    prefix = tf.train.Checkpoint(**variables).write(str(tmp_path / "ckpt"))
    reader = tf.train.load_checkpoint(prefix)
    tensors = tf_saved_model.read_checkpoint_index(prefix)
    keys = {k for k in reader.get_variable_to_shape_map()}
    assert keys == set(tensors)
    flag = tensors["flag/.ATTRIBUTES/VARIABLE_VALUE"]
    assert (flag.tf_dtype, flag.stored_dtype) == (10, np.dtype("V1"))
    for key in keys - {tf_saved_model.OBJECT_GRAPH_KEY, flag.key}:
        expected = reader.get_tensor(key)
        got = tensors[key].read()
        if key.startswith("bf16"):
            expected = expected.astype(np.float32)
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        np.testing.assert_array_equal(got, expected, err_msg=key)
    assert tf_saved_model._string_scalar(tensors[tf_saved_model.OBJECT_GRAPH_KEY]) == reader.get_tensor(
        tf_saved_model.OBJECT_GRAPH_KEY)


# Whole models ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A tf.keras model with Normalization (its "mean" is tracked as adapt_mean), a nested
    Sequential, BatchNormalization and a head, saved as a SavedModel; with Keras's predictions."""
    tf, keras = _tf()
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(rng.uniform(0, 255, (16, 12, 12, 3)).astype(np.float32))
    block = keras.Sequential([keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a"),
                              keras.layers.MaxPooling2D(name="pool_a")], name="block")
    inputs = keras.Input((12, 12, 3), name="image")
    x = block(norm(inputs))
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(4, activation="softmax", name="scores")(x)
    model = keras.Model(inputs, out)
    bn = model.get_layer("bn")
    bn.set_weights([w + rng.uniform(0.1, 0.5, w.shape).astype(np.float32) for w in bn.get_weights()])
    path = _quiet_save(model, str(tmp_path_factory.mktemp("sm") / "model"), save_format="tf")
    x = rng.uniform(0, 255, (3, 12, 12, 3)).astype(np.float32)
    return path, x, model.predict(x, verbose=0), model


def test_saved_model_predicts_as_keras(saved_dir):
    path, x, expected, keras_model = saved_dir
    for precision in ("fast", "highest"):
        model = fastvgg.load_model(path, precision=precision, packed_cache=False)
        np.testing.assert_allclose(model.predict(x), expected, atol=KERAS_ATOL)
    assert [layer.name for layer in model.layers] == ["image", "norm", "conv_a", "pool_a", "bn", "gap", "scores"]
    for name in ("norm", "conv_a", "bn", "scores"):
        ours = model.get_layer(name).get_weights()
        theirs = {layer.name: layer for layer in kf._leaf_layers(keras_model)}[name].get_weights()
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a.reshape(np.shape(b)), b)


def test_tensorflow_2_4_layout_with_the_metadata_inside_the_graph(saved_dir, tmp_path):
    """TensorFlow 2.0-2.4 wrote no keras_metadata.pb: each Keras object's JSON was the
    user_object.metadata of its node in saved_model.pb's object graph (the field 2.5 deprecated,
    keyed by the same node ids keras_metadata.pb carries). That layout, rebuilt from a current
    directory with TensorFlow's own protobuf classes, loads and predicts as Keras."""
    _tf()
    from tensorflow.core.protobuf import saved_model_pb2
    from tf_keras.protobuf import saved_metadata_pb2

    path, x, expected, _ = saved_dir
    old = str(tmp_path / "tf24")
    shutil.copytree(path, old)
    metadata = saved_metadata_pb2.SavedMetadata()
    with open(os.path.join(old, "keras_metadata.pb"), "rb") as f:
        metadata.ParseFromString(f.read())
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(old, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    nodes = saved.meta_graphs[0].object_graph_def.nodes
    for node in metadata.nodes:
        assert nodes[node.node_id].user_object.identifier == node.identifier
        nodes[node.node_id].user_object.metadata = node.metadata
    with open(os.path.join(old, "saved_model.pb"), "wb") as f:
        f.write(saved.SerializeToString())
    os.remove(os.path.join(old, "keras_metadata.pb"))
    model = fastvgg.load_model(old, packed_cache=False)
    np.testing.assert_allclose(model.predict(x), expected, atol=KERAS_ATOL)
    assert [layer.name for layer in model.layers] == ["image", "norm", "conv_a", "pool_a", "bn", "gap", "scores"]


def test_saved_model_goes_through_the_packed_cache(saved_dir, tmp_path):
    path, x, expected, _ = saved_dir
    copy = str(tmp_path / "copy")
    shutil.copytree(path, copy)
    plain = fastvgg.load_model(copy, packed_cache=False)
    first = fastvgg.load_model(copy, packed_cache=tmp_path / "cache")
    second = fastvgg.load_model(copy, packed_cache=tmp_path / "cache")
    assert (plain._packed_cache_status, first._packed_cache_status, second._packed_cache_status) == ("off", "built", "hit")
    for model in (first, second):
        np.testing.assert_array_equal(model.predict(x), plain.predict(x))
    # Other weights in the same directory (a data file rewritten): another cache entry.
    _, keras = _tf()
    changed = keras.models.load_model(copy, compile=False)
    scores = changed.get_layer("scores")
    scores.set_weights([w * 2 for w in scores.get_weights()])
    shutil.rmtree(copy)
    _quiet_save(changed, copy, save_format="tf")
    model = fastvgg.load_model(copy, packed_cache=tmp_path / "cache")
    assert model._packed_cache_status == "built"
    np.testing.assert_allclose(model.predict(x), changed.predict(x, verbose=0), atol=KERAS_ATOL)


def test_weights_argument_points_to_load_model(saved_dir):
    path = saved_dir[0]
    with pytest.raises(IsADirectoryError, match=r"SavedModel directory.*fastvgg.load_model\(path\)"):
        fastvgg.VGG16(path, include_top=False)


def test_serving_graphs_and_subclassed_models_are_refused_with_the_way_out(tmp_path):
    tf, keras = _tf()
    module = tf.Module()
    module.v = tf.Variable([1.0, 2.0])
    tf.saved_model.save(module, str(tmp_path / "module"))
    with pytest.raises(ValueError, match=r"no keras_metadata.pb.*model.save\('model.keras'\)"):
        fastvgg.load_model(str(tmp_path / "module"))

    class Tiny(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    tiny = Tiny()
    tiny(np.zeros((1, 3), np.float32))
    _quiet_save(tiny, str(tmp_path / "tiny"), save_format="tf")
    with pytest.raises(ValueError, match="subclassed Keras model"):
        fastvgg.load_model(str(tmp_path / "tiny"))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        fastvgg.load_model(str(tmp_path))


def test_keras3_export_is_refused_with_the_way_out(tmp_path):
    _tf()
    import keras

    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.export(str(tmp_path / "exported"), verbose=False)
    with pytest.raises(ValueError, match=r"model.export\(\).*no Keras|no keras_metadata.pb"):
        fastvgg.load_model(str(tmp_path / "exported"))


# Damaged directories ---------------------------------------------------------------------------------
def _copy(saved_dir, tmp_path):
    copy = str(tmp_path / "damaged")
    shutil.copytree(saved_dir[0], copy)
    return copy


def _data_file(path):
    return os.path.join(path, "variables", "variables.data-00000-of-00001")


def _index_file(path):
    return os.path.join(path, "variables", "variables.index")


def test_a_flipped_byte_in_the_weights_fails_the_checksum(saved_dir, tmp_path):
    path = _copy(saved_dir, tmp_path)
    tensors = tf_saved_model.read_checkpoint_index(os.path.join(path, "variables", "variables"))
    kernel = next(t for k, t in tensors.items() if t.shape == (3, 3, 3, 8))
    with open(_data_file(path), "r+b") as f:
        f.seek(kernel.offset + 5)
        byte = f.read(1)
        f.seek(kernel.offset + 5)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ValueError, match="damaged.*checksum"):
        fastvgg.load_model(path, packed_cache=False)


@pytest.mark.parametrize("what", ["truncated data", "missing data", "truncated index", "empty index", "garbage metadata",
                                  "missing metadata"])
def test_damaged_directories_are_clear_errors(saved_dir, tmp_path, what):
    path = _copy(saved_dir, tmp_path)
    if what == "truncated data":
        os.truncate(_data_file(path), os.path.getsize(_data_file(path)) // 2)
        message = r"truncated"
    elif what == "missing data":
        os.remove(_data_file(path))
        message = r"variables.data-00000-of-00001 is missing"
    elif what == "truncated index":
        os.truncate(_index_file(path), os.path.getsize(_index_file(path)) - 10)
        message = r"truncated or not a checkpoint index"
    elif what == "empty index":
        open(_index_file(path), "wb").close()
        message = r"shorter than a table's footer"
    elif what == "garbage metadata":
        with open(os.path.join(path, "keras_metadata.pb"), "wb") as f:
            f.write(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
        message = r"keras_metadata.pb|runs past|wire type|number"
    else:
        os.remove(os.path.join(path, "keras_metadata.pb"))
        message = r"no keras_metadata.pb, none inside saved_model.pb"
    with pytest.raises(ValueError, match=message):
        fastvgg.load_model(path, packed_cache=False)


@pytest.mark.parametrize("target", ["index", "metadata"])
def test_random_damage_is_a_clear_error_or_a_correct_model(saved_dir, tmp_path, target):
    """Bytes of the index or the metadata changed at random: every load raises ValueError (or
    its subclass UnsupportedModelError) or loads a model. The index's blocks carry checksums,
    so a model loaded through a changed index is the saved one (the change hit a part nothing
    reads); the metadata's JSON has none, as an .h5 file's config has none: a changed digit
    there is another model, which must still load or be refused cleanly."""
    path, x, expected, _ = saved_dir
    with open(_index_file(path) if target == "index" else os.path.join(path, "keras_metadata.pb"), "rb") as f:
        original = f.read()
    rng = np.random.default_rng(11 if target == "index" else 12)
    copy = _copy(saved_dir, tmp_path)
    victim = _index_file(copy) if target == "index" else os.path.join(copy, "keras_metadata.pb")
    outcomes = {"refused": 0, "loaded": 0}
    for _ in range(120):
        data = bytearray(original)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if rng.random() < 0.2:
            data = data[: int(rng.integers(0, len(data)))]
        with open(victim, "wb") as f:
            f.write(bytes(data))
        try:
            model = fastvgg.load_model(copy, packed_cache=False)
        except ValueError:  # UnsupportedModelError included
            outcomes["refused"] += 1
            continue
        got = model.predict(x)
        if target == "index":
            np.testing.assert_allclose(got, expected, atol=KERAS_ATOL)
        outcomes["loaded"] += 1
    assert outcomes["refused"] > 0, outcomes


def test_unsupported_layers_in_a_saved_model_are_named(tmp_path):
    _, keras = _tf()
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                              keras.layers.Dense(2), keras.layers.LayerNormalization(name="ln")])
    path = _quiet_save(model, str(tmp_path / "ln"), save_format="tf")
    with pytest.raises(UnsupportedModelError, match="'ln' of class 'LayerNormalization' is not supported"):
        fastvgg.load_model(path)
