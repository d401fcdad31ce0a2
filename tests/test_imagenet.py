"""preprocess_input and decode_predictions against Keras's own functions."""

import hashlib
import os
import shutil

import numpy as np
import pytest

import fastvgg
from fastvgg import imagenet

# Keras's published md5 of imagenet_class_index.json (keras.applications.imagenet_utils).
KERAS_CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"


def keras_vgg16():
    pytest.importorskip("tensorflow", reason="TensorFlow cannot be imported here")
    from keras.applications import vgg16

    return vgg16


def test_shipped_class_index_is_keras_file_byte_for_byte():
    with open(imagenet.CLASS_INDEX_FILE, "rb") as f:
        assert hashlib.md5(f.read()).hexdigest() == KERAS_CLASS_INDEX_MD5


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("data_format", [None, "channels_last", "channels_first"])
@pytest.mark.parametrize("batched", [True, False])
def test_preprocess_input_matches_keras(dtype, data_format, batched):
    vgg16 = keras_vgg16()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 5, 7, 3)).astype(dtype)
    if data_format == "channels_first":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if not batched:
        x = x[0]
    original = x.copy()
    ours = fastvgg.preprocess_input(x, data_format=data_format)
    theirs = vgg16.preprocess_input(x.copy(), data_format=data_format)
    np.testing.assert_array_equal(x, original)  # never in place, unlike Keras for float input
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


def numpy_caffe(x):
    """Keras's arithmetic in numpy: channels reversed, cast to float32, minus the float32 means."""
    return np.flip(x, axis=-1).astype(np.float32) - np.asarray(imagenet.CAFFE_BGR_MEAN, dtype=np.float32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(0, 4, 4, 3), (3,), (1, 1, 1, 3), (2, 129, 67, 3), (5, 7, 3)])
def test_preprocess_input_fast_path_equals_numpy_bit_for_bit(shape, threads):
    """uint8 and float32 C-contiguous images take _core.caffe_preprocess (multi-threaded, in
    chunks of 16384 pixels: (2, 129, 67) makes two); every other layout the numpy line. Both
    must give the same bits, NaN, infinities and -0.0 included."""
    rng = np.random.default_rng(sum(shape) + threads)
    previous = fastvgg.get_num_threads()
    fastvgg.set_num_threads(threads)
    try:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        floats = rng.normal(0, 300, shape).astype(np.float32)
        if floats.size >= 3:
            floats.reshape(-1, 3)[0] = [np.nan, np.inf, -0.0]
            floats.reshape(-1, 3)[-1] = [-np.inf, 1e38, -1e-45]
        for x in (pixels, floats):
            ours = fastvgg.preprocess_input(x)
            assert ours.dtype == np.float32 and ours.shape == x.shape
            np.testing.assert_array_equal(ours.view(np.uint32), numpy_caffe(x).view(np.uint32))
        # Strided and big-endian input go the numpy way, with the same result.
        if len(shape) == 4 and shape[0] > 0:
            strided = np.concatenate([pixels, pixels], axis=2)[:, :, ::2]
            np.testing.assert_array_equal(fastvgg.preprocess_input(strided), numpy_caffe(strided))
            swapped = floats.astype(">f4")
            np.testing.assert_array_equal(fastvgg.preprocess_input(swapped).view(np.uint32),
                                          numpy_caffe(floats).view(np.uint32))
    finally:
        fastvgg.set_num_threads(previous)


def test_core_caffe_preprocess_refuses_what_it_would_read_wrongly():
    from fastvgg import _core

    mean = np.asarray(imagenet.CAFFE_BGR_MEAN, dtype=np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.caffe_preprocess(np.zeros((2, 4, 6), np.uint8)[:, :, ::2], mean)
    with pytest.raises(ValueError, match="3 channels"):
        _core.caffe_preprocess(np.zeros((2, 4, 4), np.uint8), mean)
    with pytest.raises(TypeError, match="uint8 or float32"):
        _core.caffe_preprocess(np.zeros((2, 4, 3), np.float64), mean)
    with pytest.raises(ValueError, match="3 values"):
        _core.caffe_preprocess(np.zeros((2, 4, 3), np.uint8), mean[:2])


def test_preprocess_input_rejects_what_it_cannot_convert():
    with pytest.raises(ValueError, match="3 colour channels"):
        fastvgg.preprocess_input(np.zeros((1, 4, 4, 4)))
    with pytest.raises(ValueError, match="data_format"):
        fastvgg.preprocess_input(np.zeros((1, 4, 4, 3)), data_format="nhwc")
    with pytest.raises(TypeError, match="numeric"):
        fastvgg.preprocess_input(np.array([["a", "b", "c"]]))


def test_decode_predictions_matches_keras(tmp_path, monkeypatch):
    keras_vgg16()
    from keras.src.applications import imagenet_utils
    from keras.src.backend import config

    # Keras downloads its class index into KERAS_HOME/models and checks the md5 itself; hand it
    # our copy there, so Keras's own check vouches for the file too and nothing is downloaded.
    (tmp_path / "models").mkdir()
    shutil.copy(imagenet.CLASS_INDEX_FILE, tmp_path / "models" / "imagenet_class_index.json")
    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path))
    monkeypatch.setattr(imagenet_utils, "CLASS_INDEX", None)
    preds = np.random.default_rng(1).random((3, 1000)).astype(np.float32)
    for top in (1, 5, 17):
        assert fastvgg.decode_predictions(preds, top=top) == imagenet_utils.decode_predictions(preds, top=top)
    first = fastvgg.decode_predictions(preds, top=3)[0]
    assert [score for _, _, score in first] == sorted((s for _, _, s in first), reverse=True)


def test_decode_predictions_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"\(samples, 1000\).*\(2, 10\)"):
        fastvgg.decode_predictions(np.zeros((2, 10)))
    with pytest.raises(ValueError, match="`top`"):
        fastvgg.decode_predictions(np.zeros((1, 1000)), top=0)
