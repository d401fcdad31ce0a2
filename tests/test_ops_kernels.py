"""The kernels fine-tuned models add (csrc/ops.h), on every instruction set this CPU runs,
against their plain reference twins and exact float64 results.

Bounds follow the arithmetic, as in tests/test_kernels.py: a convolution sums K = k*k*cin
products and a bias, so it is within gamma(K + 1) * sum|x*w| of exact; pooling takes a
maximum (exact) or sums at most 4 values and divides by 1, 2 or 4 (exact); an affine map is one
multiply and one add (two roundings at most); the activations are a few libm calls, each within
an ulp or two, composed without cancellation.
"""

import numpy as np
import pytest

from fastvgg import _core
from helpers import aligned_copy, keras_flavor
from kernel_checks import ISAS, UNIT_ROUNDOFF, assert_within, gamma, random_array
from numpy_chain import activation as numpy_activation
from numpy_chain import conv as numpy_conv
from numpy_chain import pool2x2 as numpy_pool

ACTIVATIONS = ["linear", "relu", "sigmoid", "tanh", "elu", "selu", "gelu", "swish", "softplus", "softsign", "exponential",
               "mish", "hard_sigmoid", "hard_sigmoid_keras2", "hard_silu"]
# Relative bound per activation, in units of float32's unit roundoff; gelu's erfc is evaluated
# at a rounded argument, and its relative sensitivity grows with x^2 (|x| < 6 here); mish
# composes four libm calls.
ULPS = {"gelu": 96, "mish": 16}
# tf.keras's hard sigmoid rounds 0.2 x, then adds 0.5: near 0.2 x = -0.5 the sum cancels, and
# the product's rounding (of |0.2 x| < 1) is absolute. Its bound is relative to |f(x)| + 1.
FLOOR = {"hard_sigmoid_keras2": 1.0}


def activation_bound(name, exact):
    return ULPS.get(name, 8) * UNIT_ROUNDOFF * (np.abs(exact) + FLOOR.get(name, 0.0)) + 1e-37


def check_conv(isa, rng, n, h, w, cin, cout, size, padding, relu, with_bias=True, algorithm="direct"):
    x = random_array(rng, (n, h, w, cin))
    kernel = random_array(rng, (size, size, cin, cout))
    bias = random_array(rng, (cout,)) if with_bias else None
    same = padding == "same"
    exact = numpy_conv(x, kernel, bias, same)
    magnitude = numpy_conv(np.abs(x), np.abs(kernel), None if bias is None else np.abs(bias), same)
    if relu:
        exact = np.maximum(exact, 0.0)
    bound = gamma(size * size * cin + 1) * magnitude
    if algorithm == "winograd":
        bound = bound * 64  # the transforms' rounding, as tests/test_winograd.py derives it (loosely)
    fast = _core.testing.conv(x, kernel, bias, padding, relu, isa, algorithm)
    reference = _core.testing.conv(x, kernel, bias, padding, relu, "reference")
    assert fast.shape == exact.shape and fast.dtype == np.float32
    assert_within(reference, exact, gamma(size * size * cin + 1) * magnitude, f"reference {size}x{size} {padding} conv")
    assert_within(fast, exact, bound, f"{isa} {size}x{size} {padding} conv vs float64")


