"""The CUDA kernels of the ops fine-tuned models add, on the emulator (always) and on a GPU
(``pytest -m gpu``): 1x1 convolutions (the dense GEMM over pixels), 'valid' 3x3 ones with every
activation, 2x2 average and 'same' pooling (kernels/pool.cuh's window pool), affine maps
(kernels/affine.cuh) and element-wise activations (kernels/activation.cuh). Each is held to
exact float64 numpy (tests/numpy_chain.py's ops) and to the CPU kernels of fastvgg._core.testing.

Bounds come from the arithmetic (tests/cuda_bounds.py derives those of the convolutions and
activations):

- pooling: max is exact; an average adds at most 4 values in the CPU kernel's order and
  multiplies by 1, 1/2 or 1/4 (exact), so it equals the CPU's bit for bit, and is within
  gamma(3) * mean|x| of exact.
- an affine map is one fmaf, rounded once: within u * |exact|, and the CPU's bits (it uses fma too).

Shapes are awkward: 1, 3, 17, 19, 33, 70, 130, 300 channels (none a multiple of the 16-wide GEMM
depth step or the 64-wide tiles, or straddling them), odd sizes whose 'same' windows hang over
the edge, 1 to 4 pixels (the 1x1 convolution then takes the bandwidth-bound dense path), and
grids capped to a few blocks so that the element-wise kernels' grid-stride loops run.
"""

import numpy as np
import pytest

from cuda_backends import backend  # noqa: F401 (a fixture)
from cuda_bounds import ULPS, activated_bound, conv_exact_and_bound, own_error
from fastvgg import _core
from kernel_checks import UNIT_ROUNDOFF, assert_within, gamma, random_array
from numpy_chain import activation as numpy_activation
from numpy_chain import pool2x2 as numpy_pool

CPU_ISA = _core.active_isa()
U = UNIT_ROUNDOFF
ELEMENTWISE = ["linear", "relu", "sigmoid", "tanh", "elu", "selu", "gelu", "swish", "softplus", "softsign", "mish",
               "hard_sigmoid", "hard_sigmoid_keras2", "hard_silu"]
# Activations without a Lipschitz constant (exp): run as passes, not through the convolutions'
# propagated bounds.
UNBOUNDED = ["exponential"]


def normalised_conv_weights(rng, size, cin, cout):
    # Outputs of about unit size: the activations' interesting range, and gelu's bound stays tight.
    kernel = random_array(rng, (size, size, cin, cout)) / np.float32(size * np.sqrt(cin))
    return kernel, random_array(rng, (cout,)) * np.float32(0.3)


# (batch, height, width, in_channels, filters); the last two have 4 and 3 pixels: the 1x1
# convolution then runs the dense layer's bandwidth-bound path (1-4 rows).
CONV1X1_SHAPES = [(1, 1, 1, 1, 1), (2, 5, 7, 3, 70), (1, 3, 3, 130, 65), (3, 4, 6, 17, 33), (1, 2, 2, 19, 5),
                  (1, 1, 3, 300, 7)]


@pytest.mark.parametrize("shape", CONV1X1_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ["relu", "linear", "elu"])
def test_conv1x1_against_float64(backend, shape, activation):
    n, h, w, c, f = shape
    rng = np.random.default_rng([n, h, w, c, f])
    x = random_array(rng, (n, h, w, c))
    kernel, bias = normalised_conv_weights(rng, 1, c, f)
    y, pre = backend.testing.conv(x, kernel, bias, activation, "valid", False, True)
    # The bandwidth-bound path adds one partial sum per 256-deep slice at the end.
    slices = (c + 255) // 256
    exact_pre, pre_bound, exact, bound = conv_exact_and_bound(x, kernel, bias, "valid", activation, slices)
    assert y.shape == exact.shape == pre.shape
    assert_within(pre, exact_pre, pre_bound, f"conv1x1 {shape} before {activation}")
    assert_within(y, exact, bound, f"conv1x1 {shape} {activation}")


@pytest.mark.parametrize("activation", ELEMENTWISE)
@pytest.mark.parametrize("size, padding", [(1, "same"), (3, "valid"), (3, "same")])
def test_convolution_with_every_activation(backend, activation, size, padding):
    rng = np.random.default_rng([size, len(activation)])
    n, h, w, c, f = 2, 7, 9, 19, 33
    x = random_array(rng, (n, h, w, c))
    kernel, bias = normalised_conv_weights(rng, size, c, f)
    y, pre = backend.testing.conv(x, kernel, bias, activation, padding, False, True)
    exact_pre, pre_bound, exact, bound = conv_exact_and_bound(x, kernel, bias, padding, activation)
    assert_within(pre, exact_pre, pre_bound, f"{size}x{size} {padding} conv before {activation}")
    assert_within(y, exact, bound, f"{size}x{size} {padding} conv {activation}")
    # The activation after the GEMM is the element-wise kernel on the linear output, bit for bit.
    np.testing.assert_array_equal(y, backend.testing.activation(pre, activation))


