"""fastvgg against real Keras, the peer it claims to reproduce.

Keras builds VGG16/VGG19 with random weights, saves them with its own
``save_weights`` in the classic HDF5 layout, and fastvgg loads that file. Both
then run the same caffe-preprocessed batch, and the issue's bounds apply:

* softmax predictions within 1e-4 absolute,
* block5_pool features within 1e-4 relative L2,
* top-5 classes identical.

tf_keras (Keras 2) writes the files, since its ``save_weights("x.h5")`` is the
classic layout. Keras 3 reads those same files and is checked too, so fastvgg
is held to the current Keras as well as to the one that wrote the layout.

These tests skip, with the reason printed, only when TensorFlow cannot be
imported; a missing tf_keras or keras beside a working TensorFlow is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import pytest

import fastvgg
import numpy_vgg as nv
from helpers import CONSTRUCTORS, rel_l2

DEPTHS = (16, 19)
# Keras 2 (wrote the files) and Keras 3 (current), compared on the same files.
PEERS = ("tf_keras", "keras3")

# The bounds. Do not loosen them to make a failure pass.
PROBABILITY_ATOL = 1e-4
FEATURE_REL_L2 = 1e-4
TOP_K = 5

BATCH_SIZE = 3
IMAGENET_HW = (224, 224)
# Neither side is a multiple of 32, so the five flooring max-pools drop rows
# and columns (200 -> 6, 264 -> 8) and a height/width mix-up changes results.
ODD_HW = (200, 264)
# block5_pool is a 2x3 grid here: an (h, w, c) versus (w, h, c) flatten gives
# a different fc1 input, which a square 7x7 grid of random data can hide.
SMALL_TOP_HW = (64, 96)
SMALL_TOP_CLASSES = 10

# keras.applications.imagenet_utils' "caffe" mode: BGR channel means.
CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)

# Keras initialises biases to zero, which would let a loader that drops them
# pass; these give every layer a bias that matters. Dropping a single conv
# bias of this scale moves block5_pool by 8e-4 (block1_conv1) to 5e-2
# (block5_conv3) relative L2, beyond FEATURE_REL_L2 in every case.
CONV_BIAS_SCALE = 0.05
# With Glorot weights the logits spread by only ~0.4 across 1000 classes, so
# every probability is ~1e-3 and a 1e-4 absolute bound says little. Scaling
# the predictions kernel spreads the logits to ~2-4 and makes the top classes
# stand clear of the rest (top probabilities ~0.02-0.3); a predictions bias of
# this size shifts them by far more than the bounds if it is dropped.
LOGIT_GAIN = 10.0
PREDICTIONS_BIAS_SCALE = 1.0
# Top-5 identity is only a meaningful, stable check if the reference's top-6
# scores are not near-ties: float32 implementations disagree by ~1e-5 in log
# probability, and a swap across a 1e-3 gap can only come from a real error.
MIN_TOP_LOG_PROB_GAP = 1e-3


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def random_images(count: int, hw: Tuple[int, int], seed: int) -> np.ndarray:
    """uint8 RGB images with values in 0..255.

    Image i is random noise in square cells of side 4**i (1, 4, 16 pixels), so
    the images differ in spatial frequency and therefore in every layer's
    output, and a batch-indexing bug cannot hide behind look-alike rows.
    """
    h, w = hw
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        cell = 4**i
        coarse = rng.integers(0, 256, (-(-h // cell), -(-w // cell), 3), dtype=np.uint8)
        images.append(coarse.repeat(cell, axis=0).repeat(cell, axis=1)[:h, :w])
    return np.stack(images)


def caffe_preprocess(images: np.ndarray) -> np.ndarray:
    """What ``keras.applications.vgg16.preprocess_input`` does: RGB -> BGR,
    then subtract the ImageNet channel means, no scaling."""
    bgr = images[..., ::-1].astype(np.float32)
    return bgr - CAFFE_BGR_MEAN


def seeded_weights(depth: int, *, include_top: bool, hw: Tuple[int, int], classes: int = 1000, seed: int) -> nv.Weights:
    """Seeded random weights with non-zero biases and a peaked softmax."""
    weights = nv.random_weights(
        depth, include_top, input_hw=hw, classes=classes, seed=seed, bias_scale=CONV_BIAS_SCALE
    )
    if include_top:
        kernel, _ = weights["predictions"]
        rng = np.random.default_rng(seed + 1000)
        bias = rng.uniform(-PREDICTIONS_BIAS_SCALE, PREDICTIONS_BIAS_SCALE, classes).astype(np.float32)
        weights["predictions"] = (kernel * np.float32(LOGIT_GAIN), bias)
    return weights


def build_tf_keras_vgg(tf_keras, depth: int, weights: nv.Weights, **kwargs):
    constructor = {16: tf_keras.applications.VGG16, 19: tf_keras.applications.VGG19}[depth]
    model = constructor(weights=None, **kwargs)
    weighted = {layer.name for layer in model.layers if layer.weights}
    assert weighted == set(weights), "the random weights do not cover exactly Keras's weighted layers"
    for name, arrays in weights.items():
        # set_weights raises if a shape differs from what Keras built.
        model.get_layer(name).set_weights(list(arrays))
    return model


def run_probe(model_class, model, x: np.ndarray, layer_names) -> Dict[str, np.ndarray]:
    """Outputs of the named layers of a Keras model, from one forward pass."""
    probe = model_class(model.input, [model.get_layer(name).output for name in layer_names])
    outputs = probe(x, training=False)
    return {name: np.asarray(tensor) for name, tensor in zip(layer_names, outputs)}


def assert_predictions_match(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=PROBABILITY_ATOL)


def assert_same_top5(actual: np.ndarray, expected: np.ndarray) -> None:
    """fastvgg's five best classes, in order, equal the reference's.

    Exact index equality flips on near-ties, so first require that the
    reference's six best log probabilities are at least MIN_TOP_LOG_PROB_GAP
    apart (the weights and images are seeded, so this holds or fails
    deterministically). Then any difference in the ordered top-5 means fastvgg
    moved a score by ~100x more than float32 rounding can.
    """
    top6 = np.sort(np.log(expected.astype(np.float64)), axis=1)[:, ::-1][:, : TOP_K + 1]
    gaps = -np.diff(top6, axis=1)
    assert gaps.min() > MIN_TOP_LOG_PROB_GAP, (
        f"test fixture problem: the reference's top-{TOP_K + 1} log probabilities have a near-tie "
        f"(smallest gap {gaps.min():.2e}); choose other seeds"
    )
    expected_top = np.argsort(-expected, axis=1)[:, :TOP_K]
    actual_top = np.argsort(-actual, axis=1)[:, :TOP_K]
    np.testing.assert_array_equal(actual_top, expected_top)


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@dataclass
class KerasPeers:
    tf_keras: object
    keras: object


@pytest.fixture(scope="session")
def peers() -> KerasPeers:
    # Imported here, not at module level, so that collecting this file or
    # running other tests does not pay TensorFlow's multi-second import.
    try:
        import tensorflow  # noqa: F401
    except ImportError as error:
        pytest.skip(f"TensorFlow cannot be imported ({error}); there is no Keras to compare fastvgg against")
    # TensorFlow imports, so the Keras packages that ship beside it must too:
    # their absence is a broken test environment, not a reason to skip.
    import keras
    import tf_keras

    return KerasPeers(tf_keras=tf_keras, keras=keras)


@pytest.fixture(scope="module")
def imagenet_batch() -> np.ndarray:
    return caffe_preprocess(random_images(BATCH_SIZE, IMAGENET_HW, seed=0))


@dataclass
class FullModelCase:
    fastvgg_predictions: np.ndarray
    fastvgg_block5_pool: np.ndarray
    # peer name -> layer name -> output
    peer_outputs: Dict[str, Dict[str, np.ndarray]]


@pytest.fixture(scope="module", params=DEPTHS, ids=lambda depth: f"vgg{depth}")
def full_case(request, peers, imagenet_batch, tmp_path_factory) -> FullModelCase:
    """Keras and fastvgg outputs for a full 224x224 model, computed once.

    Only numpy arrays are kept: the Keras models (~550 MB of weights each) are
    dropped before the next depth is built.
    """
    depth = request.param
    layer_names = ["block5_pool", "predictions"]
    weights = seeded_weights(depth, include_top=True, hw=IMAGENET_HW, seed=depth)
    weights_path = tmp_path_factory.mktemp(f"vgg{depth}") / f"vgg{depth}_tf_keras.h5"

    tf_keras_model = build_tf_keras_vgg(peers.tf_keras, depth, weights)
    tf_keras_model.save_weights(str(weights_path))
    del weights
    peer_outputs = {"tf_keras": run_probe(peers.tf_keras.Model, tf_keras_model, imagenet_batch, layer_names)}
    del tf_keras_model
    peers.tf_keras.backend.clear_session()

    # Keras 3 reads the legacy HDF5 layout that tf_keras wrote.
    keras3_constructor = {16: peers.keras.applications.VGG16, 19: peers.keras.applications.VGG19}[depth]
    keras3_model = keras3_constructor(weights=None)
    keras3_model.load_weights(str(weights_path))
    peer_outputs["keras3"] = run_probe(peers.keras.Model, keras3_model, imagenet_batch, layer_names)
    del keras3_model
    peers.keras.backend.clear_session()

    build = CONSTRUCTORS[depth]
    predictions = build(weights_path).predict(imagenet_batch)
    # A file with the classifier top also fills a model without it.
    block5_pool = build(weights_path, include_top=False).predict(imagenet_batch)
    return FullModelCase(predictions, block5_pool, peer_outputs)


# --------------------------------------------------------------------------
# Full 224x224 models, against tf_keras and Keras 3
# --------------------------------------------------------------------------


@pytest.mark.parametrize("peer", PEERS)
def test_softmax_predictions_match(full_case, peer):
    expected = full_case.peer_outputs[peer]["predictions"]
    assert expected.shape == (BATCH_SIZE, 1000)
    # The bound is only informative if the softmax is peaked and the images
    # are told apart (see LOGIT_GAIN).
    assert expected.max() > 100 * PROBABILITY_ATOL
    assert np.abs(expected[0] - expected[1]).max() > 100 * PROBABILITY_ATOL
    assert_predictions_match(full_case.fastvgg_predictions, expected)


@pytest.mark.parametrize("peer", PEERS)
def test_block5_pool_features_match(full_case, peer):
    expected = full_case.peer_outputs[peer]["block5_pool"]
    actual = full_case.fastvgg_block5_pool
    assert actual.shape == expected.shape == (BATCH_SIZE, 7, 7, 512)
    # ReLU must not have zeroed the features, or the comparison is vacuous.
    assert np.count_nonzero(expected) > 0.1 * expected.size
    assert rel_l2(actual, expected) < FEATURE_REL_L2


@pytest.mark.parametrize("peer", PEERS)
def test_top5_classes_match(full_case, peer):
    assert_same_top5(full_case.fastvgg_predictions, full_case.peer_outputs[peer]["predictions"])


# --------------------------------------------------------------------------
# Variants: global pooling at an odd size, a 10-class top on a 2x3 grid
# --------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("depth", DEPTHS, ids=lambda depth: f"vgg{depth}")
def test_global_pooling_at_odd_size_matches_tf_keras(peers, tmp_path_factory, depth, pooling):
    input_shape = ODD_HW + (3,)
    weights = seeded_weights(depth, include_top=False, hw=ODD_HW, seed=100 + depth)
    keras_model = build_tf_keras_vgg(
        peers.tf_keras, depth, weights, include_top=False, pooling=pooling, input_shape=input_shape
    )
    # The "notop" file comes from Keras itself, global pooling layer included.
    notop_path = tmp_path_factory.mktemp("notop") / f"vgg{depth}_{pooling}_notop.h5"
    keras_model.save_weights(str(notop_path))
    x = caffe_preprocess(random_images(BATCH_SIZE, ODD_HW, seed=1))
    expected = np.asarray(keras_model(x, training=False))
    peers.tf_keras.backend.clear_session()

    model = CONSTRUCTORS[depth](notop_path, include_top=False, pooling=pooling, input_shape=input_shape)
    actual = model.predict(x)
    assert actual.shape == expected.shape == (BATCH_SIZE, 512)
    assert np.count_nonzero(expected) > 0.1 * expected.size
    assert rel_l2(actual, expected) < FEATURE_REL_L2


def test_ten_class_top_on_non_square_grid_matches_tf_keras(peers, tmp_path_factory):
    input_shape = SMALL_TOP_HW + (3,)
    weights = seeded_weights(16, include_top=True, hw=SMALL_TOP_HW, classes=SMALL_TOP_CLASSES, seed=200)
    keras_model = build_tf_keras_vgg(
        peers.tf_keras, 16, weights, classes=SMALL_TOP_CLASSES, input_shape=input_shape
    )
    weights_path = tmp_path_factory.mktemp("small_top") / "vgg16_10_classes.h5"
    keras_model.save_weights(str(weights_path))
    x = caffe_preprocess(random_images(BATCH_SIZE, SMALL_TOP_HW, seed=2))
    keras_out = run_probe(peers.tf_keras.Model, keras_model, x, ["block5_pool", "predictions"])
    peers.tf_keras.backend.clear_session()
    expected = keras_out["predictions"]
    assert keras_out["block5_pool"].shape == (BATCH_SIZE, 2, 3, 512)

    # The check must be able to fail on the bug it targets: fed a (w, h, c)
    # flatten of Keras's own block5_pool, the top's probabilities move far
    # beyond the bound.
    def top(features: np.ndarray) -> np.ndarray:
        hidden = nv.relu(nv.dense(features, *weights["fc1"]))
        hidden = nv.relu(nv.dense(hidden, *weights["fc2"]))
        return nv.softmax(nv.dense(hidden, *weights["predictions"]))

    grid = keras_out["block5_pool"].astype(np.float64)
    np.testing.assert_allclose(top(grid.reshape(BATCH_SIZE, -1)), expected, rtol=0, atol=PROBABILITY_ATOL)
    wrong_order = top(grid.transpose(0, 2, 1, 3).reshape(BATCH_SIZE, -1))
    assert np.abs(wrong_order - expected).max() > 100 * PROBABILITY_ATOL

    model = fastvgg.VGG16(weights_path, classes=SMALL_TOP_CLASSES, input_shape=input_shape)
    assert_predictions_match(model.predict(x), expected)
