"""Checks of the numpy VGG reference (tests/numpy_vgg.py).

The reference is the oracle for fastvgg, so it is itself checked against real
Keras (tf_keras) here. Those tests skip, with the reason printed, only where
TensorFlow cannot be imported; a missing tf_keras beside it is an error. The
self-consistency tests at the top need only numpy.
"""

from __future__ import annotations

import numpy as np
import pytest

import numpy_vgg as nv
from helpers import BIAS_SCALE, dissimilar_images, import_tf_keras, rel_l2

DEPTHS = (16, 19)
# An odd, non-square size: 200 and 232 are not multiples of 32, so flooring
# max-pools drop trailing rows/cols (200 -> 100 -> 50 -> 25 -> 12 -> 6) and
# H/W mix-ups would change the result's shape or values.
ODD_HW = (200, 232)


def two_images(hw, seed: int = 0) -> np.ndarray:
    """A white-noise image and a smooth one: every output's two rows differ."""
    return dissimilar_images(2, hw, seed)


# --------------------------------------------------------------------------
# Self-consistency (numpy only)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("depth, n_convs", [(16, 13), (19, 16)])
def test_layer_names_structure(depth, n_convs):
    names = nv.layer_names(depth)
    assert sum("_conv" in n for n in names) == n_convs
    assert [n for n in names if n.endswith("_pool")] == [f"block{b}_pool" for b in range(1, 6)]
    assert names[-4:] == ["flatten", "fc1", "fc2", "predictions"]
    assert nv.layer_names(depth, include_top=False)[-1] == "block5_pool"
    assert nv.layer_names(depth, include_top=False, pooling="avg")[-1] == "global_average_pooling2d"
    assert nv.layer_names(depth, include_top=False, pooling="max")[-1] == "global_max_pooling2d"
    # Keras ignores `pooling` when the classifier head is present.
    assert nv.layer_names(depth, include_top=True, pooling="avg") == names


def test_random_weights_follow_keras_init():
    weights = nv.random_weights(16, input_hw=(64, 96), classes=10)
    kernel, bias = weights["block2_conv1"]
    assert kernel.shape == (3, 3, 64, 128) and kernel.dtype == np.float32
    conv_limit = np.sqrt(6 / (9 * 64 + 9 * 128))
    assert np.abs(kernel).max() <= conv_limit
    # 73k uniform draws: the extremes land within 0.1% of the limit.
    assert np.abs(kernel).max() > 0.999 * conv_limit
    assert not bias.any(), "Keras initialises biases to zero"

    fc1_kernel, _ = weights["fc1"]
    assert fc1_kernel.shape == ((64 // 32) * (96 // 32) * 512, 4096)
    assert weights["predictions"][0].shape == (4096, 10)
    assert np.abs(fc1_kernel).max() <= np.sqrt(6 / (fc1_kernel.shape[0] + 4096))

    biased = nv.random_weights(16, include_top=False, bias_scale=BIAS_SCALE)
    assert set(biased) == {n for n in nv.layer_names(16) if "_conv" in n}
    b = biased["block5_conv3"][1]
    assert 0 < np.abs(b).max() <= BIAS_SCALE and b.dtype == np.float32


def test_random_weights_are_seeded():
    a = nv.random_weights(16, include_top=False, seed=1, bias_scale=BIAS_SCALE)
    b = nv.random_weights(16, include_top=False, seed=1, bias_scale=BIAS_SCALE)
    c = nv.random_weights(16, include_top=False, seed=2, bias_scale=BIAS_SCALE)
    assert all(np.array_equal(a[n][i], b[n][i]) for n in a for i in range(2))
    assert not np.array_equal(a["block1_conv1"][0], c["block1_conv1"][0])


def test_conv_matches_direct_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 4, 3))
    kernel = rng.normal(size=(3, 3, 3, 6))
    bias = rng.normal(size=6)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros((2, 5, 4, 6))
    for i in range(5):
        for j in range(4):
            patch = padded[:, i : i + 3, j : j + 3, :]
            expected[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, kernel) + bias
    # Both sides are float64 sums of 27 terms in different orders.
    np.testing.assert_allclose(nv.conv3x3_same_relu(x, kernel, bias), np.maximum(expected, 0), rtol=1e-12, atol=1e-12)