@pytest.mark.parametrize("shape", [(1, 3, 3, 1, 1), (2, 9, 7, 3, 70), (1, 5, 67, 17, 65), (1, 4, 3, 130, 5)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("size", [1, 3])
def test_conv_against_cpu_kernels(backend, shape, size):
    n, h, w, c, f = shape
    rng = np.random.default_rng([n, h, w, c, f, size])
    x = random_array(rng, (n, h, w, c))
    kernel, bias = random_array(rng, (size, size, c, f)), random_array(rng, (f,))
    gpu = backend.testing.conv(x, kernel, bias, "relu", "valid")
    cpu = _core.testing.conv(x, kernel, bias, "valid", True, CPU_ISA)
    _, _, _, bound = conv_exact_and_bound(x, kernel, bias, "valid", "relu")
    # Both are within `bound` of the exact result (the CPU sums in another order, from the bias).
    assert_within(gpu, cpu.astype(np.float64), 2 * bound, f"{size}x{size} valid conv against the {CPU_ISA} kernel")


def test_conv_fused_pool_refuses_pass_activations(backend):
    x, kernel, bias = np.zeros((1, 4, 4, 3), np.float32), np.zeros((3, 3, 3, 2), np.float32), np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="fused pool"):
        backend.testing.conv(x, kernel, bias, "swish", "same", True)
    with pytest.raises(ValueError, match="fused pool"):
        backend.testing.conv3x3(x, kernel, bias, "gelu", "same", True)


POOL_SHAPES = [(1, 7, 13, 3), (2, 13, 7, 17), (1, 2, 2, 16), (1, 1, 1, 5), (2, 9, 9, 33), (1, 4, 6, 64), (1, 1, 6, 70),
               (3, 5, 1, 2)]


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_window_pool(backend, shape, padding):
    if padding == "valid" and (shape[1] < 2 or shape[2] < 2):
        pytest.skip("'valid' 2x2 pooling needs 2x2 pixels")
    x = random_array(np.random.default_rng(list(shape)), shape)
    same = padding == "same"
    peak = backend.testing.pool2x2(x, "max", padding)
    np.testing.assert_array_equal(peak, numpy_pool(x.astype(np.float64), "max", same))
    average = backend.testing.pool2x2(x, "avg", padding)
    exact = numpy_pool(x.astype(np.float64), "avg", same)
    assert_within(average, exact, gamma(3) * numpy_pool(np.abs(x).astype(np.float64), "avg", same), f"avg pool {padding}")
    for mode, got in (("max", peak), ("avg", average)):
        np.testing.assert_array_equal(got, _core.testing.pool2x2(x, mode, padding, CPU_ISA), err_msg=f"{mode} vs the CPU")


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_window_pool_keeps_nan(backend, mode):
    x = np.ones((1, 5, 5, 3), np.float32)
    x[0, 4, 4, 1] = np.nan  # in the window that hangs over the edge under 'same'
    x[0, 0, 1, 0] = np.nan
    y = backend.testing.pool2x2(x, mode, "same")
    assert np.isnan(y[0, 2, 2, 1]) and np.isnan(y[0, 0, 0, 0]) and np.isnan(y).sum() == 2


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 17), (4, 70), (1, 7, 9, 3), (2, 5, 3, 19), (1, 3, 14, 33), (5, 300)],
                         ids=str)
@pytest.mark.parametrize("max_blocks", [0, 1, 3])
def test_affine(backend, shape, max_blocks):
    rng = np.random.default_rng(list(shape) + [max_blocks])
    x = random_array(rng, shape)
    scale, shift = random_array(rng, shape[-1:]), random_array(rng, shape[-1:])
    y = backend.testing.affine(x, scale, shift, max_blocks)
    exact = x.astype(np.float64) * scale + shift
    bound = U * np.abs(exact) + 1e-45
    assert_within(y, exact, bound, f"affine {shape}")
    cpu = _core.testing.affine(x, scale, shift, CPU_ISA)
    if CPU_ISA == "generic":  # its fmadd is a product and a sum, two roundings
        assert_within(y, cpu.astype(np.float64), bound + gamma(2) * (np.abs(x * scale.astype(np.float64)) + np.abs(shift)), "affine vs CPU")
    else:
        np.testing.assert_array_equal(y, cpu)


