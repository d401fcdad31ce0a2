"""Every optimized kernel, on every instruction set this CPU runs, against the plain reference.

Each fast kernel is compared with two yardsticks: the C++ reference kernel (plain loops over
NHWC) and the exact float64 result. The tolerance is not guessed: a float32 dot product of
length K, summed in any order, is within gamma_K * sum|x_i * w_i| of the exact value, with
gamma_K = K*u / (1 - K*u) and u = 2**-24 (Higham, Accuracy and Stability of Numerical
Algorithms, 3.1). ReLU and max are 1-Lipschitz and do not widen it. A layout or indexing
bug produces errors of the size of the values themselves, far above this bound.
"""

import numpy as np
import pytest

from fastvgg import _core
from helpers import rel_l2
from kernel_checks import (
    ISAS,
    ROUNDING_SAFETY,
    UNIT_ROUNDOFF,
    VGG_CHANNEL_PAIRS,
    assert_within,
    conv3x3_float64,
    gamma,
    random_array,
    winograd_rms_error,
)


def check_conv(isa, rng, n, h, w, cin, cout, relu):
    x = random_array(rng, (n, h, w, cin))
    kernel = random_array(rng, (3, 3, cin, cout))
    bias = random_array(rng, (cout,))
    exact = conv3x3_float64(x, kernel, bias)
    magnitude = conv3x3_float64(np.abs(x), np.abs(kernel), np.abs(bias))
    if relu:
        exact = np.maximum(exact, 0.0)
    bound = gamma(9 * cin + 1) * magnitude
    fast = _core.testing.conv3x3(x, kernel, bias, relu, isa)
    reference = _core.testing.conv3x3(x, kernel, bias, relu, "reference")
    assert fast.shape == (n, h, w, cout) and fast.dtype == np.float32
    assert_within(reference, exact, bound, "reference conv3x3 vs float64")
    assert_within(fast, exact, bound, f"{isa} conv3x3 vs float64")
    assert_within(fast, reference.astype(np.float64), 2 * bound, f"{isa} conv3x3 vs reference")


# Register tiles are 14 pixels on AVX-512, 6 on AVX2 and 4 in plain C++: widths around them hit
# every tail path. 16 channels make one block: 15 and 17 straddle it.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "n, h, w, cin, cout",
    [
        (1, 7, 13, 3, 5),
        (3, 13, 7, 17, 33),
        (1, 33, 33, 5, 17),
        (2, 1, 1, 16, 16),
        (1, 2, 15, 15, 31),
        (1, 6, 29, 32, 48),
        (1, 5, 28, 1, 1),
        (3, 4, 14, 16, 32),
    ],
)
@pytest.mark.parametrize("relu", [True, False])
def test_conv3x3_awkward_shapes(isa, n, h, w, cin, cout, relu):
    check_conv(isa, np.random.default_rng([n, h, w, cin, cout]), n, h, w, cin, cout, relu)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cin, cout", VGG_CHANNEL_PAIRS)
def test_conv3x3_vgg_layer_shapes(isa, cin, cout):
    check_conv(isa, np.random.default_rng([cin, cout]), 1, 7, 15, cin, cout, relu=True)


@pytest.mark.parametrize("isa", ISAS)
def test_conv3x3_random_shapes(isa):
    rng = np.random.default_rng(2024)
    for _ in range(12):
        n, h, w = rng.integers(1, 4), rng.integers(1, 20), rng.integers(1, 40)
        cin, cout = rng.integers(1, 70), rng.integers(1, 70)
        check_conv(isa, rng, n, h, w, cin, cout, relu=bool(rng.integers(2)))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n, h, w, c", [(1, 7, 13, 3), (3, 13, 7, 17), (2, 2, 2, 16), (1, 3, 2, 5), (1, 33, 33, 64)])
