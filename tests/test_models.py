"""fastvgg's models against the float64 numpy reference (tests/numpy_vgg.py).

Every model here gets random Glorot weights with non-zero biases, written to a classic
Keras HDF5 file by tests/keras_h5.py (which scrambles the file's creation order), and
its outputs are held against the reference run on the same float32 weights and images.

Tolerances
----------
fastvgg computes in float32, the reference in float64, so the reference is exact for
our purposes and the whole difference is fastvgg's float32 rounding. The probabilistic
rounding-error bound for a float32 dot product of length K (Higham & Mary, SIAM J. Sci.
Comput. 2019) is about sqrt(K) * u, u = 2**-24 = 6.0e-8. Each layer of a ReLU network at
Glorot initialisation roughly preserves the size of an incoming relative error, so the
per-layer bounds add up. For VGG16 the 13 convolutions (K = 9 * C_in) sum to 3.6e-5 and
the three dense layers (K = 25088, 4096, 4096) bring it to 5.3e-5; for VGG19 4.7e-5 and
6.4e-5. ``PARITY_BAR`` = 1e-4, the project's own bar for parity with Keras, is therefore
above what a correct float32 implementation may produce, even in the worst of our cases.
(Blocked and FMA accumulation do much better in practice: Keras float32 measured
~2e-6 relative L2 at block5_pool.) It is also well below what real mistakes cost, measured
on VGG16's block5_pool at 33x47: dropping the bias of block1_conv1, the most diluted one,
moves it by 5.5e-4, dropping block5_conv3's by 0.15, swapping the spatial axes of
block3_conv1's kernel by 0.15; see ``test_parity_bar_would_catch_a_missing_bias``.
"""

from __future__ import annotations

import math
import shutil
import threading
import types

import h5py
import numpy as np
import pytest

import fastvgg
import numpy_vgg as nv
from helpers import BIAS_SCALE, CONSTRUCTORS, dissimilar_images, rel_l2, write_weights

DEPTHS = (16, 19)
# Relative L2 bound for features and logits; derived in the module docstring.
PARITY_BAR = 1e-4
# Softmax outputs lie in [0, 1]; see assert_probabilities_close for why 1e-4 holds.
SOFTMAX_ATOL = 1e-4

# Documented Keras facts: model.count_params() of the full (include_top=True) models.
KERAS_PARAMS_WITH_TOP = {16: 138_357_544, 19: 143_667_240}

# A non-default top: 64x96 leaves a 2x3 grid at block5_pool, so a flatten that mixed up
# height and width would change fc1's input, and 7 classes cannot be mistaken for 1000.
SMALL_TOP_SHAPE = (64, 96, 3)
SMALL_TOP_CLASSES = 7


# Helpers ----------------------------------------------------------------------------------
def assert_matches_reference(actual: np.ndarray, expected: np.ndarray, bound: float = PARITY_BAR) -> None:
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    # ReLU zeroing (nearly) everything would make any comparison vacuous.
    assert np.count_nonzero(expected) > 0.1 * expected.size
    error = rel_l2(actual, expected)
    assert error < bound, f"relative L2 error {error:.3g} exceeds {bound:.3g}"


def assert_probabilities_close(actual: np.ndarray, expected: np.ndarray, expected_logits: np.ndarray) -> None:
    """Softmax outputs against the reference's.

    Softmax's derivative gives dp_i = p_i * (dz_i - sum_j p_j dz_j), so |dp_i| <= 2 p_i max|dz|.
    Hence the absolute error is at most 2 max|dz| and each row's relative L2 error at most
    2 max|dz| <= 2 ||dz||_2 <= 2 * PARITY_BAR * ||z||_2 when the logits z meet the parity bar.
    The absolute check is the project's 1e-4 bar (met whenever max|dz| <= 5e-5). With random
    weights every probability is only ~1e-3, so it alone would miss e.g. a dropped predictions
    bias (1.3e-4 absolute, but 3e-2 relative); the relative check, derived per row from the
    reference logits (norm ~13, bound ~3e-3), catches that.
    """
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual.sum(axis=-1), 1.0, rtol=0, atol=1e-5)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=SOFTMAX_ATOL)
    for row, (got, want, logits) in enumerate(zip(actual, expected, expected_logits)):
        bound = 2 * PARITY_BAR * np.linalg.norm(logits)
        assert rel_l2(got, want) < bound, f"row {row}: relative L2 error {rel_l2(got, want):.3g} > {bound:.3g}"


