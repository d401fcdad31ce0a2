"""Hostile inputs to predict: what tests/test_errors.py and tests/test_models.py leave out.

tests/test_errors.py checks that each bad input raises the right exception naming what is
wrong; here the messages must also say what to do about it. Non-finite pixels are not an
error: fastvgg's documented choice is that they propagate, so a NaN pixel gives NaN in every
output it reaches instead of a plausible finite number. That is checked against the float64
numpy VGG (tests/numpy_vgg.py), whose np.maximum and max-reductions propagate NaN, and at the
pooling kernels on every instruction set. (TensorFlow's MaxPool drops NaN, so Keras itself
returns finite numbers there; fastvgg deliberately does not follow it.)
"""

from __future__ import annotations

import gc
import re
import tracemalloc

import numpy as np
import pytest

import fastvgg
import numpy_vgg as nv
from fastvgg import _core
from helpers import noise_images
from kernel_checks import ISAS, conv3x3_float64, random_array


@pytest.fixture(scope="module")
def model32():
    return fastvgg.VGG16(None, include_top=False, seed=0)


def model_weights(model):
    return {layer.name: tuple(layer.get_weights()) for layer in model.layers if layer.weight_shapes()}


# Messages say what to do -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, remedy",
    [
        ((1, 32, 32, 1), r"np\.repeat\(x, 3, axis=-1\)"),
        ((1, 32, 32, 4), r"Drop the alpha channel.*x\[\.\.\., :3\]"),
        ((2, 3, 40, 40), r"channels-first.*x\.transpose\(0, 2, 3, 1\)"),
        ((1, 32, 32, 2), r"input_shape=\(height, width, 2\)"),
    ],
    ids=["gray", "rgba", "nchw", "two-channels"],
)
def test_wrong_channel_count_says_what_to_do(model32, shape, remedy):
    with pytest.raises(ValueError, match=r"axis 3 differs.*" + remedy):
        model32.predict(np.zeros(shape, np.float32))


def test_channels_first_batch_for_a_fixed_size_model():
    model = fastvgg.VGG16(None, include_top=False, input_shape=(32, 48, 3), seed=0)
    with pytest.raises(ValueError, match=r"axis 1 differs.*channels-first.*transpose"):
        model.predict(np.zeros((1, 3, 32, 48), np.float32))
    with pytest.raises(ValueError, match=r"axis 2 differs.*Resize the images.*input_shape"):
        model.predict(np.zeros((1, 32, 40, 3), np.float32))


@pytest.mark.parametrize("shape", [(1, 31, 64, 3), (3, 64, 1, 3)])
def test_small_images_say_to_resize_or_pad(model32, shape):
    with pytest.raises(ValueError, match=r"at least 32x32.*Resize or pad"):
        model32.predict(np.zeros(shape, np.float32))


def test_too_small_for_a_top_is_refused_at_construction():
    # A top needs a fixed shape, so the size is checked once, when the model is built.
    with pytest.raises(ValueError, match=r"at least 32x32.*\(32, 20, 3\)"):
        fastvgg.VGG16(None, include_top=True, input_shape=(32, 20, 3))


def test_empty_batch_says_to_pass_an_image(model32):
    with pytest.raises(ValueError, match=r"empty batch.*pass at least one image"):
        model32.predict(np.zeros((0, 40, 40, 3), np.uint8))


def test_ragged_list_of_images(model32):
    images = [np.zeros((32, 32, 3), np.float32), np.zeros((40, 32, 3), np.float32)]
    with pytest.raises(ValueError, match=r"cannot be read as one array.*same size"):
        model32.predict(images)


def test_masked_array_is_refused(model32):
    x = np.ma.masked_greater(noise_images(1, (32, 32)), 100.0)
    with pytest.raises(TypeError, match=r"masked arrays.*x\.filled"):
        model32.predict(x)


@pytest.mark.parametrize("value", [None, "cat.jpg", [["a"]]], ids=["None", "path", "strings"])
def test_things_that_are_not_images(model32, value):
    with pytest.raises((TypeError, ValueError), match=r"numeric array|4-D batch"):
        model32.predict(value)


# Memory layouts that tests/test_models.py does not cover: results equal the contiguous copy ------
def _misaligned(x):
    raw = np.zeros(x.nbytes + 1, np.uint8)
    view = np.frombuffer(raw.data, dtype=np.float32, offset=1, count=x.size).reshape(x.shape)
    raw[1:] = np.frombuffer(x.tobytes(), np.uint8)
    assert not view.flags.aligned
    return view


def _memmap(x, tmp_path):
    mapped = np.memmap(tmp_path / "images.f32", dtype=np.float32, mode="w+", shape=x.shape)
    mapped[:] = x
    mapped.flush()
    return np.memmap(tmp_path / "images.f32", dtype=np.float32, mode="r", shape=x.shape)