# Tile widths are 14 (AVX-512), 6 (AVX2), 4 (plain): widths around them hit every tail; 15, 17
# and 33 channels straddle the 16-channel blocks.
SHAPES = [(1, 7, 13, 3, 5), (2, 13, 7, 17, 33), (1, 3, 3, 16, 16), (1, 5, 29, 15, 31), (3, 4, 14, 32, 48), (1, 3, 20, 1, 1)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n, h, w, cin, cout", SHAPES)
@pytest.mark.parametrize("relu", [True, False])
def test_conv1x1(isa, n, h, w, cin, cout, relu):
    check_conv(isa, np.random.default_rng([n, h, w, cin, cout, 1]), n, h, w, cin, cout, 1, "valid", relu)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n, h, w, cin, cout", SHAPES)
@pytest.mark.parametrize("relu", [True, False])
def test_conv3x3_valid(isa, n, h, w, cin, cout, relu):
    check_conv(isa, np.random.default_rng([n, h, w, cin, cout, 3]), n, h, w, cin, cout, 3, "valid", relu)


@pytest.mark.parametrize("isa", ISAS)
def test_conv_without_bias_and_by_winograd(isa):
    rng = np.random.default_rng(7)
    check_conv(isa, rng, 2, 9, 11, 20, 24, 3, "valid", False, with_bias=False)
    check_conv(isa, rng, 2, 9, 11, 20, 24, 1, "same", True, with_bias=False)
    check_conv(isa, rng, 1, 10, 12, 32, 16, 3, "valid", True, algorithm="winograd")


@pytest.mark.parametrize("isa", ISAS)
def test_conv_random_shapes(isa):
    rng = np.random.default_rng(11)
    for _ in range(8):
        n, h, w = rng.integers(1, 3), rng.integers(3, 16), rng.integers(3, 30)
        cin, cout = rng.integers(1, 40), rng.integers(1, 40)
        size = int(rng.choice([1, 3]))
        check_conv(isa, rng, n, h, w, cin, cout, size, "valid", bool(rng.integers(2)))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("n, h, w, c", [(1, 7, 13, 3), (2, 13, 7, 17), (1, 2, 2, 16), (1, 1, 1, 5), (2, 9, 9, 33), (1, 4, 6, 64)])
def test_pool2x2(isa, padding, n, h, w, c):
    if padding == "valid" and (h < 2 or w < 2):
        pytest.skip("'valid' 2x2 pooling needs 2x2 pixels")
    rng = np.random.default_rng([n, h, w, c])
    x = random_array(rng, (n, h, w, c))
    same = padding == "same"
    expected_max = numpy_pool(x.astype(np.float64), "max", same)
    np.testing.assert_array_equal(_core.testing.pool2x2(x, "max", padding, isa), expected_max)
    np.testing.assert_array_equal(_core.testing.pool2x2(x, "max", padding, "reference"), expected_max)
    exact = numpy_pool(x.astype(np.float64), "avg", same)
    bound = gamma(3) * numpy_pool(np.abs(x).astype(np.float64), "avg", same)
    assert_within(_core.testing.pool2x2(x, "avg", padding, isa), exact, bound, f"{isa} avg pool {padding}")
    assert_within(_core.testing.pool2x2(x, "avg", padding, "reference"), exact, bound, f"reference avg pool {padding}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pool2x2_keeps_nan(isa, mode):
    x = np.ones((1, 5, 5, 3), np.float32)
    x[0, 4, 4, 1] = np.nan  # in the window that hangs over the edge under 'same'
    x[0, 0, 1, 0] = np.nan
    y = _core.testing.pool2x2(x, mode, "same", isa)
    assert np.isnan(y[0, 2, 2, 1]) and np.isnan(y[0, 0, 0, 0])
    assert np.isfinite(np.delete(y.reshape(-1), [np.ravel_multi_index((0, 2, 2, 1), y.shape), 0])).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(3, 5), (2, 17), (4, 48), (1, 7, 9, 3), (2, 5, 3, 17), (1, 3, 14, 32)])
def test_affine(isa, shape):
    rng = np.random.default_rng(list(shape))
    x = random_array(rng, shape)
    scale, shift = random_array(rng, shape[-1:]), random_array(rng, shape[-1:])
    exact = x.astype(np.float64) * scale + shift
    bound = gamma(2) * (np.abs(x.astype(np.float64) * scale) + np.abs(shift))
    assert_within(_core.testing.affine(x, scale, shift, isa), exact, bound, f"{isa} affine")
    assert_within(_core.testing.affine(x, scale, shift, "reference"), exact, bound, "reference affine")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(37,), (3, 21), (2, 5, 7, 3), (1, 4, 3, 17), (1, 2, 15, 32)])