def weights_in_model_order(weights: nv.Weights, depth: int, include_top: bool) -> list:
    """The flat list ``Model.set_weights`` takes: kernel, bias of every weighted layer in order."""
    return [array for name in nv.layer_names(depth, include_top) if name in weights for array in weights[name]]


def conv_base_params(depth: int, in_channels: int = 3) -> int:
    """Parameter count of the convolutional base, from the architecture alone."""
    total, channels = 0, in_channels
    for _, filters in nv.conv_layer_specs(depth):
        total += 3 * 3 * channels * filters + filters
        channels = filters
    return total


# Fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=DEPTHS, ids=lambda d: f"vgg{d}")
def top224(request, tmp_path_factory):
    """The full model at 224x224, from one file: the expensive case, built once per depth.

    Holds the weights, the file, a batch of two images, the reference's block5_pool, fc2,
    predictions and logits, the top model and a no-top model loaded from the same file.
    """
    depth = request.param
    weights = nv.random_weights(depth, seed=depth, bias_scale=BIAS_SCALE)
    path = write_weights(tmp_path_factory.mktemp("top224") / f"vgg{depth}.h5", weights, depth, True)
    x = dissimilar_images(2, (224, 224), seed=depth)
    ref = nv.forward(x, weights, depth, outputs=["block5_pool", "fc2", "predictions"])
    ref["logits"] = nv.dense(ref["fc2"], *weights["predictions"])
    case = types.SimpleNamespace(
        depth=depth,
        weights=weights,
        path=path,
        x=x,
        ref=ref,
        model=CONSTRUCTORS[depth](path),
        notop=CONSTRUCTORS[depth](path, include_top=False),
    )
    yield case
    # Free ~1.5 GB before the other depth's case is built.
    case.__dict__.clear()


@pytest.fixture(scope="module")
def notop_files(tmp_path_factory):
    """depth -> (weights, path) of a model without its top."""
    directory = tmp_path_factory.mktemp("notop")
    files = {}
    for depth in DEPTHS:
        weights = nv.random_weights(depth, include_top=False, seed=100 + depth, bias_scale=BIAS_SCALE)
        files[depth] = (weights, write_weights(directory / f"vgg{depth}_notop.h5", weights, depth, False))
    return files


@pytest.fixture(scope="module", params=DEPTHS, ids=lambda d: f"vgg{d}")
def small_top(request, tmp_path_factory):
    """A top model with a non-default input shape and class count, in both weight namings."""
    depth = request.param
    weights = nv.random_weights(
        depth, input_hw=SMALL_TOP_SHAPE[:2], classes=SMALL_TOP_CLASSES, seed=200 + depth, bias_scale=BIAS_SCALE
    )
    directory = tmp_path_factory.mktemp("small_top")
    x = dissimilar_images(2, SMALL_TOP_SHAPE[:2], seed=depth)
    ref = nv.forward(x, weights, depth, outputs=["fc2", "predictions"])
    return types.SimpleNamespace(
        depth=depth,
        weights=weights,
        x=x,
        probabilities=ref["predictions"],
        logits=nv.dense(ref["fc2"], *weights["predictions"]),
        tf_keras_path=write_weights(directory / "tf_keras.h5", weights, depth, True, naming="tf_keras"),
        legacy_path=write_weights(
            directory / "legacy.h5", weights, depth, True, naming="legacy2016", creation_order="shuffled", seed=depth
        ),
    )


def small_top_model(case, weights_arg, **kwargs):
    return CONSTRUCTORS[case.depth](weights_arg, input_shape=SMALL_TOP_SHAPE, classes=SMALL_TOP_CLASSES, **kwargs)


# Against the reference: the full model at 224x224 -----------------------------------------------
def test_top224_predictions_match_reference(top224):
    probabilities = top224.model.predict(top224.x)
    assert probabilities.shape == (2, 1000)
    # The two images must be told apart, or a batch mix-up would go unnoticed.
    reference = top224.ref["predictions"]
    row_bound = 2 * PARITY_BAR * np.linalg.norm(top224.ref["logits"], axis=1).max()
    assert rel_l2(reference[1], reference[0]) > 10 * row_bound
    assert_probabilities_close(probabilities, top224.ref["predictions"], top224.ref["logits"])