@pytest.mark.parametrize(
    "make_input",
    [
        lambda x, _: np.broadcast_to(x[:1], x.shape),  # zero stride on the batch axis, read-only
        lambda x, _: np.lib.stride_tricks.as_strided(x, shape=(3,) + x.shape[1:], strides=(x.strides[1] * 2,) + x.strides[1:]),
        lambda x, _: _misaligned(x),
        lambda x, _: x.astype(">f4"),  # big-endian
        lambda x, tmp_path: _memmap(x, tmp_path),
        lambda x, _: x.tolist(),
        lambda x, _: np.ascontiguousarray(np.transpose(x, (1, 2, 3, 0))).transpose(3, 0, 1, 2)[:, ::-1, ::-1, ::-1],
    ],
    ids=["broadcast", "overlapping-rows", "misaligned", "big-endian", "memmap", "nested-lists", "every-axis-reversed"],
)
def test_unusual_memory_gives_the_contiguous_result(model32, tmp_path, make_input):
    x = noise_images(3, (36, 33), seed=1)
    given = make_input(x, tmp_path)
    expected = model32.predict(np.ascontiguousarray(np.asarray(given), dtype=np.float32))
    result = model32.predict(given)
    assert result.dtype == np.float32 and result.shape == expected.shape
    assert np.array_equal(result, expected)


# Non-finite pixels propagate ----------------------------------------------------------------------
def _kind(a):
    """0 finite, 1 +inf, 2 -inf, 3 NaN: the category is independent of summation order."""
    return np.select([np.isnan(a), np.isposinf(a), np.isneginf(a)], [3, 1, 2], 0)


