"""Each CUDA kernel against an exact (float64) numpy result and against the CPU kernels of
fastvgg._core.testing, on the emulator (always) and on a GPU (``pytest -m gpu``).

Bounds come from the arithmetic: a sum of k float32 products accumulated with fmaf is within
gamma(k) * sum|terms| of the exact sum (Higham), plus one rounding for the bias. The shapes
are chosen awkward: 3 input channels, pixel counts and depths that are not multiples of the
64 x 64 x 16 GEMM tile, odd sizes for the pools, batches above 1.
"""

import numpy as np
import pytest

from cuda_backends import backend  # noqa: F401 (a fixture)
from fastvgg import _core
from kernel_checks import UNIT_ROUNDOFF, assert_within, conv3x3_float64, gamma, random_array

CPU_ISA = _core.active_isa()

# (batch, height, width, in_channels, filters)
CONV_SHAPES = [
    (1, 1, 1, 3, 1),
    (2, 13, 11, 3, 70),  # block1_conv1-like: 27-deep sums, 143 pixels, 70 filters
    (1, 5, 67, 17, 65),  # depth 153 (not a multiple of 16), 65 filters (one past a tile)
    (3, 8, 8, 64, 64),
    (1, 9, 7, 130, 5),
]


def conv_exact_and_bound(x, kernel, bias, padding):
    if padding == "valid":
        exact = conv3x3_float64(x, kernel, bias)[:, 1:-1, 1:-1]
        magnitude = conv3x3_float64(np.abs(x), np.abs(kernel), np.abs(bias))[:, 1:-1, 1:-1]
    else:
        exact = conv3x3_float64(x, kernel, bias)
        magnitude = conv3x3_float64(np.abs(x), np.abs(kernel), np.abs(bias))
    depth = 9 * x.shape[3]
    return exact, gamma(depth + 1) * magnitude


