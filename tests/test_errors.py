"""Bad arguments, inputs and weight files get clear Python exceptions, never a crash.

Each check names the exception type and a part of the message that says what is wrong,
so a message that stops naming the problem fails as surely as a missing check. Models
are small (no top, or a top over a 32x32 input, whose fc1 has 512 rows) to keep this fast.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import fastvgg
from helpers import BIAS_SCALE, CONSTRUCTORS, assert_weights_unchanged, snapshot, write_weights
import numpy_vgg as nv

SMALL_TOP = dict(input_shape=(32, 32, 3), classes=5)

# Keras's published file names and URLs of the ImageNet weights (keras.applications.vgg16/19).
KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications"
IMAGENET_FILES = {
    (16, True): "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
    (16, False): "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    (19, True): "vgg19_weights_tf_dim_ordering_tf_kernels.h5",
    (19, False): "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Valid weight files: VGG16 without top, VGG19 without top, VGG16 with a 32x32 top and
    5 classes, plus the VGG16 weights themselves for making broken variants."""
    directory = tmp_path_factory.mktemp("weights")
    notop16 = nv.random_weights(16, include_top=False, seed=1, bias_scale=BIAS_SCALE)
    notop19 = nv.random_weights(19, include_top=False, seed=2, bias_scale=BIAS_SCALE)
    top16 = nv.random_weights(16, input_hw=(32, 32), classes=5, seed=3, bias_scale=BIAS_SCALE)
    return dict(
        notop16_weights=notop16,
        notop16=write_weights(directory / "vgg16_notop.h5", notop16, 16, False),
        notop19=write_weights(directory / "vgg19_notop.h5", notop19, 19, False),
        top16_weights=top16,
        top16=write_weights(directory / "vgg16_top32_5classes.h5", top16, 16, True),
    )


@pytest.fixture(scope="module")
def free_size_model():
    return fastvgg.VGG16(None, include_top=False, seed=0)


@pytest.fixture(scope="module")
def fixed_size_model():
    return fastvgg.VGG16(None, include_top=False, input_shape=(32, 48, 3), seed=0)


# Constructor arguments -------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["imagenet21k", "no_such_file.h5"])
def test_unknown_weights_string_or_missing_path(weights):
    with pytest.raises(ValueError, match=r"`weights` argument.*" + re.escape(repr(weights))):
        fastvgg.VGG16(weights)


def test_weights_of_a_wrong_type():
    with pytest.raises(ValueError, match=r"`weights` argument.*Received: weights=3"):
        fastvgg.VGG16(3)


def test_imagenet_top_needs_1000_classes():
    with pytest.raises(ValueError, match=r"`classes` should be 1000.*classes=10"):
        fastvgg.VGG16("imagenet", classes=10)


def test_imagenet_top_needs_224_input():
    with pytest.raises(ValueError, match=r"`input_shape` should be \(224, 224, 3\).*\(200, 200, 3\)"):
        fastvgg.VGG19("imagenet", input_shape=(200, 200, 3))


def test_imagenet_needs_three_channels():
    with pytest.raises(ValueError, match=r"3 channels.*\(64, 64, 1\)"):
        fastvgg.VGG16("imagenet", include_top=False, input_shape=(64, 64, 1))


@pytest.mark.parametrize("input_shape", [(31, 64, 3), (64, 16, 3), (0, 64, 3)])
def test_input_shape_below_32(input_shape):
    with pytest.raises(ValueError, match=r"at least 32x32.*" + re.escape(str(input_shape))):
        fastvgg.VGG16(None, include_top=False, input_shape=input_shape)


@pytest.mark.parametrize("input_shape", [(64, 64), (1, 64, 64, 3), (64,)])
def test_input_shape_of_wrong_length(input_shape):
    with pytest.raises(ValueError, match=r"`input_shape` must be a tuple of three integers"):
        fastvgg.VGG16(None, include_top=False, input_shape=input_shape)


@pytest.mark.parametrize("input_shape", [64, "64x64x3", (64, "wide", 3)])
def test_input_shape_that_is_not_a_shape(input_shape):
    with pytest.raises(ValueError, match=r"`input_shape` must be a tuple of three integers"):
        fastvgg.VGG16(None, include_top=False, input_shape=input_shape)