def test_top224_block5_pool_from_the_full_file(top224):
    # A no-top model takes the convolutional base from a full file and skips its top.
    features = top224.notop.predict(top224.x)
    assert features.shape == (2, 7, 7, 512)
    assert_matches_reference(features, top224.ref["block5_pool"])


def test_top224_fc1_weights_round_trip_exactly(top224):
    # fc1 (25088 x 4096) is packed in slices of rows, the last one partial: every value must
    # come back bit for bit. (All layers are checked on smaller models elsewhere.)
    for name in ("fc1", "predictions"):
        for got, stored in zip(top224.model.get_layer(name).get_weights(), top224.weights[name]):
            assert got.dtype == np.float32 and got.shape == stored.shape
            assert np.array_equal(got, stored), f"{name}: weights differ from the file"


def test_top224_layers_shapes_and_param_counts(top224):
    depth, model, notop = top224.depth, top224.model, top224.notop
    assert [layer.name for layer in model.layers[1:]] == nv.layer_names(depth)
    assert model.layers[0].class_name == "InputLayer"
    assert [layer.name for layer in notop.layers[1:]] == nv.layer_names(depth, include_top=False)
    assert model.input_shape == (None, 224, 224, 3)
    assert model.output_shape == (None, 1000)
    assert notop.input_shape == (None, None, None, 3)
    assert notop.output_shape == (None, None, None, 512)

    assert model.count_params() == KERAS_PARAMS_WITH_TOP[depth]
    # The same total, derived from the architecture: 7x7x512 features into 4096, 4096, 1000.
    dense_params = sum(rows * cols + cols for rows, cols in ((7 * 7 * 512, 4096), (4096, 4096), (4096, 1000)))
    assert conv_base_params(depth) + dense_params == KERAS_PARAMS_WITH_TOP[depth]
    assert notop.count_params() == conv_base_params(depth)


def test_top224_summary_lists_every_layer_and_the_total(top224):
    lines = []
    top224.model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    positions = []
    for name in [top224.model.layers[0].name] + nv.layer_names(top224.depth):
        assert name in text, f"summary does not mention {name}"
        positions.append(text.index(name + " "))
    assert positions == sorted(positions), "summary lists the layers out of order"
    assert f"Total params: {KERAS_PARAMS_WITH_TOP[top224.depth]:,}" in text
    assert top224.model.name in text