def test_activation(isa, name, shape):
    rng = np.random.default_rng([len(shape), shape[-1]])
    x = (random_array(rng, shape) * 3).astype(np.float32)
    exact = numpy_activation(x.astype(np.float64), name)
    bound = activation_bound(name, exact)
    assert_within(_core.testing.activation(x, name, isa), exact, bound, f"{isa} {name}")
    assert_within(_core.testing.activation(x, name, "reference"), exact, bound, f"reference {name}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_extremes_and_nan(isa, name):
    x = np.array([-1e30, -100.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 100.0, 3e38, np.nan], np.float32)
    exact = numpy_activation(x[:-1].astype(np.float64), name)
    got = _core.testing.activation(x, name, isa)
    assert np.isnan(got[-1]), f"{name} of NaN must be NaN"
    with np.errstate(over="ignore"):  # exp(100) is beyond float32: inf, correctly rounded
        exact32 = exact.astype(np.float32)
    finite = np.isfinite(exact32)
    np.testing.assert_allclose(got[:-1][finite], exact[finite], rtol=ULPS.get(name, 8) * UNIT_ROUNDOFF, atol=1e-37)
    assert np.array_equal(np.isinf(got[:-1]), np.isinf(exact32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["sigmoid", "softplus", "gelu", "elu", "exponential", "hard_sigmoid", "hard_sigmoid_keras2"])
def test_activation_keeps_border_and_padding_zero(isa, name):
    # f(0) is 0.5 for sigmoid and log 2 for softplus: a kernel that ran over the border or the
    # padding channels would leave them there, and the next 3x3 convolution would read them.
    x = random_array(np.random.default_rng(3), (1, 5, 6, 19))
    buffer = _core.testing.activation_blocked_buffer(x, name, isa)
    assert buffer.shape == (2, 7, 8, 16)
    border = np.ones(buffer.shape, bool)
    border[:, 1:-1, 1:-1, :] = False
    assert not buffer[border].any(), "the one-pixel border changed"
    assert not buffer[1, 1:-1, 1:-1, 3:].any(), "the padding channels past 19 changed"
    inner = np.concatenate([buffer[0, 1:-1, 1:-1, :], buffer[1, 1:-1, 1:-1, :3]], axis=-1)
    exact = numpy_activation(x[0].astype(np.float64), name)
    assert_within(inner, exact, activation_bound(name, exact), f"{isa} {name} in place")


@pytest.mark.parametrize("isa", ISAS + ["reference"])
@pytest.mark.parametrize("slope", [0.3, 0.01, 0.2, 1.5, -0.25, 0.0])
@pytest.mark.parametrize("shape", [(37,), (3, 21), (2, 5, 7, 3), (1, 4, 3, 17), (1, 2, 15, 32)])
def test_leaky_relu_is_one_rounded_product(isa, slope, shape):
    """x < 0 ? slope * x : x with slope as float32: one product of two floats, which float64
    holds exactly, rounded once; so the expected values are exact, not within a bound. Slopes
    above 1 and below 0 too (tf.nn.leaky_relu takes any), infinities and NaN in the input."""
    rng = np.random.default_rng([len(shape), shape[-1], int(slope * 100) + 50])
    x = (random_array(rng, shape) * 3).astype(np.float32)
    flat = x.reshape(-1)
    flat[:4] = [np.nan, -np.inf, np.inf, -1e-45]
    s32 = np.float64(np.float32(slope))
    with np.errstate(invalid="ignore"):  # slope 0 times -inf is NaN, in the kernels as in TensorFlow
        expected = np.where(x < 0, (s32 * x.astype(np.float64)).astype(np.float32), x)
        yardstick = numpy_activation(x, "leaky_relu", s32).astype(np.float32)  # float64 product, rounded once
    got = _core.testing.activation(x, "leaky_relu", isa, slope)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, expected)
    # The numpy yardstick agrees (Keras's x > 0 ? x : slope * x differs only in the sign of zero).
    finite = np.isfinite(x)
    np.testing.assert_array_equal(got[finite], yardstick[finite])


@pytest.mark.parametrize("isa", ISAS)
def test_leaky_relu_keeps_border_and_padding_zero(isa):
    x = random_array(np.random.default_rng(4), (1, 5, 6, 19))
    buffer = _core.testing.activation_blocked_buffer(x, "leaky_relu", isa, 0.3)
    border = np.ones(buffer.shape, bool)
    border[:, 1:-1, 1:-1, :] = False
    assert not buffer[border].any() and not buffer[1, 1:-1, 1:-1, 3:].any()
    inner = np.concatenate([buffer[0, 1:-1, 1:-1, :], buffer[1, 1:-1, 1:-1, :3]], axis=-1)
    assert (x[0] < 0).any()
    np.testing.assert_array_equal(inner, np.where(x[0] < 0, (np.float64(np.float32(0.3)) * x[0]).astype(np.float32), x[0]))


def keras_relu_in_float32(x, negative_slope, max_value, threshold):
    """Keras's ReLU(negative_slope, max_value, threshold) step by step in float32, as Keras 3's
    ReLU.static_call (and tf.keras's backend.relu) computes it when it is not a leaky ReLU:
    each numpy float32 operation rounds as TensorFlow's does."""
    f32 = np.float32
    x = np.asarray(x, f32)
    with np.errstate(invalid="ignore", over="ignore"):
        passed = np.where(x > f32(threshold), x, f32(0))
        if max_value is not None:
            passed = np.minimum(np.maximum(passed, f32(0)), f32(max_value))
        if negative_slope == 0:
            return passed
        below = np.maximum(-x + f32(threshold), f32(0))  # relu(-x + threshold)
        return passed - f32(negative_slope) * below


# (negative_slope, max_value, threshold): relu6, a cap with a leak, thresholds with and without
# either, a cap below the threshold, a cap of 0.
CLIPPED_RELUS = [(0.0, 6.0, 0.0), (0.1, 6.0, 0.0), (0.0, None, 0.5), (0.2, None, 1.0), (0.3, 2.5, 0.7),
                 (0.0, 0.3, 1.2), (0.0, 0.0, 0.0), (1.7, 1.0, 0.1)]


@pytest.mark.parametrize("isa", ISAS + ["reference"])
@pytest.mark.parametrize("numbers", CLIPPED_RELUS, ids=str)
@pytest.mark.parametrize("shape", [(37,), (3, 21), (2, 5, 7, 3), (1, 4, 3, 17), (1, 2, 15, 32)])
def test_clipped_relu_follows_keras_steps(isa, numbers, shape):
    """The fast kernels give the bits of Keras's float32 steps (threshold - x and the slope's
    product each rounded once, so the expected values are exact), infinities too; the
    reference, which evaluates the formula in float64, is within those two roundings."""
    slope, cap, threshold = numbers
    rng = np.random.default_rng([len(shape), shape[-1], int(threshold * 10)])
    x = (random_array(rng, shape) * 3).astype(np.float32)
    flat = x.reshape(-1)
    flat[:6] = [np.nan, -np.inf, np.inf, -1e-45, threshold, np.nextafter(np.float32(threshold), np.float32(9))]
    got = _core.testing.activation(x, "clipped_relu", isa, slope, cap, threshold)
    assert got.dtype == np.float32 and got.shape == x.shape
    expected = keras_relu_in_float32(x, slope, cap, threshold)
    # The numbers as the float32 values the kernels (and TensorFlow) compute with.
    cap32 = None if cap is None else np.float32(cap)
    exact = numpy_activation(x.astype(np.float64), "clipped_relu", np.float32(slope), cap32, np.float32(threshold))
    # NaN stays NaN, as in every activation here (Keras's where(x > threshold, x, 0) makes it 0).
    assert np.isnan(got.reshape(-1)[0])
    number = ~np.isnan(x)
    if isa != "reference":
        np.testing.assert_array_equal(got[number], expected[number])
    finite = np.isfinite(x)
    assert_within(got[finite], exact[finite], gamma(2) * np.abs(exact[finite]) + 1e-45, f"{isa} clipped_relu {numbers}")


@pytest.mark.parametrize("isa", ISAS)
def test_clipped_relu_keeps_border_and_padding_zero(isa):
    # With a threshold, f(0) is -slope * threshold: a pass over the border would leave it there.
    x = random_array(np.random.default_rng(5), (1, 5, 6, 19))
    buffer = _core.testing.activation_blocked_buffer(x, "clipped_relu", isa, 0.5, 1.0, 0.25)
    border = np.ones(buffer.shape, bool)
    border[:, 1:-1, 1:-1, :] = False
    assert not buffer[border].any() and not buffer[1, 1:-1, 1:-1, 3:].any()
    inner = np.concatenate([buffer[0, 1:-1, 1:-1, :], buffer[1, 1:-1, 1:-1, :3]], axis=-1)
    np.testing.assert_array_equal(inner, keras_relu_in_float32(x[0], 0.5, 1.0, 0.25))


@pytest.mark.parametrize("numbers", CLIPPED_RELUS, ids=str)
def test_clipped_relu_gives_keras_bits(numbers):
    """Against Keras's own ReLU layer (Keras 3 and tf.keras), on values around every edge."""
    slope, cap, threshold = numbers
    rng = np.random.default_rng(int(threshold * 10) + 7)
    x = (random_array(rng, (4, 3, 5, 7)) * 8).astype(np.float32)
    x.reshape(-1)[:3] = [threshold, 0.0, cap if cap is not None else 1e30]
    got = _core.testing.activation(x, "clipped_relu", _core.active_isa(), slope, cap, threshold)
    for flavor in ("keras3", "tf_keras"):
        keras = keras_flavor(flavor)
        layer = keras.layers.ReLU(max_value=cap, negative_slope=slope, threshold=threshold)
        np.testing.assert_array_equal(got, np.asarray(layer(x)), err_msg=flavor)


def prelu_exact(x, alpha):
    """x < 0 ? alpha * x : x with alpha broadcast: the product of two floats, which float64 holds
    exactly, rounded once to float32: Keras's relu(x) - alpha * relu(-x) in float32, bit for bit."""
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):  # 0 * -inf
        return np.where(x < 0, (alpha.astype(np.float64) * x64).astype(np.float32), x)