@pytest.mark.parametrize("name", ELEMENTWISE + UNBOUNDED)
@pytest.mark.parametrize("shape, max_blocks", [((37,), 0), ((3, 21), 0), ((2, 5, 7, 3), 0), ((1, 9, 11, 19), 1),
                                               ((4, 300), 2)], ids=str)
def test_activation(backend, name, shape, max_blocks):
    rng = np.random.default_rng([len(shape), shape[-1]])
    x = (random_array(rng, shape) * 3).astype(np.float32)
    y = backend.testing.activation(x, name, max_blocks)
    bound = own_error(name, x)
    assert_within(y, numpy_activation(x, name), bound, f"{name} {shape}")
    cpu = _core.testing.activation(x, name, CPU_ISA)
    assert_within(y, cpu.astype(np.float64), 2 * bound, f"{name} against the {CPU_ISA} kernel")


@pytest.mark.parametrize("name", ELEMENTWISE + UNBOUNDED)
def test_activation_extremes_and_nan(backend, name):
    x = np.array([-1e30, -100.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 100.0, 3e38, np.nan], np.float32)
    exact = numpy_activation(x[:-1].astype(np.float64), name)
    got = backend.testing.activation(x, name)
    assert np.isnan(got[-1]), f"{name} of NaN must be NaN"
    with np.errstate(over="ignore"):  # exp(100) is beyond float32: inf, correctly rounded
        exact32 = exact.astype(np.float32)
    finite = np.isfinite(exact32)
    np.testing.assert_allclose(got[:-1][finite], exact[finite], rtol=ULPS.get(name, 8) * U, atol=1e-37)
    assert np.array_equal(np.isinf(got[:-1]), np.isinf(exact32))


@pytest.mark.parametrize("slope", [0.3, 0.2, 1.5, -0.25])
@pytest.mark.parametrize("shape, max_blocks", [((37,), 0), ((2, 5, 7, 3), 0), ((4, 300), 2)], ids=str)
def test_leaky_relu_is_the_cpu_kernels_rounded_product(backend, slope, shape, max_blocks):
    """x < 0 ? slope * x : x is one float32 product: the CPU kernel's bits, and exact."""
    rng = np.random.default_rng([len(shape), shape[-1], int(slope * 100) + 50])
    x = (random_array(rng, shape) * 3).astype(np.float32)
    x.reshape(-1)[:3] = [np.nan, -np.inf, -1e-45]
    y = backend.testing.activation(x, "leaky_relu", max_blocks, slope)
    np.testing.assert_array_equal(y, _core.testing.activation(x, "leaky_relu", CPU_ISA, slope))
    s32 = np.float64(np.float32(slope))
    np.testing.assert_array_equal(y, np.where(x < 0, (s32 * x.astype(np.float64)).astype(np.float32), x))


@pytest.mark.parametrize("numbers", [(0.0, 6.0, 0.0), (0.2, None, 1.0), (0.3, 2.5, 0.7), (1.7, 1.0, 0.1)], ids=str)
@pytest.mark.parametrize("shape, max_blocks", [((37,), 0), ((2, 5, 7, 3), 0), ((4, 300), 2)], ids=str)
def test_clipped_relu_is_the_cpu_kernels_bits(backend, numbers, shape, max_blocks):
    """Keras's ReLU with a cap or threshold: two float32 roundings (threshold - x, the slope's
    product) done in the same order as the CPU kernels, so the same bits, infinities and NaN too."""
    slope, cap, threshold = numbers
    rng = np.random.default_rng([len(shape), shape[-1], int(threshold * 10)])
    x = (random_array(rng, shape) * 3).astype(np.float32)
    x.reshape(-1)[:4] = [np.nan, -np.inf, np.inf, threshold]
    y = backend.testing.activation(x, "clipped_relu", max_blocks, slope, cap, threshold)
    np.testing.assert_array_equal(y, _core.testing.activation(x, "clipped_relu", CPU_ISA, slope, cap, threshold))
    finite = np.isfinite(x)
    cap32 = None if cap is None else np.float32(cap)
    exact = numpy_activation(x[finite].astype(np.float64), "clipped_relu", np.float32(slope), cap32, np.float32(threshold))
    assert_within(y[finite], exact, gamma(2) * np.abs(exact) + 1e-45, f"clipped_relu {numbers}")


