"""What many test files share: error measures, sample images, model constructors, weight files.

Imported by name (``from helpers import rel_l2``), as kernel_checks.py and numpy_vgg.py are;
fixtures live in the test files that use them.
"""

from __future__ import annotations

import contextlib
import os
import signal

import numpy as np
import pytest

import fastvgg
import keras_h5
import numpy_vgg as nv

CONSTRUCTORS = {16: fastvgg.VGG16, 19: fastvgg.VGG19}
# Non-zero biases in random weights, so a loader or kernel that drops the bias cannot pass.
BIAS_SCALE = 0.05


def rel_l2(actual, expected) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected))


def noise_images(count: int, hw, seed: int = 0) -> np.ndarray:
    """float32 NHWC white noise in [-120, 140): roughly caffe-preprocessed pixels."""
    return np.random.default_rng(seed).uniform(-120, 140, (count,) + tuple(hw) + (3,)).astype(np.float32)


def dissimilar_images(count: int, hw, seed: int = 0) -> np.ndarray:
    """``count`` dissimilar images in 0..255 minus 120 (a crude mean subtraction).

    Even images are white noise and odd ones smooth patterns, so the rows of every output
    differ and a batch-indexing bug would show.
    """
    h, w = hw
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    images = []
    for i in range(count):
        if i % 2 == 0:
            images.append(rng.uniform(0, 255, (h, w, 3)))
        else:
            phase = rng.uniform(0, 1)
            images.append(
                np.stack([127.5 * (1 + np.sin(2 * np.pi * (k + 1) * (xx + yy / (k + 2) + phase))) for k in range(3)], -1)
            )
    return np.stack(images).astype(np.float32) - 120.0


def write_weights(path, weights: nv.Weights, depth: int, include_top: bool, **kwargs) -> str:
    """numpy_vgg weights as a classic Keras HDF5 file at ``path``; returns the path."""
    keras_h5.write_classic_h5(path, weights, nv.layer_names(depth, include_top), **kwargs)
    return str(path)


def snapshot(model) -> list:
    """Copies of every weight array of a model, for assert_weights_unchanged."""
    return [array.copy() for array in model.get_weights()]


def assert_weights_unchanged(model, before: list) -> None:
    """The model holds exactly the weights of ``snapshot`` (a failed load changed nothing)."""
    after = model.get_weights()
    assert len(after) == len(before)
    for i, (now, then) in enumerate(zip(after, before)):
        assert now.shape == then.shape and now.dtype == then.dtype, f"weight array {i} changed shape or dtype"
        assert np.array_equal(now, then, equal_nan=True), f"weight array {i} changed by a failed load"


def import_tf_keras():
    """tf_keras, or a skip with the reason where TensorFlow itself cannot be imported.

    A missing tf_keras beside a working TensorFlow is a broken test environment (the test
    extra installs both), so that raises instead of skipping.
    """
    try:
        import tensorflow  # noqa: F401
    except ImportError as error:
        pytest.skip(f"TensorFlow cannot be imported ({error}); there is no Keras to compare with")
    import tf_keras

    return tf_keras


def keras_flavor(flavor: str):
    """Keras 3 ("keras3") or tf_keras ("tf_keras"), or a skip with the reason where TensorFlow
    cannot be imported (both write the files the Keras-parity tests load)."""
    try:
        import tensorflow  # noqa: F401
    except Exception as error:  # pragma: no cover - only without TensorFlow
        pytest.skip(f"TensorFlow cannot be imported ({error}); there is no Keras to compare fastvgg against")
    if flavor == "keras3":
        import keras

        return keras
    import tf_keras

    return tf_keras


def aligned_copy(view) -> np.ndarray:
    """A read-only copy of a packed section, aligned to 64 bytes like a mapped cache file's."""
    buffer = np.empty(len(view) + 64, np.uint8)
    offset = (-buffer.ctypes.data) % 64
    aligned = buffer[offset : offset + len(view)]
    aligned[:] = view
    aligned.flags.writeable = False
    return aligned


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    """Fails with TimeoutError after `seconds` instead of letting a stuck cluster hang the suite
    (where SIGALRM exists)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def stuck(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def random_vgg16_notop_h5(directory, seed: int) -> str:
    """A Keras-layout .h5 of VGG16 without the top, random weights with small biases (what a
    fine-tuned base's weights file is), in `directory`."""
    path = os.path.join(str(directory), "vgg16_notop.h5")
    keras_h5.write_classic_h5(path, nv.random_weights(16, include_top=False, seed=seed, bias_scale=0.05),
                              nv.layer_names(16, include_top=False))
    return path