# Against the reference: without the top, at sizes that are not multiples of 32 ---------------------
@pytest.mark.parametrize("hw, batch", [((33, 47), 3), ((61, 100), 1)], ids=["33x47-batch3", "61x100-batch1"])
@pytest.mark.parametrize("depth", DEPTHS, ids=lambda d: f"vgg{d}")
def test_notop_odd_sizes_with_every_pooling(notop_files, depth, hw, batch):
    weights, path = notop_files[depth]
    x = dissimilar_images(batch, hw, seed=depth)
    block5_pool = nv.forward(x, weights, depth, include_top=False)
    # Max-pools floor odd sizes: 61x100 -> 30x50 -> ... -> 1x3, 33x47 -> 1x1.
    assert block5_pool.shape == (batch, hw[0] // 32, hw[1] // 32, 512)
    # The global pools are one reduction over block5_pool, exactly as numpy_vgg computes them;
    # taking them from one reference run saves two more runs of the whole network.
    expected = {None: block5_pool, "avg": block5_pool.mean(axis=(1, 2)), "max": block5_pool.max(axis=(1, 2))}
    for pooling, reference in expected.items():
        model = CONSTRUCTORS[depth](path, include_top=False, pooling=pooling)
        assert [layer.name for layer in model.layers[1:]] == nv.layer_names(depth, False, pooling)
        assert_matches_reference(model.predict(x), reference)

    fixed = CONSTRUCTORS[depth](path, include_top=False, input_shape=hw + (3,))
    assert fixed.input_shape == (None,) + hw + (3,)
    assert fixed.output_shape == (None, hw[0] // 32, hw[1] // 32, 512)
    assert_matches_reference(fixed.predict(x), block5_pool)


@pytest.mark.parametrize("precision", ["fast", "highest"])
def test_both_convolution_algorithms_match_the_reference(notop_files, precision):
    # "fast" runs Winograd for every layer with 16 or more input channels, "highest" direct
    # convolution everywhere; both must meet the parity bar, at a size whose rows are not
    # multiples of Winograd's 4x4 tiles.
    weights, path = notop_files[16]
    x = dissimilar_images(2, (70, 45), seed=5)
    model = fastvgg.VGG16(path, include_top=False, precision=precision)
    assert model._executor.precision == precision
    features = model.predict(x)
    assert_matches_reference(features, nv.forward(x, weights, 16, include_top=False))


@pytest.mark.parametrize("channels", [1, 4])
def test_input_channels_other_than_three(channels):
    weights = nv.random_weights(16, include_top=False, in_channels=channels, seed=channels, bias_scale=BIAS_SCALE)
    model = fastvgg.VGG16(None, include_top=False, input_shape=(40, 36, channels))
    model.set_weights(weights_in_model_order(weights, 16, False))
    x = np.random.default_rng(channels).uniform(-120, 135, (2, 40, 36, channels)).astype(np.float32)
    assert_matches_reference(model.predict(x), nv.forward(x, weights, 16, include_top=False))


def test_parity_bar_would_catch_a_missing_bias(notop_files):
    # The tolerance must not be so loose that a real mistake passes. Dropping the bias of the
    # first layer, whose effect the later layers dilute the most, is such a mistake.
    weights, path = notop_files[16]
    x = dissimilar_images(1, (33, 47), seed=16)
    features = fastvgg.VGG16(path, include_top=False).predict(x)
    without_bias = dict(weights)
    kernel, bias = weights["block1_conv1"]
    without_bias["block1_conv1"] = (kernel, np.zeros_like(bias))
    assert rel_l2(features, nv.forward(x, without_bias, 16, include_top=False)) > 3 * PARITY_BAR
    assert rel_l2(features, nv.forward(x, weights, 16, include_top=False)) < PARITY_BAR


# Against the reference: a non-default top -------------------------------------------------------
def test_custom_classes_and_input_shape_with_top(small_top):
    model = small_top_model(small_top, small_top.tf_keras_path)
    assert model.input_shape == (None,) + SMALL_TOP_SHAPE
    assert model.output_shape == (None, SMALL_TOP_CLASSES)
    assert model.get_layer("fc1").get_weights()[0].shape == (2 * 3 * 512, 4096)
    assert_probabilities_close(model.predict(small_top.x), small_top.probabilities, small_top.logits)


def test_logits_from_a_file_and_from_set_weights(small_top):
    from_file = small_top_model(small_top, small_top.tf_keras_path, classifier_activation=None)
    logits = from_file.predict(small_top.x)
    assert_matches_reference(logits, small_top.logits)

    # "linear" is the same as None; weights copied with get_weights/set_weights are the same
    # float32 numbers, and the same kernels then give the same logits bit for bit.
    from_arrays = small_top_model(small_top, None, classifier_activation="linear", seed=0)
    from_arrays.set_weights(from_file.get_weights())
    assert np.array_equal(from_arrays.predict(small_top.x), logits)


def test_both_weight_namings_load_the_same_weights(small_top):
    # The writer creates groups and datasets out of order; the loader must follow the
    # layer_names and weight_names attributes instead. Check the scramble is real.
    expected_order = ["input_1"] + nv.layer_names(small_top.depth)
    for path in (small_top.tf_keras_path, small_top.legacy_path):
        with h5py.File(path, "r") as f:
            assert [name for name in f if name in expected_order] != expected_order

    tf_keras_model = small_top_model(small_top, small_top.tf_keras_path)
    legacy_model = small_top_model(small_top, small_top.legacy_path)
    for name, arrays in small_top.weights.items():
        for from_tf_keras, from_legacy, stored in zip(
            tf_keras_model.get_layer(name).get_weights(), legacy_model.get_layer(name).get_weights(), arrays
        ):
            assert np.array_equal(from_tf_keras, stored), f"{name}: tf_keras file loaded wrongly"
            assert np.array_equal(from_legacy, stored), f"{name}: legacy2016 file loaded wrongly"
    assert np.array_equal(tf_keras_model.predict(small_top.x), legacy_model.predict(small_top.x))


def test_whole_model_file_layout(notop_files, tmp_path):
    # model.save("x.h5") nests the weights layout under a 'model_weights' group.
    weights, path = notop_files[16]
    whole = tmp_path / "whole_model.h5"
    with h5py.File(path, "r") as source, h5py.File(whole, "w") as target:
        nested = target.create_group("model_weights")
        for key, value in source.attrs.items():
            nested.attrs[key] = value
        for name in source:
            source.copy(source[name], nested, name=name)
        target.attrs["model_config"] = "{}"
    model = fastvgg.VGG16(whole, include_top=False)
    for name, arrays in weights.items():
        for got, stored in zip(model.get_layer(name).get_weights(), arrays):
            assert np.array_equal(got, stored), name


def test_layer_names_split_over_several_attributes(notop_files, tmp_path):
    # Keras splits a list attribute over 'layer_names0', 'layer_names1', ... when it would
    # exceed HDF5's 64 KB object header limit.
    weights, path = notop_files[16]
    split = tmp_path / "split.h5"
    shutil.copyfile(path, split)
    with h5py.File(split, "r+") as f:
        names = f.attrs["layer_names"]
        del f.attrs["layer_names"]
        for part, chunk in enumerate(np.array_split(names, 3)):
            f.attrs[f"layer_names{part}"] = chunk
    model = fastvgg.VGG16(split, include_top=False)
    for name, arrays in weights.items():
        for got, stored in zip(model.get_layer(name).get_weights(), arrays):
            assert np.array_equal(got, stored), name


def test_float16_and_float64_datasets_load_as_float32(notop_files, tmp_path):
    # Keras saves weights in the model's dtype; other float widths convert on loading.
    weights = dict(notop_files[16][0])
    kernel, bias = weights["block1_conv1"]
    weights["block1_conv1"] = (kernel.astype(np.float16), bias.astype(np.float16))
    kernel, bias = weights["block4_conv2"]
    high_precision = kernel.astype(np.float64) + 1e-12  # not representable in float32
    weights["block4_conv2"] = (high_precision, bias.astype(np.float64))
    model = fastvgg.VGG16(write_weights(tmp_path / "mixed.h5", weights, 16, False), include_top=False)
    for name in ("block1_conv1", "block4_conv2"):
        for got, stored in zip(model.get_layer(name).get_weights(), weights[name]):
            assert got.dtype == np.float32
            # float16 -> float32 is exact; float64 -> float32 rounds to nearest, as numpy does.
            assert np.array_equal(got, stored.astype(np.float32)), name


# predict: inputs of any dtype and layout, batching ------------------------------------------------
@pytest.fixture(scope="module")
def notop16(notop_files):
    return fastvgg.VGG16(notop_files[16][1], include_top=False)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64, np.float16, np.float64])