def test_max_pool2x2_is_exact(isa, n, h, w, c):
    rng = np.random.default_rng([n, h, w, c])
    x = random_array(rng, (n, h, w, c))
    expected = x[:, : h // 2 * 2, : w // 2 * 2, :].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    np.testing.assert_array_equal(_core.testing.max_pool2x2(x, "reference"), expected)
    np.testing.assert_array_equal(_core.testing.max_pool2x2(x, isa), expected)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n, h, w, c", [(1, 7, 13, 3), (3, 1, 1, 17), (2, 14, 14, 512), (1, 15, 20, 33)])
def test_global_pool(isa, n, h, w, c):
    rng = np.random.default_rng([n, h, w, c])
    x = random_array(rng, (n, h, w, c))
    np.testing.assert_array_equal(_core.testing.global_pool(x, "max", isa), x.max(axis=(1, 2)))
    np.testing.assert_array_equal(_core.testing.global_pool(x, "max", "reference"), x.max(axis=(1, 2)))
    exact = x.astype(np.float64).mean(axis=(1, 2))
    # A sum of h*w terms, then one rounding for the division.
    bound = (gamma(h * w) + UNIT_ROUNDOFF) * np.abs(x.astype(np.float64)).mean(axis=(1, 2))
    assert_within(_core.testing.global_pool(x, "avg", isa), exact, bound, f"{isa} global average")
    assert_within(_core.testing.global_pool(x, "avg", "reference"), exact, bound, "reference global average")


def check_dense(isa, rng, rows, depth, cols, relu):
    x = random_array(rng, (rows, depth))
    kernel = random_array(rng, (depth, cols))
    bias = random_array(rng, (cols,))
    exact = x.astype(np.float64) @ kernel.astype(np.float64) + bias
    if relu:
        exact = np.maximum(exact, 0.0)
    bound = gamma(depth + 1) * (np.abs(x.astype(np.float64)) @ np.abs(kernel.astype(np.float64)) + np.abs(bias))
    fast = _core.testing.dense(x, kernel, bias, relu, isa)
    reference = _core.testing.dense(x, kernel, bias, relu, "reference")
    assert fast.shape == (rows, cols)
    assert_within(reference, exact, bound, "reference dense vs float64")
    assert_within(fast, exact, bound, f"{isa} dense vs float64")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "rows, depth, cols",
    [
        (1, 1, 1),
        (1, 512, 1000),  # batch 1, one depth block, a ragged last panel (1000 = 62*16 + 8)
        (7, 513, 17),  # one row past the 6-row tile, one past the depth block
        (6, 1030, 64),
        (13, 100, 65),
        (2, 25, 4096),
        (32, 600, 100),
        (5, 3, 15),
    ],
)
@pytest.mark.parametrize("relu", [True, False])
def test_dense_awkward_shapes(isa, rows, depth, cols, relu):
    check_dense(isa, np.random.default_rng([rows, depth, cols]), rows, depth, cols, relu)


@pytest.mark.parametrize("isa", ISAS)
def test_dense_random_shapes(isa):
    rng = np.random.default_rng(7)
    for _ in range(12):
        check_dense(isa, rng, int(rng.integers(1, 20)), int(rng.integers(1, 1200)), int(rng.integers(1, 130)), True)


def test_softmax_matches_float64_and_survives_large_logits():
    rng = np.random.default_rng(3)
    logits = np.concatenate([random_array(rng, (3, 1000)) * 10, np.full((1, 1000), 1000.0, np.float32)])
    logits[3, 17] = 1100.0  # exp(1100) overflows float32 and float64 without the max shift
    exact = np.exp(logits - logits.max(axis=1, keepdims=True))
    exact /= exact.sum(axis=1, keepdims=True)
    result = _core.testing.softmax(logits)
    assert np.all(np.isfinite(result))
    np.testing.assert_allclose(result, exact, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 16), (1, 7, 9, 17), (3, 4, 4, 33)])
def test_blocked_layout_round_trip_is_exact(isa, shape):
    x = random_array(np.random.default_rng(list(shape)), shape)
    np.testing.assert_array_equal(_core.testing.layout_roundtrip(x, isa), x)