def test_input_shape_without_channels():
    with pytest.raises(ValueError, match=r"positive channel count"):
        fastvgg.VGG16(None, include_top=False, input_shape=(64, 64, None))


@pytest.mark.parametrize("input_shape", [(None, None, 3), (None, 64, 3)])
def test_top_needs_a_static_input_shape(input_shape):
    with pytest.raises(ValueError, match=r"include_top.*static `input_shape`"):
        fastvgg.VGG16(None, include_top=True, input_shape=input_shape)


@pytest.mark.parametrize("classes", [0, -3, 2.5, True])
def test_classes_must_be_a_positive_integer(classes):
    with pytest.raises(ValueError, match=r"`classes` must be a positive integer"):
        fastvgg.VGG16(None, input_shape=(32, 32, 3), classes=classes)


def test_non_integer_input_shape():
    with pytest.raises(ValueError, match=r"`input_shape` must be a tuple of three integers.*64\.7"):
        fastvgg.VGG16(None, include_top=False, input_shape=(64.7, 64, 3))


def test_model_set_weights_checks_every_array_before_writing():
    model = fastvgg.VGG16(None, include_top=False, input_shape=(32, 32, 3), seed=1)
    before = snapshot(model)
    arrays = [np.zeros_like(a) for a in before]
    arrays[-2] = np.zeros((3, 3, 512, 7), np.float32)  # block5_conv3's kernel, the last layer
    with pytest.raises(ValueError, match=r"block5_conv3.*\(3, 3, 512, 512\).*\(3, 3, 512, 7\)"):
        model.set_weights(arrays)
    assert_weights_unchanged(model, before)


def test_unknown_precision():
    with pytest.raises(ValueError, match=r"`precision` must be one of 'fast', 'highest', 'bf16', 'bf16x3'.*'low'"):
        fastvgg.VGG16(None, include_top=False, precision="low")


def test_unknown_pooling():
    with pytest.raises(ValueError, match=r"`pooling` must be None, 'avg' or 'max'.*'mean'"):
        fastvgg.VGG16(None, include_top=False, pooling="mean")


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_pooling_with_the_top(pooling):
    with pytest.raises(ValueError, match=r"include_top=False"):
        fastvgg.VGG16(None, include_top=True, input_shape=(32, 32, 3), pooling=pooling)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "Softmax"])
def test_unsupported_classifier_activation(activation):
    with pytest.raises(ValueError, match=r"Unsupported `classifier_activation=" + repr(activation)):
        fastvgg.VGG16(None, input_shape=(32, 32, 3), classifier_activation=activation)


def test_relu_classifier_with_a_weights_file(files):
    # As in Keras: pretrained weights allow only softmax or no activation on top.
    with pytest.raises(ValueError, match=r"Only `None` and `softmax`.*classifier_activation=relu"):
        fastvgg.VGG16(files["top16"], classifier_activation="relu", **SMALL_TOP)


@pytest.mark.parametrize("include_top", [True, False])
@pytest.mark.parametrize("depth", [16, 19])
def test_imagenet_weights_not_cached_and_not_downloadable(monkeypatch, tmp_path, depth, include_top):
    from fastvgg.download import BASE_URL_ENV, WeightsDownloadError

    (tmp_path / "keras").mkdir()
    (tmp_path / "fastvgg").mkdir()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("FASTVGG_HOME", str(tmp_path / "fastvgg"))
    # Nothing listens on port 9 here: the download fails at once, without the network.
    unreachable = "http://127.0.0.1:9/keras-applications"
    monkeypatch.setenv(BASE_URL_ENV, unreachable)
    filename = IMAGENET_FILES[(depth, include_top)]
    with pytest.raises(WeightsDownloadError) as raised:
        CONSTRUCTORS[depth]("imagenet", include_top=include_top)
    message = str(raised.value)
    assert filename in message
    assert f"{unreachable}/vgg{depth}/{filename}" in message
    # It must say where to put the file.
    assert str(tmp_path / "keras") in message