# (shape, alpha extent): per channel, per pixel, per row, per column, flat rows per feature.
PRELU_CASES = [((2, 5, 7, 3), (1, 1)), ((1, 4, 3, 17), (4, 3)), ((2, 6, 5, 32), (6, 1)), ((1, 3, 9, 33), (1, 9)),
               ((3, 21), None), ((4, 48), None), ((2, 1, 1, 5), (1, 1))]


@pytest.mark.parametrize("isa", ISAS + ["reference"])
@pytest.mark.parametrize("shape, extent", PRELU_CASES, ids=str)
def test_prelu_is_one_rounded_product(isa, shape, extent):
    """PReLU's alpha of every sharing Keras allows; alphas of either sign and above 1, infinities
    and NaN in the input: the exact expected floats, not a bound."""
    rng = np.random.default_rng([len(shape), shape[-1]])
    x = (random_array(rng, shape) * 3).astype(np.float32)
    x.reshape(-1)[:4] = [np.nan, -np.inf, np.inf, -1e-45]
    channels = shape[-1]
    alpha = rng.uniform(-1.5, 1.5, (extent or (1, 1)) + (channels,)).astype(np.float32)
    alpha.reshape(-1)[0] = 0.0
    got = _core.testing.prelu(x, alpha, isa)
    assert got.dtype == np.float32 and got.shape == x.shape
    expected = prelu_exact(x, alpha if len(shape) == 4 else alpha.reshape(-1))
    np.testing.assert_array_equal(got, expected)