def fast_path_pooled_error_bound(x, params):
    """An L2 bound on how far the "fast" network's block output may be from the reference
    chain of test_whole_network_on_each_isa_matches_reference_kernels.

    Both run conv1 (3 -> 16) directly: each within gamma_28 * |x||k1| of exact, so they differ
    by at most twice that, and conv2 (16 -> 17), linear, passes a difference on multiplied by
    at most the sum of its nine taps' spectral norms (Young's inequality). conv2 itself: the
    network's Winograd within ROUNDING_SAFETY rms errors (kernel_checks.winograd_rms_error),
    the reference's direct within gamma_145 * |h1||k2|. ReLU and the 2x2 max pool do not
    increase an L2 distance. (Carried on through the dense layer and softmax the bound says
    nothing: the probabilities are held to the 1e-5 budget only.)
    """
    (k1, b1), (k2, b2) = params
    h1 = _core.testing.conv3x3(x, k1, b1, True, "reference")
    conv1_difference = np.linalg.norm(2 * gamma(9 * 3 + 1) * conv3x3_float64(np.abs(x), np.abs(k1), np.abs(b1)))
    conv2_gain = sum(np.linalg.norm(k2[dy, dx].astype(np.float64), 2) for dy in range(3) for dx in range(3))
    winograd = ROUNDING_SAFETY * winograd_rms_error(h1, k2, b2)
    direct = np.linalg.norm(gamma(9 * 16 + 1) * conv3x3_float64(np.abs(h1), np.abs(k2), np.abs(b2)))
    return conv2_gain * conv1_difference + winograd + direct


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("precision", ["highest", "fast"])
def test_whole_network_on_each_isa_matches_reference_kernels(isa, precision):
    """The network runner with one ISA's table, against the reference kernels chained by hand.

    "highest" chains the same direct kernels the single-kernel tests bound above, so the
    results agree to a few float32 roundings. "fast" runs the 16->17 layer by Winograd; a
    wrong tile, edge or channel shows up at order 1. The pooled output's L2 error is bounded by
    what each step can add (fast_path_pooled_error_bound), and both outputs by the 1e-5
    relative budget of a layer.
    """
    rng = np.random.default_rng(11)
    graph = _core.Graph(3)
    convs = [(3, 16), (16, 17)]
    indices = [graph.add_conv3x3(cout, "relu") for _, cout in convs]
    pool = graph.add_max_pool2x2()
    flatten = graph.add_flatten()
    depth = 9 * 14 * 17
    dense = graph.add_dense(depth, 10, "softmax")
    net = _core.CpuExecutor(graph, precision)
    params = []
    for index, (cin, cout) in zip(indices, convs):
        kernel, bias = random_array(rng, (3, 3, cin, cout)) * 0.3, random_array(rng, (cout,))
        net.set_conv3x3_weights(index, kernel, bias)
        params.append((kernel, bias))
    dense_kernel, dense_bias = random_array(rng, (depth, 10)) * 0.05, random_array(rng, (10,))
    net.set_dense_kernel_rows(dense, 0, dense_kernel)
    net.set_dense_bias(dense, dense_bias)
    x = random_array(rng, (2, 19, 29, 3))

    h = x
    for kernel, bias in params:
        h = _core.testing.conv3x3(h, kernel, bias, True, "reference")
    pooled = _core.testing.max_pool2x2(h, "reference")
    logits = _core.testing.dense(pooled.reshape(2, -1), dense_kernel, dense_bias, False, "reference")
    expected = _core.testing.softmax(logits)

    previous = _core.active_isa()
    try:
        _core.set_isa(isa)
        pooled_out, probs = net.forward(x, [pool, dense])
    finally:
        _core.set_isa(previous)
    if precision == "highest":
        np.testing.assert_allclose(pooled_out, pooled, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    else:
        pooled_bound = fast_path_pooled_error_bound(x, params)
        assert np.linalg.norm(pooled_out.astype(np.float64) - pooled) <= pooled_bound
        assert rel_l2(pooled_out, pooled) < 1e-5
        assert rel_l2(probs, expected) < 1e-5
    assert net.graph.output_shapes(19, 29)[flatten] == (depth,)


def test_unknown_isa_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="supports: .*generic"):
        _core.set_isa("sse9")