@pytest.mark.parametrize("isa", ISAS + ["reference"])
def test_max_pool_keeps_nan_from_every_window_position(isa):
    rng = np.random.default_rng(5)
    x = random_array(rng, (2, 6, 11, 33))  # 33 channels: a partial last block; odd width
    # One NaN in some windows, at each of the four positions in turn (a max instruction drops
    # NaN from one of its operands only), plus infinities that must win or lose as numbers.
    for k, (n, oy, ox) in enumerate([(0, 0, 0), (0, 1, 2), (1, 2, 4), (1, 0, 3), (0, 2, 1), (1, 1, 0)]):
        dy, dx = (k // 2) % 2, k % 2
        x[n, 2 * oy + dy, 2 * ox + dx, (7 * k) % 33] = np.nan
    x[0, 1, 1, 5] = np.inf
    x[1, 3, 3, 20] = -np.inf
    x[:, :, 10, :] = np.nan  # the dropped odd column must not leak in
    expected = x[:, :, :10].reshape(2, 3, 2, 5, 2, 33).max(axis=(2, 4))  # numpy's max propagates NaN
    assert np.isnan(expected).sum() == 6
    np.testing.assert_array_equal(_core.testing.max_pool2x2(x, isa), expected)


@pytest.mark.parametrize("isa", ISAS + ["reference"])
@pytest.mark.parametrize("position", [0, 1, 5, 11])
def test_global_pooling_keeps_nan(isa, position):
    x = random_array(np.random.default_rng(position), (2, 3, 4, 20))
    x[0].reshape(12, 20)[position, [3, 17]] = np.nan
    x[1, 0, 0, 4] = np.inf
    for mode, reduce in (("max", np.max), ("avg", np.mean)):
        result = _core.testing.global_pool(x, mode, isa)
        np.testing.assert_array_equal(_kind(result), _kind(reduce(x, axis=(1, 2))), err_msg=mode)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("precision", ["highest", "fast"])
@pytest.mark.parametrize("pixel", [(4, 4), (4, 5), (5, 4), (5, 5)], ids=str)
def test_nan_survives_convolution_and_pooling(isa, precision, pixel):
    """Two convolutions and a pool, as block1 of VGG: the NaN region after the pool must be
    exactly the float64 reference's (with Winograd, a superset: see the fast-model test)."""
    rng = np.random.default_rng(7)
    graph = _core.Graph(3)
    layers = [graph.add_conv3x3(16, "relu"), graph.add_conv3x3(16, "relu")]
    pool = graph.add_max_pool2x2()
    net = _core.CpuExecutor(graph, precision)
    params = []
    for index, cin in zip(layers, (3, 16)):
        kernel, bias = random_array(rng, (3, 3, cin, 16)) * 0.3, random_array(rng, (16,)) * 0.1
        net.set_conv3x3_weights(index, kernel, bias)
        params.append((kernel, bias))
    x = random_array(rng, (1, 12, 14, 3))
    x[0, pixel[0], pixel[1], 1] = np.nan
    with np.errstate(invalid="ignore"):
        h = x.astype(np.float64)
        for kernel, bias in params:
            h = np.maximum(conv3x3_float64(h, kernel, bias), 0.0)
    expected = h.reshape(1, 6, 2, 7, 2, 16).max(axis=(2, 4))
    previous = _core.active_isa()
    try:
        _core.set_isa(isa)
        (pooled,) = net.forward(x, [pool])
    finally:
        _core.set_isa(previous)
    expected_nan = np.isnan(expected)
    assert 0 < expected_nan.sum() < expected.size
    if precision == "highest":
        np.testing.assert_array_equal(np.isnan(pooled), expected_nan)
    else:
        assert np.isnan(pooled[expected_nan]).all()
    assert np.isfinite(pooled[~np.isnan(pooled)]).all()


@pytest.fixture(scope="module")
def notop_models():
    """VGG16 without top, both precisions and every pooling, all with the same weights."""
    base = fastvgg.VGG16(None, include_top=False, seed=3, precision="highest")
    weights = base.get_weights()
    models = {("highest", None): base}
    for precision in ("highest", "fast"):
        for pooling in (None, "max", "avg"):
            if (precision, pooling) not in models:
                model = fastvgg.VGG16(None, include_top=False, pooling=pooling, precision=precision, seed=0)
                model.set_weights(weights)
                models[(precision, pooling)] = model
    return models, model_weights(base)


@pytest.mark.parametrize("precision", ["highest", "fast"])
@pytest.mark.parametrize(
    "pooling, bad", [(None, np.nan), (None, np.inf), (None, -np.inf), ("max", np.nan), ("avg", np.nan)]
)
def test_non_finite_pixel_reaches_the_outputs_it_should(notop_models, precision, pooling, bad):
    models, weights = notop_models
    model = models[(precision, pooling)]
    # 96x128 leaves a 3x4 grid at block5_pool, and a pixel near a corner does not reach all of it.
    x = noise_images(2, (96, 128), seed=4)
    x[0, 3, 5, 1] = bad
    with np.errstate(invalid="ignore"):
        reference = nv.forward(x, weights, 16, include_top=False, pooling=pooling)
    result = model.predict(x)
    reached = ~np.isfinite(reference[0])
    assert reached.any() and (pooling is not None or not reached.all())
    if precision == "highest":
        # Direct convolution multiplies each pixel into exactly its 3x3 neighbours, as the
        # reference does, so NaN, +inf, -inf and finite land on the same outputs.
        np.testing.assert_array_equal(_kind(result[0]), _kind(reference[0]))
    else:
        # Winograd mixes a whole 6x6 tile, so a NaN may spread to outputs the reference keeps
        # finite (never the other way round).
        assert not np.isfinite(result[0][reached]).any()
    # The other image of the batch does not notice.
    assert np.isfinite(result[1]).all()
    assert np.array_equal(result[1:], model.predict(x[1:]))


def test_nan_image_with_the_top_gives_nan_probabilities_only_for_itself():
    model = fastvgg.VGG16(None, input_shape=(32, 32, 3), classes=10, seed=0)
    x = noise_images(3, (32, 32), seed=5)
    x[1, 20, 7, 2] = np.nan
    probabilities = model.predict(x)
    assert np.isnan(probabilities[1]).all()
    # The dense layers run on the whole batch; a NaN row must not touch the others.
    assert np.array_equal(probabilities[[0, 2]], model.predict(x[[0, 2]]))
    assert np.isfinite(probabilities[[0, 2]]).all()


# Large batches stream through in batch_size chunks -------------------------------------------------
def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _page_size()


def _page_size():
    import os

    return os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError as error:
        pytest.skip(f"cannot reset the peak RSS through /proc/self/clear_refs: {error}")


def test_large_batch_allocates_only_chunks_in_python(model32):
    # numpy reports its buffers to tracemalloc. 256 uint8 images turned to float32 all at once
    # would take 3.1 MB; in chunks of 2 the peak is the output plus a few 24 KB chunks.
    x = np.random.default_rng(6).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    model32.predict(x[:2], batch_size=2)  # warm-up: lazily created objects are not the batch's
    gc.collect()
    tracemalloc.start()
    try:
        result = model32.predict(x, batch_size=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full_copy = x.size * 4
    chunk = 2 * 32 * 32 * 3 * 4
    bound = result.nbytes + 8 * chunk + 256 * 1024
    assert bound < full_copy / 2
    assert peak < bound, f"predict held {peak} bytes of numpy memory at once; chunked it needs < {bound}"


def test_large_batch_keeps_the_peak_rss_bounded():
    # With the top, the C++ side keeps two rows of up to 4096 floats per image of a chunk:
    # 256 images at once would take 8 MB there plus the 3.1 MB float32 copy. In chunks of 2
    # the peak should not move by more than a few pages of bookkeeping.
    model = fastvgg.VGG16(None, input_shape=(32, 32, 3), classes=10, seed=0)
    x = np.random.default_rng(7).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    model.predict(x[:4], batch_size=2)  # warm-up: scratch for one chunk exists from here on
    gc.collect()
    _reset_peak_rss()
    before = _rss_bytes()
    model.predict(x, batch_size=2)
    growth = _peak_rss_bytes() - before
    assert growth < 4 * 2**20, f"peak RSS grew by {growth / 2**20:.1f} MB for a chunked batch"