def test_prelu_refuses_an_alpha_of_another_shape():
    x = np.ones((1, 4, 5, 3), np.float32)
    for alpha_shape in [(1, 1, 2), (2, 1, 3), (1, 4, 3), (3,)]:
        with pytest.raises(ValueError, match="alpha must have shape"):
            _core.testing.prelu(x, np.ones(alpha_shape, np.float32), _core.active_isa())


def test_graph_prelu_shapes_and_checks():
    graph = _core.Graph(3)
    graph.add_conv(3, 4, "same", "linear")
    graph.add_prelu(4)  # one alpha per channel: any image size
    graph.add_prelu(4, 6, 5)  # one per pixel and channel: 6x5 images only
    graph.add_global_pool("avg")
    graph.add_prelu(4)
    ops = graph.describe()
    assert [op["kind"] for op in ops] == ["conv", "prelu", "prelu", "global_pool", "prelu"]
    assert [(op["alpha_height"], op["alpha_width"], op["on_image"]) for op in ops[1:]] == [
        (1, 1, True), (6, 5, True), (1, 1, False), (1, 1, False)]
    assert graph.output_shapes(6, 5)[2] == (6, 5, 4)
    with pytest.raises(ValueError, match="alpha for 6x5 images, but an input of 7x5 gives it 7x5"):
        graph.output_shapes(7, 5)
    with pytest.raises(ValueError, match="a prelu of 5 channels cannot follow a layer of 4 channels"):
        graph_of_4 = _core.Graph(3)
        graph_of_4.add_conv(1, 4, "same", "linear")
        graph_of_4.add_prelu(5)
    flat = _core.Graph(3)
    flat.add_global_pool("max")
    with pytest.raises(ValueError, match="one alpha per feature"):
        flat.add_prelu(3, 2, 1)
    with pytest.raises(ValueError, match="alpha_height"):
        flat.add_prelu(3, 0, 1)
    flat.add_prelu(3)
    assert flat.layer_count == 2