@pytest.mark.parametrize("include_top", [True, False])
@pytest.mark.parametrize("depth", [16, 19])
def test_default_download_address_is_keras_s(monkeypatch, depth, include_top):
    from fastvgg.download import BASE_URL_ENV, imagenet_weights_url

    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    filename = IMAGENET_FILES[(depth, include_top)]
    assert imagenet_weights_url(f"vgg{depth}", include_top) == f"{KERAS_WEIGHTS_URL}/vgg{depth}/{filename}"


# predict inputs --------------------------------------------------------------------------------
def test_predict_rank_3_suggests_a_batch_axis(free_size_model):
    with pytest.raises(ValueError, match=r"4-D batch.*\(32, 32, 3\).*batch axis"):
        free_size_model.predict(np.zeros((32, 32, 3), np.float32))


@pytest.mark.parametrize("shape", [(32,), (1, 32, 32, 3, 1), ()])
def test_predict_other_ranks(free_size_model, shape):
    with pytest.raises(ValueError, match=r"must be a 4-D batch"):
        free_size_model.predict(np.zeros(shape, np.float32))


@pytest.mark.parametrize("channels", [1, 4])
def test_predict_wrong_channel_count(free_size_model, channels):
    with pytest.raises(ValueError, match=r"expected shape \(None, None, None, 3\).*axis 3"):
        free_size_model.predict(np.zeros((1, 32, 32, channels), np.float32))


@pytest.mark.parametrize("shape, axis", [((1, 48, 32, 3), 1), ((1, 32, 64, 3), 2)])
def test_predict_wrong_size_for_a_fixed_shape_model(fixed_size_model, shape, axis):
    with pytest.raises(ValueError, match=r"expected shape \(None, 32, 48, 3\).*" + re.escape(str(shape)) + rf".*axis {axis}"):
        fixed_size_model.predict(np.zeros(shape, np.float32))


@pytest.mark.parametrize("shape", [(1, 31, 64, 3), (2, 64, 20, 3), (1, 1, 1, 3)])
def test_predict_image_below_32x32(free_size_model, shape):
    with pytest.raises(ValueError, match=rf"at least 32x32.*{shape[1]}x{shape[2]}"):
        free_size_model.predict(np.zeros(shape, np.float32))


def test_predict_empty_batch(free_size_model):
    with pytest.raises(ValueError, match=r"empty batch"):
        free_size_model.predict(np.zeros((0, 32, 32, 3), np.float32))


@pytest.mark.parametrize(
    "make_input",
    [
        lambda: np.zeros((1, 32, 32, 3), dtype=object),
        lambda: np.full((1, 32, 32, 3), "a"),
        lambda: np.full((1, 32, 32, 3), b"a"),
        lambda: np.zeros((1, 32, 32, 3), dtype=np.complex64),
        lambda: np.zeros((1, 32, 32, 3), dtype="datetime64[s]"),
    ],
    ids=["object", "str", "bytes", "complex", "datetime"],
)
def test_predict_non_numeric_arrays(free_size_model, make_input):
    x = make_input()
    with pytest.raises(TypeError, match=rf"numeric array.*dtype {re.escape(str(x.dtype))}"):
        free_size_model.predict(x)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "4", None, True])
def test_predict_bad_batch_size(free_size_model, batch_size):
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer.*" + re.escape(repr(batch_size))):
        free_size_model.predict(np.zeros((1, 32, 32, 3), np.float32), batch_size=batch_size)