@pytest.mark.parametrize("shape, size, max_blocks", [((2, 5, 7, 3), (2, 2), 0), ((1, 3, 4, 17), (3, 1), 1),
                                                     ((1, 1, 1, 33), (1, 4), 2)], ids=str)
def test_upsample_is_the_cpu_kernels_copy(backend, shape, size, max_blocks):
    rng = np.random.default_rng([shape[-1], *size])
    x = random_array(rng, shape)
    x.reshape(-1)[:2] = [np.nan, -np.inf]
    y = backend.testing.upsample(x, *size, max_blocks)
    np.testing.assert_array_equal(y, np.repeat(np.repeat(x, size[0], axis=1), size[1], axis=2))
    np.testing.assert_array_equal(y, _core.testing.upsample(x, *size, CPU_ISA))


@pytest.mark.parametrize("shape, extent, max_blocks", [((2, 5, 7, 3), (1, 1), 0), ((1, 4, 3, 17), (4, 3), 1),
                                                       ((2, 6, 5, 32), (6, 1), 2), ((1, 3, 9, 33), (1, 9), 0),
                                                       ((4, 300), None, 2)], ids=str)
def test_prelu_is_the_cpu_kernels_bits(backend, shape, extent, max_blocks):
    """PReLU, alpha per channel, pixel, row or column (or feature): one float32 product, the CPU
    kernel's bits and exact; infinities and NaN too."""
    rng = np.random.default_rng([len(shape), shape[-1]])
    x = (random_array(rng, shape) * 3).astype(np.float32)
    x.reshape(-1)[:3] = [np.nan, -np.inf, -1e-45]
    alpha = rng.uniform(-1.5, 1.5, (extent or (1, 1)) + (shape[-1],)).astype(np.float32)
    y = backend.testing.prelu(x, alpha, max_blocks)
    np.testing.assert_array_equal(y, _core.testing.prelu(x, alpha, CPU_ISA))
    broadcast = alpha if len(shape) == 4 else alpha.reshape(-1)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(y, np.where(x < 0, (broadcast.astype(np.float64) * x).astype(np.float32), x))


@pytest.mark.parametrize("activation", ["sigmoid", "gelu", "softplus", "tanh"])
@pytest.mark.parametrize("rows, path", [(3, "gemv"), (3, "gemm"), (70, "auto")])
def test_dense_with_pass_activations(backend, activation, rows, path):
    rng = np.random.default_rng([rows, len(activation)])
    depth, units = 300, 77
    x = random_array(rng, (rows, depth))
    kernel = random_array(rng, (depth, units)) / np.float32(np.sqrt(depth))
    bias = random_array(rng, (units,)) * np.float32(0.3)
    y = backend.testing.dense(x, kernel, bias, activation, path)
    pre = x.astype(np.float64) @ kernel + bias
    # The GEMV path adds one partial sum per 256-deep slice at the end (see test_cuda_kernels).
    sum_bound = gamma(depth + 1 + (depth + 255) // 256) * (np.abs(x).astype(np.float64) @ np.abs(kernel) + np.abs(bias))
    bound = activated_bound(activation, pre, sum_bound)
    assert_within(y, numpy_activation(pre, activation), bound, f"dense {path} {activation}")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: t.conv(np.zeros((1, 4, 4, 3), np.float32), np.zeros((5, 5, 3, 2), np.float32), np.zeros(2, np.float32)), "1x1 or 3x3"),
        (lambda t: t.conv(np.zeros((1, 4, 4, 3), np.float32), np.zeros((1, 1, 3, 2), np.float32), np.zeros(2, np.float32), "softmax"), "softmax"),
        (lambda t: t.pool2x2(np.zeros((1, 4, 4, 3), np.float32), "min", "same"), "pool_mode"),
        (lambda t: t.pool2x2(np.zeros((1, 4, 4, 3), np.float32), "max", "full"), "padding"),
        (lambda t: t.pool2x2(np.zeros((1, 1, 4, 3), np.float32), "avg", "valid"), "needs 2x2"),
        (lambda t: t.affine(np.zeros((2, 3), np.float32), np.zeros(2, np.float32), np.zeros(3, np.float32)), "scale must have shape"),
        (lambda t: t.activation(np.zeros(3, np.float32), "sparsemax"), "unknown activation"),
        (lambda t: t.activation(np.zeros(3, np.float32), "softmax"), "not element-wise"),
    ],
)  # fmt: skip
def test_bad_arguments_raise(backend, call, message):
    with pytest.raises(ValueError, match=message):
        call(backend.testing)