def test_max_pool_floors_odd_sizes():
    x = np.arange(2 * 5 * 7 * 1, dtype=np.float64).reshape(2, 5, 7, 1)
    pooled = nv.max_pool_2x2(x)
    assert pooled.shape == (2, 2, 3, 1)
    # Values increase along rows and columns, so each window's max is its
    # bottom-right element.
    np.testing.assert_array_equal(pooled, x[:, 1:4:2, 1:6:2, :])


def test_forward_outputs_and_activation():
    hw = (64, 96)
    weights = nv.random_weights(16, input_hw=hw, classes=7, bias_scale=BIAS_SCALE)
    x = two_images(hw)
    probs = nv.forward(x, weights, 16)
    assert probs.shape == (2, 7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)

    logits = nv.forward(x, weights, 16, classifier_activation=None)
    np.testing.assert_allclose(nv.softmax(logits), probs, rtol=1e-12)
    np.testing.assert_array_equal(nv.forward(x, weights, 16, classifier_activation="linear"), logits)

    partial = nv.forward(x, weights, 16, outputs=["block3_pool", "block1_conv1"])
    assert set(partial) == {"block3_pool", "block1_conv1"}
    assert partial["block1_conv1"].shape == (2, 64, 96, 64)
    assert partial["block3_pool"].shape == (2, 8, 12, 256)
    assert partial["block3_pool"].dtype == np.float64

    with pytest.raises(ValueError, match="unknown layer"):
        nv.forward(x, weights, 16, outputs=["global_average_pooling2d"])


def test_softmax_is_stable_for_large_logits():
    probs = nv.softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0]], atol=1e-300)


# --------------------------------------------------------------------------
# Against real Keras
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_keras():
    # Imported lazily so that collecting this file, or running only the
    # numpy tests, does not pay TensorFlow's multi-second import.
    # A missing tf_keras beside a working TensorFlow is an error, not a skip: the yardstick
    # of every parity test would otherwise go unchecked without anyone noticing.
    return import_tf_keras()


def build_keras_vgg(tf_keras, depth, include_top, pooling, hw):
    """A Keras VGG with our random weights, plus those weights."""
    # Unnamed layers (the global pools) get a session-unique suffix
    # ("_1", "_2", ...) unless the session is fresh.
    tf_keras.backend.clear_session()
    constructor = {16: tf_keras.applications.VGG16, 19: tf_keras.applications.VGG19}[depth]
    model = constructor(weights=None, include_top=include_top, pooling=pooling, input_shape=(*hw, 3))
    weights = nv.random_weights(depth, include_top, input_hw=hw, seed=depth, bias_scale=BIAS_SCALE)

    assert [layer.name for layer in model.layers[1:]] == nv.layer_names(depth, include_top, pooling)
    assert {layer.name for layer in model.layers if layer.weights} == set(weights)
    for name, arrays in weights.items():
        # set_weights raises if any shape differs from what Keras built.
        model.get_layer(name).set_weights(list(arrays))
    return model, weights


def keras_outputs(tf_keras, model, x, names):
    probe = tf_keras.Model(model.input, [model.get_layer(n).output for n in names])
    return dict(zip(names, (t.numpy() for t in probe(x, training=False))))


@pytest.fixture(scope="module", params=DEPTHS, ids=lambda d: f"vgg{d}")
def top_case(request, tf_keras):
    depth = request.param
    hw = (224, 224)
    model, weights = build_keras_vgg(tf_keras, depth, True, None, hw)
    x = two_images(hw)
    names = ["block5_pool", "fc2", "predictions"]
    return depth, keras_outputs(tf_keras, model, x, names), nv.forward(x, weights, depth, outputs=names)


