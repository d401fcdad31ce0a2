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
from kernel_checks import ISAS, UNIT_ROUNDOFF, assert_within, gamma, random_array
from numpy_chain import activation as numpy_activation
from numpy_chain import conv as numpy_conv
from numpy_chain import pool2x2 as numpy_pool

ACTIVATIONS = ["linear", "relu", "sigmoid", "tanh", "elu", "selu", "gelu", "swish", "softplus"]
# Relative bound per activation, in units of float32's unit roundoff; gelu's erfc is evaluated
# at a rounded argument, and its relative sensitivity grows with x^2 (|x| < 6 here).
ULPS = {"gelu": 96}


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
    bound = ULPS.get(name, 8) * UNIT_ROUNDOFF * np.abs(exact) + 1e-37
    assert_within(_core.testing.activation(x, name, isa), exact, bound, f"{isa} {name}")
    assert_within(_core.testing.activation(x, name, "reference"), exact, bound, f"reference {name}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_extremes_and_nan(isa, name):
    x = np.array([-1e30, -100.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 100.0, 3e38, np.nan], np.float32)
    exact = numpy_activation(x[:-1].astype(np.float64), name)
    got = _core.testing.activation(x, name, isa)
    assert np.isnan(got[-1]), f"{name} of NaN must be NaN"
    finite = np.isfinite(exact)
    np.testing.assert_allclose(got[:-1][finite], exact[finite], rtol=ULPS.get(name, 8) * UNIT_ROUNDOFF, atol=1e-37)
    assert np.array_equal(np.isinf(got[:-1]), np.isinf(exact))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["sigmoid", "softplus", "gelu", "elu"])
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
    assert_within(inner, exact, ULPS.get(name, 8) * UNIT_ROUNDOFF * np.abs(exact) + 1e-37, f"{isa} {name} in place")


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


def test_graph_takes_a_slope_only_for_leaky_relu():
    graph = _core.Graph(3)
    graph.add_conv(3, 4, "same", "leaky_relu", negative_slope=0.25)
    graph.add_activation("leaky_relu", 0.1)
    graph.add_flatten()
    graph.add_dense(12, 2, "leaky_relu", negative_slope=2.0)
    assert [op["negative_slope"] for op in graph.describe()] == [0.25, pytest.approx(0.1), 0.0, 2.0]
    assert [op["activation"] for op in graph.describe()][:2] == ["leaky_relu"] * 2
    with pytest.raises(ValueError, match="leaky_relu's; activation relu takes none"):
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
        _core.testing.activation(x, "hard_sigmoid", "reference")
    with pytest.raises(ValueError, match="scale"):
        _core.testing.affine(x, np.zeros(2, np.float32), np.zeros(3, np.float32), "reference")
    with pytest.raises(ValueError, match="needs at least"):
        _core.testing.conv(np.zeros((1, 2, 2, 3), np.float32), np.zeros((3, 3, 3, 2), np.float32), None, "valid", False, "reference")