def test_predict_accepts_any_numeric_dtype(notop16, dtype):
    # Integer pixel values 0..255 are exact in every one of these dtypes, so each must give
    # exactly what the same values in float32 give.
    pixels = np.random.default_rng(1).integers(0, 256, (2, 36, 40, 3))
    expected = notop16.predict(pixels.astype(np.float32))
    result = notop16.predict(pixels.astype(dtype))
    assert result.dtype == np.float32 and result.shape == (2, 1, 1, 512)
    assert np.array_equal(result, expected)


def test_predict_float64_input_is_rounded_to_float32(notop16):
    x = np.random.default_rng(2).uniform(-120, 135, (2, 36, 40, 3))
    assert np.array_equal(notop16.predict(x), notop16.predict(x.astype(np.float32)))


@pytest.mark.parametrize(
    "make_view",
    [
        lambda x: x[:, ::-1],  # flipped rows: negative stride
        lambda x: x[..., ::-1],  # RGB -> BGR: negative stride on the innermost axis
        lambda x: np.asfortranarray(x),
        lambda x: x[:, :, ::2],  # every other column
        lambda x: x[::2],  # every other image
        lambda x: np.moveaxis(np.moveaxis(x, 3, 0).copy(), 0, 3),  # channels-first memory
    ],
    ids=["rows-reversed", "channels-reversed", "fortran", "strided-columns", "strided-batch", "transposed-memory"],
)
def test_predict_non_contiguous_input(notop16, make_view):
    base = dissimilar_images(4, (64, 80), seed=3)
    original = base.copy()
    view = make_view(base)
    assert not view.flags.c_contiguous
    result = notop16.predict(view)
    assert np.array_equal(result, notop16.predict(np.ascontiguousarray(view)))
    assert np.array_equal(base, original), "predict modified its input"


def test_predict_read_only_input_is_not_modified(notop16):
    x = dissimilar_images(2, (40, 40), seed=4)
    original = x.copy()
    x.flags.writeable = False
    result = notop16.predict(x)
    assert result.shape == (2, 1, 1, 512)
    assert np.array_equal(x, original)