def test_executor_runs_prelu_and_returns_its_alpha():
    graph = _core.Graph(3)
    graph.add_conv(3, 20, "same", "linear")
    graph.add_prelu(20, 4, 1)  # one alpha per row and channel
    graph.add_flatten()
    graph.add_prelu(4 * 3 * 20)
    rng = np.random.default_rng(11)
    kernel, bias = random_array(rng, (3, 3, 3, 20)), random_array(rng, (20,))
    alpha_image = rng.uniform(-1, 2, (4, 1, 20)).astype(np.float32)
    alpha_flat = rng.uniform(-1, 2, (1, 1, 240)).astype(np.float32)
    executor = _core.CpuExecutor(graph, "highest")
    executor.set_conv_weights(0, kernel, bias)
    with pytest.raises(ValueError, match=r"needs an alpha of shape \(4, 1, 20\)"):
        executor.set_prelu(1, alpha_image.reshape(1, 4, 20))
    with pytest.raises(ValueError, match="is not a prelu"):
        executor.set_prelu(0, alpha_image)
    executor.set_prelu(1, alpha_image)
    executor.set_prelu(3, alpha_flat)
    x = random_array(rng, (2, 4, 3, 3))
    conv_out, image_out, flat_out = executor.forward(x, [0, 1, 3])
    np.testing.assert_array_equal(image_out, prelu_exact(conv_out, alpha_image))
    np.testing.assert_array_equal(flat_out, prelu_exact(image_out.reshape(2, -1), alpha_flat.reshape(-1)))
    assert (conv_out < 0).any() and (image_out != conv_out).any()
    for index, alpha in ((1, alpha_image), (3, alpha_flat)):
        got_alpha, got_bias = executor.get_weights(index)
        np.testing.assert_array_equal(got_alpha, alpha)
        assert not got_bias.any()
    assert executor.method(1) == "prelu_f32"
    # The packed sections carry the alphas: an executor that adopts them computes the same.
    other = _core.CpuExecutor(graph, "highest")
    for name, view in executor.packed_sections():
        other.adopt_section(name, aligned_copy(view))
    np.testing.assert_array_equal(other.forward(x, [3])[0], flat_out)