# Weight files ----------------------------------------------------------------------------------
def test_text_file_named_h5(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_text("these are not the weights you are looking for\n")
    with pytest.raises(ValueError, match=r"not a readable HDF5 file"):
        fastvgg.VGG16(path, include_top=False)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.h5"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"HDF5"):
        fastvgg.VGG16(path, include_top=False)


def test_directory_as_weights(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a directory"):
        fastvgg.VGG16(tmp_path, include_top=False)


def test_load_weights_missing_file(free_size_model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No weights file.*missing\.h5"):
        free_size_model.load_weights(tmp_path / "missing.h5")


def test_hdf5_without_keras_layout(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"in no Keras weights layout.*'layer_names'.*'layers' group.*images"):
        fastvgg.VGG16(path, include_top=False)


def test_layer_listed_but_missing(files, tmp_path):
    path = tmp_path / "missing_group.h5"
    shutil.copyfile(files["notop16"], path)
    with h5py.File(path, "r+") as f:
        del f["block2_conv1"]
    with pytest.raises(ValueError, match=r"lists layer 'block2_conv1'.*no group"):
        fastvgg.VGG16(path, include_top=False)


def test_weight_listed_but_missing(files, tmp_path):
    path = tmp_path / "missing_dataset.h5"
    shutil.copyfile(files["notop16"], path)
    with h5py.File(path, "r+") as f:
        del f["block2_conv1/block2_conv1/bias:0"]
    with pytest.raises(ValueError, match=r"'block2_conv1'.*'block2_conv1/bias:0' is listed but missing"):
        fastvgg.VGG16(path, include_top=False)


def test_notop_file_into_a_model_with_top(files):
    with pytest.raises(ValueError, match=r"no weights for layer\(s\).*'fc1'.*include_top=False"):
        fastvgg.VGG16(files["notop16"], **SMALL_TOP)


def test_fc1_of_another_input_size(files):
    # The file's fc1 has 1x1x512 = 512 rows; a 64x64 model needs 2x2x512 = 2048.
    with pytest.raises(ValueError, match=r"'fc1'.*\(512, 4096\), expected \(2048, 4096\)"):
        fastvgg.VGG16(files["top16"], input_shape=(64, 64, 3), classes=5)


def test_predictions_of_another_class_count(files):
    with pytest.raises(ValueError, match=r"'predictions'.*\(4096, 5\), expected \(4096, 1000\)"):
        fastvgg.VGG16(files["top16"], input_shape=(32, 32, 3))


def test_file_of_another_channel_count(tmp_path):
    weights = nv.random_weights(16, include_top=False, in_channels=1, seed=4)
    path = write_weights(tmp_path / "gray.h5", weights, 16, False)
    with pytest.raises(ValueError, match=r"'block1_conv1'.*\(3, 3, 1, 64\), expected \(3, 3, 3, 64\)"):
        fastvgg.VGG16(path, include_top=False)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_])
def test_integer_weights_in_the_file(files, tmp_path, dtype):
    weights = dict(files["notop16_weights"])
    kernel, bias = weights["block3_conv2"]
    weights["block3_conv2"] = (kernel.astype(dtype), bias)
    path = write_weights(tmp_path / "integer.h5", weights, 16, False)
    with pytest.raises(ValueError, match=rf"'block3_conv2'.*dtype {np.dtype(dtype)}.*floating point"):
        fastvgg.VGG16(path, include_top=False)


def test_vgg19_file_into_vgg16(files):
    with pytest.raises(ValueError, match=r"'block3_conv4'.*does not have.*VGG of this depth"):
        fastvgg.VGG16(files["notop19"], include_top=False)


def test_vgg16_file_into_vgg19(files):
    with pytest.raises(ValueError, match=r"no weights for layer\(s\) \['block3_conv4', 'block4_conv4', 'block5_conv4'\]"):
        fastvgg.VGG19(files["notop16"], include_top=False)


def test_file_with_extra_weighted_layers(files, tmp_path):
    extra = ("block6_conv1", (np.zeros((3, 3, 512, 512), np.float32), np.zeros(512, np.float32)))
    path = tmp_path / "deeper.h5"
    write_weights(path, files["notop16_weights"], 16, False, extra_layers=[extra])
    with pytest.raises(ValueError, match=r"'block6_conv1'.*does not have"):
        fastvgg.VGG16(path, include_top=False)


@pytest.mark.parametrize("fraction", [0.5, 0.99])
def test_truncated_file(files, tmp_path, fraction):
    data = Path(files["notop16"]).read_bytes()
    path = tmp_path / "truncated.h5"
    path.write_bytes(data[: int(len(data) * fraction)])
    model = fastvgg.VGG16(None, include_top=False, seed=5)
    before = snapshot(model)
    with pytest.raises((ValueError, OSError), match=r"(?i)truncated|HDF5|read"):
        model.load_weights(path)
    assert_weights_unchanged(model, before)


# A failed load must leave the model as it was ---------------------------------------------------
def _wrong_last_kernel_shape(weights):
    kernel, bias = weights["block5_conv3"]
    weights["block5_conv3"] = (kernel[:, :, :, :256], bias)


def _integer_last_kernel(weights):
    kernel, bias = weights["block5_conv3"]
    weights["block5_conv3"] = (kernel.astype(np.int16), bias)


def _missing_last_bias(weights):
    weights["block5_conv3"] = weights["block5_conv3"][:1]


@pytest.mark.parametrize(
    "break_file, message",
    [
        (_wrong_last_kernel_shape, r"'block5_conv3'.*\(3, 3, 512, 256\), expected \(3, 3, 512, 512\)"),
        (_integer_last_kernel, r"'block5_conv3'.*dtype int16"),
        (_missing_last_bias, r"'block5_conv3'.*has 1 weights.*expected 2"),
    ],
    ids=["shape", "dtype", "count"],
)
def test_failed_load_leaves_weights_unchanged(files, tmp_path, break_file, message):
    # The broken layer is the last one, so a loader that wrote layers as it checked them
    # would already have overwritten every other layer.
    weights = dict(files["notop16_weights"])
    break_file(weights)
    path = write_weights(tmp_path / "broken.h5", weights, 16, False)
    model = fastvgg.VGG16(None, include_top=False, seed=6)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.load_weights(path)
    assert_weights_unchanged(model, before)


def test_failed_load_of_the_top_leaves_weights_unchanged(files):
    model = fastvgg.VGG16(None, input_shape=(32, 32, 3), classes=1000, seed=7)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'predictions'"):
        model.load_weights(files["top16"])
    assert_weights_unchanged(model, before)
    # The model still works, with its old weights.
    probabilities = model.predict(np.zeros((1, 32, 32, 3), np.float32))
    assert probabilities.shape == (1, 1000) and np.isfinite(probabilities).all()


# Layers and weights arrays -----------------------------------------------------------------------
def test_get_layer_unknown_name_lists_the_names(free_size_model):
    with pytest.raises(ValueError, match=r"No such layer: 'fc1'.*'block1_conv1'.*'block5_pool'"):
        free_size_model.get_layer("fc1")


@pytest.mark.parametrize("kwargs", [{}, {"name": "block1_conv1", "index": 1}])
def test_get_layer_needs_a_name_or_an_index(free_size_model, kwargs):
    with pytest.raises(ValueError, match=r"either a layer name or a layer index"):
        free_size_model.get_layer(**kwargs)


def test_get_layer_index_out_of_range(free_size_model):
    with pytest.raises(ValueError, match=r"Index 99 is out of range.*19 layers"):
        free_size_model.get_layer(index=99)


def test_set_weights_wrong_count(free_size_model):
    weights = free_size_model.get_weights()
    with pytest.raises(ValueError, match=r"expects 26 weight arrays, got 25"):
        free_size_model.set_weights(weights[:-1])


def test_set_weights_wrong_shape_names_the_layer():
    model = fastvgg.VGG16(None, include_top=False, seed=8)
    layer = model.get_layer("block2_conv1")
    kernel, bias = layer.get_weights()
    with pytest.raises(ValueError, match=r"'block2_conv1'.*expected.*\(3, 3, 64, 128\).*found.*\(3, 3, 128, 64\)"):
        layer.set_weights([kernel.transpose(0, 1, 3, 2), bias])
    with pytest.raises(ValueError, match=r"'block2_conv1' expects 2 weight arrays"):
        layer.set_weights([kernel])


def test_set_weights_integer_array():
    model = fastvgg.VGG16(None, include_top=False, seed=9)
    layer = model.get_layer("block1_conv1")
    kernel, bias = layer.get_weights()
    with pytest.raises(TypeError, match=r"'block1_conv1'.*floating point.*int64"):
        layer.set_weights([kernel.astype(np.int64), bias])


def test_set_num_threads_rejects_bad_values():
    with pytest.raises(TypeError, match=r"expects an int"):
        fastvgg.set_num_threads(2.0)
    with pytest.raises(ValueError, match=r"at least 1"):
        fastvgg.set_num_threads(0)