def test_predict_in_chunks_equals_one_batch():
    # An image's numbers do not depend on which other images share its chunk: the kernels
    # reduce within one image (convolutions) or one row (dense layers), in an order that
    # does not depend on the batch size, so chunking must not change a single bit.
    model = fastvgg.VGG16(None, input_shape=(32, 32, 3), classes=10, seed=0)
    x = dissimilar_images(5, (32, 32), seed=6)
    whole = model.predict(x, batch_size=5)
    assert whole.dtype == np.float32 and whole.shape == (5, 10)
    for batch_size in (1, 2, 32, np.int64(2)):
        assert np.array_equal(model.predict(x, batch_size=batch_size), whole), f"batch_size={batch_size!r}"
    # The default batch_size (32) covers the whole batch at once.
    assert np.array_equal(model.predict(x), whole)


def test_no_state_leaks_between_calls(notop16):
    # Scratch buffers are reused across calls; poison them with NaN, infinities and a larger
    # image, and the next clean call must give exactly what it gave before.
    x = dissimilar_images(2, (40, 40), seed=7)
    clean = notop16.predict(x)
    poisoned = x.copy()
    poisoned[:, 5:9, 5:30] = np.nan
    assert np.isnan(notop16.predict(poisoned)).any()
    notop16.predict(np.full((1, 77, 91, 3), np.inf, np.float32))
    assert np.array_equal(notop16.predict(x), clean)


def test_concurrent_predict_from_python_threads(notop16):
    # predict releases the GIL, so threads really run together and must not share scratch.
    inputs = [dissimilar_images(2, (40, 40), seed=seed) for seed in range(3)]
    expected = [notop16.predict(x) for x in inputs]
    mismatches = []

    def work(worker):
        for _ in range(2):
            for i, x in enumerate(inputs):
                if not np.array_equal(notop16.predict(x), expected[i]):
                    mismatches.append((worker, i))

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mismatches == []


# API: weights, initialisation, shapes -----------------------------------------------------------
@pytest.mark.parametrize("depth", DEPTHS, ids=lambda d: f"vgg{d}")
@pytest.mark.parametrize("pooling", [None, "avg", "max"])
def test_layer_names_and_shapes_without_top(depth, pooling):
    model = CONSTRUCTORS[depth](None, include_top=False, pooling=pooling, seed=0)
    assert [layer.name for layer in model.layers[1:]] == nv.layer_names(depth, False, pooling)
    assert model.input_shape == (None, None, None, 3)
    assert model.output_shape == ((None, None, None, 512) if pooling is None else (None, 512))
    # Pooling has no weights: the count is the convolutional base's.
    assert model.count_params() == conv_base_params(depth)
    assert model.name == f"vgg{depth}"


def test_count_params_with_a_small_top():
    model = fastvgg.VGG19(None, input_shape=(32, 32, 3), classes=10, seed=0)
    # One 1x1x512 cell feeds fc1.
    dense_params = (512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)
    assert model.count_params() == conv_base_params(19) + dense_params
    assert model.output_shape == (None, 10)


def test_random_init_is_glorot_uniform_with_zero_biases():
    model = fastvgg.VGG16(None, input_shape=(32, 32, 3), classes=10, seed=0)
    weighted = [layer for layer in model.layers if layer.weight_shapes()]
    assert len(weighted) == 16
    for layer in weighted:
        kernel, bias = layer.get_weights()
        receptive = int(np.prod(kernel.shape[:-2]))
        fan_in, fan_out = receptive * kernel.shape[-2], receptive * kernel.shape[-1]
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        largest = float(np.abs(kernel).max())
        # float32 rounding of the scaled draw may add one ulp.
        assert largest <= limit * (1 + 1e-6), f"{layer.name}: |w| up to {largest}, limit {limit}"
        # The smallest kernel has 1728 draws; all of them below 0.99 * limit has odds 3e-8.
        assert largest > 0.99 * limit, f"{layer.name}: draws do not reach the Glorot limit"
        # Uniform(-limit, limit) has mean 0 and standard deviation limit / sqrt(3).
        assert abs(float(kernel.mean())) < 0.05 * limit
        assert float(kernel.std()) == pytest.approx(limit / math.sqrt(3), rel=0.05)
        assert bias.dtype == np.float32 and not bias.any(), f"{layer.name}: biases are not zero"