def test_top_block5_pool_matches_keras(top_case):
    depth, keras_out, ref = top_case
    expected = ref["block5_pool"]
    assert keras_out["block5_pool"].shape == expected.shape == (2, 7, 7, 512)
    # Guard against a vacuous match: ReLU must not have zeroed everything.
    assert np.count_nonzero(expected) > 0.1 * expected.size
    # Keras computes in float32 and its error grows ~1.5e-7 per conv layer,
    # reaching ~2e-6 relative L2 here; 1e-5 leaves 5x headroom yet is far
    # below the effect of one layer's bias going missing (~4e-3) or of
    # swapped kernel H/W (~0.5).
    assert rel_l2(keras_out["block5_pool"], expected) < 1e-5


def test_top_fc2_matches_keras(top_case):
    depth, keras_out, ref = top_case
    # Same float32-vs-float64 budget as block5_pool, three dense layers later.
    assert rel_l2(keras_out["fc2"], ref["fc2"]) < 1e-5


def test_top_predictions_match_keras(top_case):
    depth, keras_out, ref = top_case
    expected = ref["predictions"]
    assert keras_out["predictions"].shape == expected.shape == (2, 1000)
    # The two images must give different predictions, or a batch mix-up
    # would go unnoticed.
    assert np.abs(expected[0] - expected[1]).max() > 1e-5
    # Probabilities are only ~2e-4..4e-3 with random weights, so 1e-5
    # absolute (observed error < 1e-8) is loose; the log check is the tight one.
    np.testing.assert_allclose(keras_out["predictions"], expected, rtol=0, atol=1e-5)
    # log p = logit - logsumexp, so this bounds the relative error of every
    # probability; observed <= 3e-6, consistent with float32 logits.
    np.testing.assert_allclose(np.log(keras_out["predictions"]), np.log(expected), rtol=0, atol=1e-4)


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("depth", DEPTHS)
def test_global_pooling_matches_keras_at_odd_size(tf_keras, depth, pooling):
    model, weights = build_keras_vgg(tf_keras, depth, False, pooling, ODD_HW)
    x = two_images(ODD_HW, seed=1)
    pool_name = nv.GLOBAL_POOL_LAYERS[pooling]
    names = ["block5_pool", pool_name]
    keras_out = keras_outputs(tf_keras, model, x, names)
    ref = nv.forward(x, weights, depth, include_top=False, pooling=pooling, outputs=names)

    assert ref["block5_pool"].shape == keras_out["block5_pool"].shape == (2, 6, 7, 512)
    assert ref[pool_name].shape == keras_out[pool_name].shape == (2, 512)
    assert np.count_nonzero(ref[pool_name]) > 0.1 * ref[pool_name].size
    # Same float32 accumulation budget as the 224x224 checks above.
    assert rel_l2(keras_out["block5_pool"], ref["block5_pool"]) < 1e-5
    assert rel_l2(keras_out[pool_name], ref[pool_name]) < 1e-5


def test_flatten_order_matches_keras_on_non_square_grid(tf_keras):
    # At 224x224 block5_pool is a square 7x7 grid, where an (h, w, c) vs
    # (w, h, c) flatten mix-up can hide in symmetric data; a 2x3 grid cannot.
    hw = (64, 96)
    model, weights = build_keras_vgg(tf_keras, 16, True, None, hw)
    x = two_images(hw, seed=2)
    names = ["fc1", "predictions"]
    keras_out = keras_outputs(tf_keras, model, x, names)
    ref = nv.forward(x, weights, 16, outputs=names)
    assert weights["fc1"][0].shape[0] == 2 * 3 * 512
    # Same float32 budget as the 224x224 checks.
    assert rel_l2(keras_out["fc1"], ref["fc1"]) < 1e-5
    np.testing.assert_allclose(np.log(keras_out["predictions"]), np.log(ref["predictions"]), rtol=0, atol=1e-4)