# fastvgg's name, the Keras that defines it, Keras's name: activations computed in the same
# float32 steps as TensorFlow (no libm call), so the same bits.
STEPWISE_ACTIVATIONS = [("hard_sigmoid", "keras3", "hard_sigmoid"), ("hard_silu", "keras3", "hard_silu"),
                        ("hard_sigmoid_keras2", "tf_keras", "hard_sigmoid"), ("softsign", "keras3", "softsign"),
                        ("softsign", "tf_keras", "softsign")]


@pytest.mark.parametrize("name, flavor, keras_name", STEPWISE_ACTIVATIONS)
def test_stepwise_activations_give_keras_bits(name, flavor, keras_name):
    """Against Keras's own activation function, on values across the hard sigmoids' clipped ends
    and their kinks (x = -3, 3 and -2.5, 2.5)."""
    x = np.concatenate([np.linspace(-8, 8, 4001, dtype=np.float32), np.float32([-3, 3, -2.5, 2.5, 0, -0.0])])
    keras = keras_flavor(flavor)
    expected = np.asarray(getattr(keras.activations, keras_name)(keras_tensor(x)))
    got = _core.testing.activation(x, name, _core.active_isa())
    np.testing.assert_array_equal(got, expected)


def keras_tensor(x):
    """x as a TensorFlow tensor: tf.keras's activations take no numpy array."""
    import tensorflow as tf

    return tf.constant(x)


@pytest.mark.parametrize("name, flavor", [("mish", "keras3"), ("mish", "tf_keras"), ("exponential", "keras3")])
def test_libm_activations_are_within_ulps_of_keras(name, flavor):
    x = np.linspace(-20, 20, 4001, dtype=np.float32)
    keras = keras_flavor(flavor)
    expected = np.asarray(getattr(keras.activations, name)(keras_tensor(x))).astype(np.float64)
    got = _core.testing.activation(x, name, _core.active_isa())
    assert_within(got, expected, 2 * activation_bound(name, expected), f"{name} against {flavor}")


@pytest.mark.parametrize("isa", ISAS + ["reference"])
@pytest.mark.parametrize("shape, size", [((2, 5, 7, 3), (2, 2)), ((1, 3, 4, 17), (3, 1)), ((1, 1, 1, 33), (1, 4)),
                                         ((2, 6, 5, 32), (1, 1))], ids=str)
def test_upsample_repeats_each_pixel(isa, shape, size):
    """Nearest-neighbour UpSampling2D copies: Keras 3's repeat along rows then columns, bit for
    bit, NaN and infinities included; the border and padding channels of the blocked output stay
    zero (the blocked round trip would carry anything else into the next layer's padding)."""
    rng = np.random.default_rng([shape[-1], *size])
    x = random_array(rng, shape)
    x.reshape(-1)[:3] = [np.nan, np.inf, -0.0]
    got = _core.testing.upsample(x, *size, isa)
    np.testing.assert_array_equal(got, np.repeat(np.repeat(x, size[0], axis=1), size[1], axis=2))