def test_seed_makes_random_init_reproducible():
    first = fastvgg.VGG16(None, include_top=False, seed=1).get_weights()
    again = fastvgg.VGG16(None, include_top=False, seed=1).get_weights()
    other = fastvgg.VGG16(None, include_top=False, seed=2).get_weights()
    assert len(first) == 26
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # Biases are zero whatever the seed; every kernel must differ.
    assert all(not np.array_equal(a, b) for a, b in zip(first[::2], other[::2]))


def test_random_model_predicts_probabilities():
    model = fastvgg.VGG16(None, input_shape=(32, 32, 3), classes=10, seed=0)
    probabilities = model.predict(dissimilar_images(2, (32, 32)))
    assert probabilities.shape == (2, 10) and probabilities.dtype == np.float32
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-5)


def test_softmax_is_stable_for_large_logits():
    # Logits in the thousands overflow exp() in float32 unless the row maximum is subtracted
    # first; the probabilities must still be finite and equal softmax of the model's logits.
    probabilities_model = fastvgg.VGG16(None, input_shape=(32, 32, 3), classes=5, seed=0)
    logits_model = fastvgg.VGG16(None, input_shape=(32, 32, 3), classes=5, seed=0, classifier_activation=None)
    kernel, _ = probabilities_model.get_layer("predictions").get_weights()
    large = [kernel * 1000, np.array([0, 3000, -3000, 1, 0], np.float32)]
    for model in (probabilities_model, logits_model):
        model.get_layer("predictions").set_weights(large)
    x = dissimilar_images(2, (32, 32), seed=10)
    logits = logits_model.predict(x)
    assert np.abs(logits).max() > 1000
    probabilities = probabilities_model.predict(x)
    assert np.isfinite(probabilities).all()
    # Both models hold the same weights, so the logits are the same float32 numbers; only
    # float32 rounding of the softmax itself separates the two.
    np.testing.assert_allclose(probabilities, nv.softmax(logits.astype(np.float64)), rtol=0, atol=1e-6)


def test_set_weights_then_get_weights_round_trip():
    model = fastvgg.VGG16(None, input_shape=(32, 32, 3), classes=5, seed=0)
    weights = nv.random_weights(16, input_hw=(32, 32), classes=5, seed=7, bias_scale=BIAS_SCALE)
    flat = weights_in_model_order(weights, 16, True)
    model.set_weights(flat)
    got = model.get_weights()
    assert len(got) == len(flat) == 32
    for got_array, given in zip(got, flat):
        assert got_array.dtype == np.float32 and np.array_equal(got_array, given)

    # One layer at a time, from float64 and non-contiguous arrays: stored as float32.
    kernel = np.asfortranarray(np.random.default_rng(8).uniform(-0.1, 0.1, (3, 3, 3, 64)))
    bias = np.linspace(-0.05, 0.05, 128)[::2]
    model.get_layer("block1_conv1").set_weights([kernel, bias])
    got_kernel, got_bias = model.get_layer("block1_conv1").get_weights()
    assert np.array_equal(got_kernel, kernel.astype(np.float32))
    assert np.array_equal(got_bias, bias.astype(np.float32))

    dense_kernel = np.random.default_rng(9).uniform(-0.1, 0.1, (4096, 5)).astype(np.float32)
    model.get_layer("predictions").set_weights([dense_kernel, np.arange(5, dtype=np.float32)])
    got_kernel, got_bias = model.get_layer("predictions").get_weights()
    assert np.array_equal(got_kernel, dense_kernel) and np.array_equal(got_bias, np.arange(5))


def test_get_layer_by_name_and_index(notop16):
    assert notop16.get_layer("block3_conv2").name == "block3_conv2"
    assert notop16.get_layer(index=1).name == "block1_conv1"
    assert notop16.get_layer(index=-1).name == "block5_pool"
    assert notop16.get_layer("block3_pool").get_weights() == []
    assert notop16.get_layer("block3_conv2").output_shape == (None, None, None, 256)


def test_threads_setting_round_trips_and_keeps_results(notop16):
    x = dissimilar_images(2, (40, 40), seed=9)
    before = fastvgg.get_num_threads()
    expected = notop16.predict(x)
    try:
        fastvgg.set_num_threads(1)
        assert fastvgg.get_num_threads() == 1
        single = notop16.predict(x)
    finally:
        fastvgg.set_num_threads(before)
    assert fastvgg.get_num_threads() == before
    # Threads split the work by output rows and channel groups; no sum is shared between
    # threads, so the thread count must not change a single bit.
    assert np.array_equal(single, expected)
