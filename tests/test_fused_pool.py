"""A 2x2 max pool run inside the convolution before it (the Winograd kernels' output transform,
the AMX kernel's epilogue).

When nobody asks for the convolution's own output, the executor runs conv + pool as one
kernel (the output transform pools each tile and writes only the pooled image). Its result
must be bit-identical to the convolution followed by the pooling kernel, which is what the
executor runs when the convolution's output is requested too; and both must match the plain
float64 computation within the Winograd bound.
"""

import numpy as np
import pytest

from fastvgg import _core

from bf16_checks import requires_bf16
from kernel_checks import conv3x3_float64, winograd_error_bound


def pool_float64(y):
    n, h, w, c = y.shape
    y = y[:, : h // 2 * 2, : w // 2 * 2, :]
    return y.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def conv_pool(in_channels, filters, activation="relu"):
    graph = _core.Graph(in_channels)
    conv = graph.add_conv3x3(filters, activation)
    pool = graph.add_max_pool2x2()
    return graph, conv, pool


def loaded(graph, conv, in_channels, filters, seed=0, precision="fast"):
    rng = np.random.default_rng(seed)
    kernel = (rng.standard_normal((3, 3, in_channels, filters)) / np.sqrt(9 * in_channels)).astype(np.float32)
    bias = rng.standard_normal(filters).astype(np.float32) * 0.3
    executor = _core.CpuExecutor(graph, precision)
    executor.set_conv3x3_weights(conv, kernel, bias)
    return executor, kernel, bias


def fused_equals_unfused(executor, x, before, pool):
    """The pool's output run fused (nothing else asked for) and unfused (the output before it
    asked for too): bit-identical. Returns (pooled, output before the pool)."""
    (fused,) = executor.forward(x, [pool])
    got_before, unfused = executor.forward(x, [before, pool])
    np.testing.assert_array_equal(fused, unfused)
    return fused, got_before


# Even and odd sides, sides that end inside a tile (tiles are 4x4), a side of 2 and of 3
# (one window).
SIZES = [(8, 8), (14, 14), (9, 13), (6, 10), (2, 3), (3, 2), (5, 7), (3, 3)]


@pytest.mark.parametrize("height, width", SIZES)
@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_fused_pool_is_bit_identical_to_conv_then_pool(height, width, activation):
    graph, conv, pool = conv_pool(24, 40, activation)
    executor, kernel, bias = loaded(graph, conv, 24, 40)
    assert executor.method(conv).startswith("winograd")
    x = np.random.default_rng(1).standard_normal((2, height, width, 24)).astype(np.float32)
    fused, got_conv = fused_equals_unfused(executor, x, conv, pool)
    assert fused.shape == (2, height // 2, width // 2, 40)
    exact = conv3x3_float64(x, kernel, bias)
    bound = winograd_error_bound(x, kernel, bias)
    if activation == "relu":
        exact = np.maximum(exact, 0)
    # max is 1-Lipschitz: the pooled error is at most the largest error in its window.
    error = np.abs(fused.astype(np.float64) - pool_float64(exact))
    assert np.all(error <= pool_float64(bound)), error.max()


BF16_SETS = _core.testing.bf16_kernel_sets() if hasattr(_core.testing, "bf16_kernel_sets") else []
BF16_CONV = {"avx512_bf16": "winograd_f4x4_int14", "amx_bf16": "direct_bf16_amx"}


@requires_bf16
@pytest.mark.parametrize("kernel_set", BF16_SETS)
@pytest.mark.parametrize("height, width", SIZES)
def test_bf16_fused_pool_is_bit_identical_to_conv_then_pool(height, width, kernel_set, monkeypatch):
    # The int14 Winograd kernel of precision="bf16" pools in its output transform too, the AMX
    # kernel in its epilogue.
    monkeypatch.setenv("FASTVGG_BF16_KERNELS", kernel_set)
    graph, conv, pool = conv_pool(24, 40)
    executor, _, _ = loaded(graph, conv, 24, 40, precision="bf16")
    assert executor.method(conv) == BF16_CONV[kernel_set]
    x = np.random.default_rng(7).standard_normal((2, height, width, 24)).astype(np.float32)
    x[1, 0, 0, 3] = np.nan
    pooled, got_conv = fused_equals_unfused(executor, x, conv, pool)
    np.testing.assert_array_equal(pooled, pool_float64(got_conv.astype(np.float64)).astype(np.float32))


def test_nan_in_a_window_survives_the_fused_pool():
    graph, conv, pool = conv_pool(16, 16)
    executor, _, _ = loaded(graph, conv, 16, 16)
    x = np.random.default_rng(2).standard_normal((1, 8, 8, 16)).astype(np.float32)
    x[0, 3, 5, 7] = np.nan
    pooled, _ = fused_equals_unfused(executor, x, conv, pool)
    assert np.isnan(pooled).any()


def test_the_pool_after_a_folded_normalization_and_relu_fuses_too():
    # conv (linear) -> affine -> relu -> pool: the affine map folds, the ReLU and the pool run in
    # the convolution's kernel; asking for the ReLU's output runs each on its own.
    rng = np.random.default_rng(3)
    graph = _core.Graph(20)
    conv = graph.add_conv3x3(32, "linear")
    affine = graph.add_affine(32)
    relu = graph.add_activation("relu")
    pool = graph.add_max_pool2x2()
    executor = _core.CpuExecutor(graph, "fast")
    with executor.updating():
        executor.set_conv3x3_weights(conv, (rng.standard_normal((3, 3, 20, 32)) * 0.1).astype(np.float32),
                                     rng.standard_normal(32).astype(np.float32))
        executor.set_affine(affine, rng.uniform(0.5, 2, 32).astype(np.float32), rng.standard_normal(32).astype(np.float32))
    assert executor.method(affine) == "folded"
    x = rng.standard_normal((2, 10, 11, 20)).astype(np.float32)
    pooled, got_relu = fused_equals_unfused(executor, x, relu, pool)
    np.testing.assert_array_equal(pooled, pool_float64(got_relu.astype(np.float64)).astype(np.float32))


@pytest.mark.parametrize("precision", ["fast"] + [f"bf16 {name}" for name in BF16_SETS])
def test_batched_layers_pool_inside_the_kernel_too(precision, monkeypatch):
    # 512 -> 512 channels: weights large enough to run batched over the images (fp32 and int14
    # Winograd U, the AMX kernel's 4.7 MB of bf16).
    if precision != "fast":
        monkeypatch.setenv("FASTVGG_BF16_KERNELS", precision.split()[1])
    graph, conv, pool = conv_pool(512, 512)
    executor, _, _ = loaded(graph, conv, 512, 512, seed=4, precision=precision.split()[0])
    x = np.random.default_rng(5).standard_normal((3, 7, 9, 512)).astype(np.float32)
    fused, _ = fused_equals_unfused(executor, x, conv, pool)
    for n in range(3):
        (single,) = executor.forward(x[n : n + 1], [pool])
        np.testing.assert_array_equal(fused[n], single[0])


def test_direct_convolutions_keep_the_separate_pool():
    # precision="highest" runs the direct kernel, which has no pooled variant.
    graph, conv, pool = conv_pool(24, 16)
    executor, kernel, bias = loaded(graph, conv, 24, 16, precision="highest")
    assert executor.method(conv).startswith("direct")
    x = np.random.default_rng(6).standard_normal((1, 9, 9, 24)).astype(np.float32)
    (pooled,) = executor.forward(x, [pool])
    got_conv, _ = executor.forward(x, [conv, pool])
    np.testing.assert_array_equal(pooled, pool_float64(got_conv.astype(np.float64)).astype(np.float32))
