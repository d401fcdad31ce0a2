"""get_weights returns exactly what was set, also for layers that keep only Winograd weights.

With precision="fast" a convolution stores its Winograd transform U (6x6 per channel pair)
and, instead of a second float copy of the kernel, one correction byte per weight: get_weights
inverts the transform and moves each weight by the stored number of ulps (or takes a value
kept whole). These tests compare bytes, so -0.0, NaN payloads and subnormals count.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastvgg


@pytest.fixture(scope="module")
def fast_model():
    return fastvgg.VGG19(None, include_top=False, input_shape=(32, 32, 3), seed=3, precision="fast")


def assert_same_bytes(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == expected.shape
    differing = np.count_nonzero(got.view(np.uint32) != expected.view(np.uint32))
    assert differing == 0, f"{differing} of {expected.size} weights differ in their bits"


def kernels(shape, seed):
    rng = np.random.default_rng(seed)
    glorot = rng.uniform(-0.05, 0.05, shape).astype(np.float32)
    # Magnitudes from 1e-30 to 1e30 inside the same 3x3 kernels: the inverse transform is
    # then far (in ulps) from the small weights, which must come back whole.
    wide = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 30, shape)).astype(np.float32)
    special = glorot.copy()
    special[0, 0, :4, :4] = -0.0
    special[1, 1, 0, :] = np.float32(1e-42)  # subnormal
    special[2, 2, 1, 1] = np.float32("nan")
    special[2, 0, 2, :3] = [np.inf, -np.inf, 0.0]
    special[0, 2, 3, 5] = np.frombuffer(np.uint32(0x7FC01234).tobytes(), np.float32)[0]  # NaN with a payload
    sparse = np.where(rng.random(shape) < 0.7, 0.0, glorot).astype(np.float32)
    return {"glorot": glorot, "wide-range": wide, "special-values": special, "mostly-zero": sparse}


@pytest.mark.parametrize("layer_name", ["block1_conv2", "block3_conv1", "block5_conv4"])
@pytest.mark.parametrize("kind", ["glorot", "wide-range", "special-values", "mostly-zero"])
def test_fast_model_returns_the_exact_kernel(fast_model, layer_name, kind):
    layer = fast_model.get_layer(layer_name)
    kernel_shape, bias_shape = layer.weight_shapes()
    kernel = kernels(kernel_shape, seed=len(layer_name))[kind]
    bias = np.random.default_rng(1).standard_normal(bias_shape).astype(np.float32)
    if np.isfinite(kernel).all():
        layer.set_weights([kernel, bias])
    else:
        with pytest.warns(RuntimeWarning, match=f"'{layer_name}'.*NaN or infinite"):
            layer.set_weights([kernel, bias])
    got_kernel, got_bias = layer.get_weights()
    assert_same_bytes(got_kernel, kernel)
    assert_same_bytes(got_bias, bias)


def test_fast_and_highest_return_the_same_weights():
    fast = fastvgg.VGG16(None, include_top=False, seed=11, precision="fast")
    highest = fastvgg.VGG16(None, include_top=False, seed=11, precision="highest")
    for a, b in zip(fast.get_weights(), highest.get_weights()):
        assert_same_bytes(a, b)


def test_fast_model_keeps_no_second_float_copy_of_winograd_kernels():
    """The packed weights of a 'fast' model: U (36 floats a channel pair) plus about one byte a
    weight, instead of U plus a float copy (36 + 9 floats a pair)."""
    fast = fastvgg.VGG16(None, include_top=False, input_shape=(32, 32, 3), seed=0, precision="fast")
    highest = fastvgg.VGG16(None, include_top=False, input_shape=(32, 32, 3), seed=0, precision="highest")
    pairs = sum(
        layer.weight_shapes()[0][2] * layer.weight_shapes()[0][3]
        for layer in fast.layers
        if layer.class_name == "Conv2D" and layer.weight_shapes()[0][2] >= 16
    )
    extra = fast._executor.weights_nbytes() - highest._executor.weights_nbytes()
    # U replaces the 9 floats of the direct packing; 9 correction bytes (and a few kept whole).
    assert extra <= pairs * ((36 - 9) * 4 + 9 * 1.05)
    assert extra >= pairs * (36 - 9) * 4