def test_graph_upsample_shapes_and_checks():
    graph = _core.Graph(3)
    graph.add_conv(3, 4, "same", "relu")
    graph.add_upsample(2, 3)
    graph.add_max_pool2x2()
    assert graph.output_shapes(5, 4) == [(5, 4, 4), (10, 12, 4), (5, 6, 4)]
    assert graph.describe()[1]["size_height"] == 2 and graph.describe()[1]["size_width"] == 3
    with pytest.raises(ValueError, match="too large: upsampling layer 1"):
        graph.output_shapes(20000, 4)
    with pytest.raises(ValueError, match="size_width"):
        graph.add_upsample(2, 0)
    graph.add_flatten()
    with pytest.raises(ValueError, match="upsampling layer cannot follow a flatten"):
        graph.add_upsample(2, 2)
    assert graph.layer_count == 4


def test_graph_takes_clipped_relu_numbers():
    graph = _core.Graph(3)
    graph.add_conv(3, 4, "same", "clipped_relu", max_value=6.0)
    graph.add_activation("clipped_relu", 0.1, None, 0.5)
    graph.add_flatten()
    graph.add_dense(12, 2, "clipped_relu", negative_slope=0.2, max_value=1.0, threshold=0.25)
    ops = graph.describe()
    assert [op.get("max_value") for op in ops] == [6.0, None, None, 1.0]
    assert [op["threshold"] for op in ops] == [0.0, 0.5, 0.0, 0.25]
    assert [op["negative_slope"] for op in ops] == [0.0, pytest.approx(0.1), 0.0, pytest.approx(0.2)]
    with pytest.raises(ValueError, match="clipped_relu's; activation relu takes none"):
        graph.add_dense(2, 2, "relu", max_value=6.0)
    with pytest.raises(ValueError, match="clipped_relu's; activation leaky_relu takes none"):
        graph.add_activation("leaky_relu", 0.1, None, 0.5)
    with pytest.raises(ValueError, match="max_value must be a number >= 0"):
        graph.add_activation("clipped_relu", 0.0, -1.0)
    with pytest.raises(ValueError, match="max_value must be a number >= 0"):
        graph.add_activation("clipped_relu", 0.0, float("nan"))
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        graph.add_activation("clipped_relu", 0.0, None, float("inf"))
    assert graph.layer_count == 4  # nothing was added by the refused calls


def test_graph_takes_a_slope_only_for_leaky_relu():
    graph = _core.Graph(3)
    graph.add_conv(3, 4, "same", "leaky_relu", negative_slope=0.25)
    graph.add_activation("leaky_relu", 0.1)
    graph.add_flatten()
    graph.add_dense(12, 2, "leaky_relu", negative_slope=2.0)
    assert [op["negative_slope"] for op in graph.describe()] == [0.25, pytest.approx(0.1), 0.0, 2.0]
    assert [op["activation"] for op in graph.describe()][:2] == ["leaky_relu"] * 2
    with pytest.raises(ValueError, match="leaky_relu's and clipped_relu's; activation relu takes none"):
        graph.add_dense(2, 2, "relu", negative_slope=0.1)
    with pytest.raises(ValueError, match="finite"):
        graph.add_activation("leaky_relu", float("nan"))
    assert graph.layer_count == 4  # nothing was added by the refused calls


def test_bad_arguments_raise():
    x = np.zeros((1, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="1x1 or 3x3"):
        _core.testing.conv(x, np.zeros((5, 5, 3, 2), np.float32), None, "same", False, "reference")
    with pytest.raises(ValueError, match="padding"):
        _core.testing.pool2x2(x, "max", "full", "reference")
    with pytest.raises(ValueError, match="unknown activation"):
        _core.testing.activation(x, "sparsemax", "reference")
    with pytest.raises(ValueError, match="scale"):
        _core.testing.affine(x, np.zeros(2, np.float32), np.zeros(3, np.float32), "reference")
    with pytest.raises(ValueError, match="needs at least"):
        _core.testing.conv(np.zeros((1, 2, 2, 3), np.float32), np.zeros((3, 3, 3, 2), np.float32), None, "valid", False, "reference")