def pool2x2(a, reduce=np.max):
    n, h, w, c = a.shape
    a = a[:, : h // 2 * 2, : w // 2 * 2]
    return reduce(a.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ["relu", "linear"])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv3x3_against_float64(backend, shape, activation, padding):
    n, h, w, c, f = shape
    if padding == "valid" and (h < 3 or w < 3):
        pytest.skip("a 'valid' 3x3 convolution needs at least 3x3 pixels")
    rng = np.random.default_rng(hash(shape) % 2**32)
    x, kernel, bias = random_array(rng, (n, h, w, c)), random_array(rng, (3, 3, c, f)), random_array(rng, (f,))
    y = backend.testing.conv3x3(x, kernel, bias, activation, padding, False)
    exact, bound = conv_exact_and_bound(x, kernel, bias, padding)
    if activation == "relu":
        exact = np.maximum(exact, 0)  # ReLU is 1-Lipschitz: the bound carries over
    assert y.shape == exact.shape
    assert_within(y, exact, bound, f"conv3x3 {padding} {activation} {shape}")


@pytest.mark.parametrize("shape", [(2, 13, 11, 3, 70), (1, 7, 9, 17, 65), (3, 2, 2, 64, 64), (1, 3, 5, 8, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv3x3_with_fused_pool(backend, shape, padding):
    n, h, w, c, f = shape
    if padding == "valid" and (h < 4 or w < 4):
        pytest.skip("too small to pool after a 'valid' convolution")
    rng = np.random.default_rng(1)
    x, kernel, bias = random_array(rng, (n, h, w, c)), random_array(rng, (3, 3, c, f)), random_array(rng, (f,))
    y = backend.testing.conv3x3(x, kernel, bias, "relu", padding, True)
    exact, bound = conv_exact_and_bound(x, kernel, bias, padding)
    # max is 1-Lipschitz in the largest error: the pooled bound is the window's largest bound.
    assert_within(y, pool2x2(np.maximum(exact, 0)), pool2x2(bound), f"conv3x3+pool {padding} {shape}")
    # And the fused epilogue equals the unfused kernel followed by the pool kernel, bit for bit.
    unfused = backend.testing.max_pool2x2(backend.testing.conv3x3(x, kernel, bias, "relu", padding, False))
    np.testing.assert_array_equal(y, unfused)


@pytest.mark.parametrize("shape", CONV_SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_conv3x3_against_cpu_kernels(backend, shape):
    n, h, w, c, f = shape
    rng = np.random.default_rng(2)
    x, kernel, bias = random_array(rng, (n, h, w, c)), random_array(rng, (3, 3, c, f)), random_array(rng, (f,))
    gpu = backend.testing.conv3x3(x, kernel, bias, "relu", "same", False)
    cpu = _core.testing.conv3x3(x, kernel, bias, True, CPU_ISA)
    _, bound = conv_exact_and_bound(x, kernel, bias, "same")
    # Both are within `bound` of the exact result.
    assert_within(gpu, cpu.astype(np.float64), 2 * bound, f"conv3x3 against the {CPU_ISA} kernel")


def test_conv3x3_keeps_nan(backend):
    rng = np.random.default_rng(3)
    x = random_array(rng, (1, 6, 6, 3))
    x[0, 2, 3, 1] = np.nan
    kernel, bias = random_array(rng, (3, 3, 3, 4)), random_array(rng, (4,))
    y = backend.testing.conv3x3(x, kernel, bias, "relu", "same", False)
    assert np.isnan(y[0, 1:4, 2:5]).all() and not np.isnan(y[0, 5]).any()
    pooled = backend.testing.conv3x3(x, kernel, bias, "relu", "same", True)
    assert np.isnan(pooled[0, 0:2, 1:3]).all() and not np.isnan(pooled[0, 2]).any()


def test_results_do_not_depend_on_the_block_order():
    from cuda_builds import emulated_module

    module = emulated_module()
    rng = np.random.default_rng(4)
    x, kernel, bias = random_array(rng, (2, 13, 11, 3, )), random_array(rng, (3, 3, 3, 70)), random_array(rng, (70,))
    runs = []
    for seed in (1, 2):
        module.testing.set_block_order_seed(seed)
        runs.append(module.testing.conv3x3(x, kernel, bias, "relu", "same", True))
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("shape", [(1, 2, 2, 1), (3, 7, 9, 5), (2, 5, 4, 70), (1, 33, 1, 3)], ids=str)
def test_max_pool2x2(backend, shape):
    rng = np.random.default_rng(5)
    x = random_array(rng, shape)
    y = backend.testing.max_pool2x2(x)
    np.testing.assert_array_equal(y, pool2x2(x))  # max is exact
    if shape[1] >= 2 and shape[2] >= 2:
        np.testing.assert_array_equal(y, _core.testing.max_pool2x2(x, CPU_ISA))


def test_pools_keep_nan(backend):
    x = np.ones((1, 4, 4, 2), np.float32)
    x[0, 1, 2, 0] = np.nan
    y = backend.testing.max_pool2x2(x)
    assert np.isnan(y[0, 0, 1, 0]) and np.isnan(y).sum() == 1
    for mode in ("avg", "max"):
        g = backend.testing.global_pool(x, mode)
        assert np.isnan(g[0, 0]) and not np.isnan(g[0, 1])


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 7, 5, 66), (2, 14, 14, 512), (1, 3, 2, 130)], ids=str)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_global_pool(backend, shape, mode):
    rng = np.random.default_rng(6)
    x = random_array(rng, shape)
    y = backend.testing.global_pool(x, mode)
    if mode == "max":
        np.testing.assert_array_equal(y, x.max(axis=(1, 2)))
    else:
        pixels = shape[1] * shape[2]
        # 4 partial sums then their sum (pixels + 3 additions at most), then one division.
        bound = gamma(pixels + 4) * np.abs(x.astype(np.float64)).mean(axis=(1, 2))
        assert_within(y, x.astype(np.float64).mean(axis=(1, 2)), bound, f"global average pool {shape}")
    assert_within(y, _core.testing.global_pool(x, mode, CPU_ISA).astype(np.float64),
                  2 * gamma(shape[1] * shape[2] + 4) * np.abs(x).max(axis=(1, 2)), f"global {mode} pool vs CPU")


# (rows, depth, units)
DENSE_SHAPES = [(1, 1, 1), (1, 300, 77), (3, 513, 70), (4, 25, 257), (5, 300, 77), (70, 129, 65)]


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", ["auto", "gemm", "gemv"])
@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_dense(backend, shape, path, activation):
    rows, depth, units = shape
    if path == "gemv" and rows > 4:
        pytest.skip("the bandwidth-bound path takes at most 4 rows")
    rng = np.random.default_rng(7)
    x, kernel, bias = random_array(rng, (rows, depth)), random_array(rng, (depth, units)), random_array(rng, (units,))
    y = backend.testing.dense(x, kernel, bias, activation, path)
    exact = x.astype(np.float64) @ kernel + bias
    # The GEMV path adds one partial sum per 256-deep slice at the end.
    additions = depth + 1 + (depth + 255) // 256
    bound = gamma(additions) * (np.abs(x).astype(np.float64) @ np.abs(kernel) + np.abs(bias))
    if activation == "relu":
        exact = np.maximum(exact, 0)
    assert_within(y, exact, bound, f"dense {path} {shape}")
    cpu = _core.testing.dense(x, kernel, bias, activation == "relu", CPU_ISA)
    assert_within(y, cpu.astype(np.float64), 2 * bound, f"dense {path} {shape} against the {CPU_ISA} kernel")


@pytest.mark.parametrize("shape", [(1, 1), (3, 10), (2, 1000), (4, 257)], ids=str)
def test_softmax(backend, shape):
    rng = np.random.default_rng(8)
    x = (rng.standard_normal(shape) * 20).astype(np.float32)
    x[0, 0] = 80.0  # would overflow exp() without the max subtraction
    y = backend.testing.softmax(x)
    shifted = x.astype(np.float64) - x.max(axis=1, keepdims=True)
    exact = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    # x - max rounds to u*|x - max| (that much relative error after exp), exp itself is within
    # 2 ulp, the sum of cols terms within gamma(cols), the reciprocal and product 1 ulp each.
    # Tiny probabilities are subnormal in float32, where each rounding is absolute (2^-150):
    # a few of those are added.
    bound = exact * (UNIT_ROUNDOFF * np.abs(shifted) + gamma(shape[1] + 6)) + 4 * 2.0**-149
    assert_within(y, exact, bound, f"softmax {shape}")
    assert_within(y, _core.testing.softmax(x).astype(np.float64), 2 * bound, "softmax against the CPU")


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 33, 70), (3, 64, 3), (1, 3, 224 * 5)], ids=str)
def test_layout_transpose(backend, shape):
    x = random_array(np.random.default_rng(9), shape)
    np.testing.assert_array_equal(backend.testing.transpose(x), x.transpose(0, 2, 1))
    # NCHW -> NHWC of an image batch is the transpose of each image's (C, H*W) matrix.
    n, c, hw = shape
    np.testing.assert_array_equal(backend.testing.transpose(x).reshape(n, hw, c), np.moveaxis(x, 1, 2))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: t.conv3x3(np.zeros((1, 4, 4, 3), np.float32), np.zeros((3, 3, 2, 4), np.float32), np.zeros(4, np.float32)), "kernel must have shape"),
        (lambda t: t.conv3x3(np.zeros((1, 2, 2, 3), np.float32), np.zeros((3, 3, 3, 4), np.float32), np.zeros(4, np.float32), "relu", "valid"), "empty"),
        (lambda t: t.conv3x3(np.zeros((1, 4, 4, 3), np.float32), np.zeros((3, 3, 3, 4), np.float32), np.zeros(4, np.float32), "sparsemax"), "unknown activation"),
        (lambda t: t.dense(np.zeros((5, 3), np.float32), np.zeros((3, 2), np.float32), np.zeros(2, np.float32), "linear", "gemv"), "at most 4 rows"),
        (lambda t: t.dense(np.zeros((1, 3), np.float32), np.zeros((4, 2), np.float32), np.zeros(2, np.float32)), "kernel must have shape"),
        (lambda t: t.global_pool(np.zeros((1, 2, 2, 3), np.float32), "min"), "mode"),
    ],
)  # fmt: skip
def test_bad_arguments_raise(backend, call, message):
    with pytest.raises(ValueError, match=message):
        call(backend.testing)
