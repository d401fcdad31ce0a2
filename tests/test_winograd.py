"""Winograd F(4x4, 3x3) convolution, on every instruction set this CPU runs, against float64.

The error bound of a direct convolution, gamma_K * sum|x w| (see test_kernels.py), does not
hold for Winograd: the transforms combine inputs with coefficients up to 5 (B^T) and 8 (A^T)
before and after the products, and their rounding errors are amplified by those sums. The
bound used here follows the computation instead. Every output is a sum of terms, each a
product of one input and one weight with exact transform constants, and each term goes
through at most

    1 (U rounded to float) + 2*4 (B^T d B: two passes of at most two operations, each maybe
    an unfused multiply and add) + 1 (product) + K (the sum over input channels) + 2*6
    (A^T M A: two passes of three) + 1 (bias)  <  K + 24 roundings,

so by the standard argument for sums of products (Higham 3.1, applied per term) the error is
within gamma_{K+24} times the same computation on absolute values:

    |A^T| ( sum_ic (|G| |g| |G^T|) (.) (|B^T| |d| |B|) ) |A|  +  |bias|.

A layout, tiling or edge bug gives errors of the size of the outputs, orders of magnitude
above it. On the real VGG16 layers (post-ReLU inputs, Glorot weights) the relative L2 error is
also checked against 1e-5: the whole network must stay within 1e-4 of Keras, and thirteen
layers each adding ~1e-6 to 3e-6 (measured, printed by the test) keep well inside that.
"""

import functools

import numpy as np
import pytest

from fastvgg import _core
from kernel_checks import (
    ISAS,
    VGG_CHANNEL_PAIRS,
    assert_within,
    conv3x3_float64,
    gamma,
    random_array,
)

# (name, height = width, input channels, output channels) of VGG16 at 224x224 input.
VGG16_CONV_LAYERS = [
    ("block1_conv1", 224, 3, 64),
    ("block1_conv2", 224, 64, 64),
    ("block2_conv1", 112, 64, 128),
    ("block2_conv2", 112, 128, 128),
    ("block3_conv1", 56, 128, 256),
    ("block3_conv2", 56, 256, 256),
    ("block4_conv1", 28, 256, 512),
    ("block4_conv2", 28, 512, 512),
    ("block5_conv1", 14, 512, 512),
]
# The whole network's budget is 1e-4 relative L2 against Keras (itself float32); a layer must
# stay an order of magnitude below it. An indexing bug gives O(1).
LAYER_RELATIVE_L2_LIMIT = 1e-5
# NNPACK's criterion for its fp32 Winograd kernels.
MEDIAN_MAX_RELATIVE_LIMIT = 1e-4

# Lavin & Gray's F(4x4, 3x3) matrices, as in csrc/winograd.cpp.
B_T = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=np.float64,
)
G = np.array(
    [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
)
A_T = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=np.float64)


def winograd_float64(x, kernel, bias, b_t=B_T, g=G, a_t=A_T):
    """F(4x4, 3x3) in float64 on tiles with 'same' padding; with absolute values of the data and
    the matrices, the scale of the rounding errors."""
    n, h, w, cin = x.shape
    cout = kernel.shape[3]
    tiles_y, tiles_x = -(-h // 4), -(-w // 4)
    padded = np.zeros((n, 4 * tiles_y + 2, 4 * tiles_x + 2, cin))
    padded[:, 1 : h + 1, 1 : w + 1, :] = x
    tiles = np.lib.stride_tricks.sliding_window_view(padded, (6, 6), axis=(1, 2))[:, ::4, ::4]
    # tiles: (n, ty, tx, cin, 6, 6) -> V: (36, n*ty*tx, cin), U: (36, cin, cout)
    v = np.einsum("ai,ntxcij,bj->abntxc", b_t, tiles, b_t).reshape(36, -1, cin)
    u = np.einsum("ai,ijco,bj->abco", g, kernel.astype(np.float64), g).reshape(36, cin, cout)
    m = np.matmul(v, u).reshape(6, 6, n, tiles_y, tiles_x, cout)
    y = np.einsum("ia,abntxo,jb->ntixjo", a_t, m, a_t).reshape(n, 4 * tiles_y, 4 * tiles_x, cout)
    return y[:, :h, :w, :] + bias.astype(np.float64)


def winograd_error_bound(x, kernel, bias):
    """gamma_{K+24} times the computation on absolute values (see the module docstring)."""
    magnitude = winograd_float64(np.abs(x), np.abs(kernel), np.abs(bias), np.abs(B_T), np.abs(G), np.abs(A_T))
    return gamma(x.shape[3] + 24) * magnitude


def test_float64_model_of_the_transforms_is_a_convolution():
    """The matrices above (and so the bound built on them) compute the convolution exactly."""
    rng = np.random.default_rng(0)
    x, kernel, bias = random_array(rng, (2, 9, 6, 5)), random_array(rng, (3, 3, 5, 7)), random_array(rng, (7,))
    np.testing.assert_allclose(winograd_float64(x, kernel, bias), conv3x3_float64(x, kernel, bias), rtol=0, atol=1e-12)


def check_winograd(isa, rng, n, h, w, cin, cout, relu):
    x = random_array(rng, (n, h, w, cin))
    kernel = random_array(rng, (3, 3, cin, cout))
    bias = random_array(rng, (cout,))
    exact = conv3x3_float64(x, kernel, bias)
    bound = winograd_error_bound(x, kernel, bias)
    direct_bound = gamma(9 * cin + 1) * conv3x3_float64(np.abs(x), np.abs(kernel), np.abs(bias))
    if relu:
        exact = np.maximum(exact, 0.0)  # 1-Lipschitz: the bounds still hold
    fast = _core.testing.conv3x3_winograd(x, kernel, bias, relu, isa)
    reference = _core.testing.conv3x3(x, kernel, bias, relu, "reference")
    assert fast.shape == (n, h, w, cout) and fast.dtype == np.float32
    assert_within(fast, exact, bound, f"{isa} winograd vs float64")
    assert_within(fast, reference.astype(np.float64), bound + direct_bound, f"{isa} winograd vs reference")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 13, 14, 15, 29])
@pytest.mark.parametrize("relu", [True, False])
def test_winograd_edge_tiles(isa, size, relu):
    """Every remainder of H and W modulo the 4x4 tile, square and mixed with another size."""
    rng = np.random.default_rng([size, relu])
    check_winograd(isa, rng, 1, size, size, 5, 17, relu)
    check_winograd(isa, rng, 1, size, 7 if size != 7 else 4, 3, 16, relu)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "n, h, w, cin, cout",
    [
        (1, 7, 13, 3, 5),
        (3, 13, 7, 17, 33),
        (3, 5, 14, 16, 16),
        (1, 15, 2, 33, 17),
        (1, 29, 29, 5, 3),
        (3, 1, 1, 33, 5),
        (1, 4, 29, 17, 33),
        (1, 14, 14, 16, 65),  # output blocks past a multiple of the GEMM's 4-block register tile
    ],
)
@pytest.mark.parametrize("relu", [True, False])
def test_winograd_awkward_shapes(isa, n, h, w, cin, cout, relu):
    check_winograd(isa, np.random.default_rng([n, h, w, cin, cout]), n, h, w, cin, cout, relu)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cin, cout", VGG_CHANNEL_PAIRS)
def test_winograd_vgg_channel_pairs(isa, cin, cout):
    check_winograd(isa, np.random.default_rng([cin, cout]), 1, 7, 15, cin, cout, relu=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "h, w, cin, cout",
    [
        (97, 83, 64, 64),  # small U: per-thread blocks of a few dozen tiles, a ragged last one
        (47, 50, 512, 512),  # large U: blocks shared by the threads, two of them at this size
    ],
)
def test_winograd_many_tile_blocks(isa, h, w, cin, cout):
    check_winograd(isa, np.random.default_rng([h, w]), 1, h, w, cin, cout, relu=False)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("cin, cout", [(64, 64), (256, 256)])
def test_winograd_thread_counts(threads, cin, cout):
    previous = _core.get_num_threads()
    try:
        _core.set_num_threads(threads)
        check_winograd(_core.available_isas()[0], np.random.default_rng([threads, cin]), 2, 29, 30, cin, cout, True)
    finally:
        _core.set_num_threads(previous)


@functools.lru_cache(maxsize=None)
def vgg_layer_case(size, cin, cout):
    """Realistic layer data: post-ReLU inputs, Glorot-uniform weights, small biases, exact output."""
    rng = np.random.default_rng([size, cin, cout])
    x = np.maximum(rng.standard_normal((1, size, size, cin)), 0.0).astype(np.float32)
    limit = np.sqrt(6.0 / (9 * cin + 9 * cout))
    kernel = rng.uniform(-limit, limit, (3, 3, cin, cout)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    return x, kernel, bias, conv3x3_float64(x, kernel, bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name, size, cin, cout", VGG16_CONV_LAYERS)
def test_winograd_accuracy_on_vgg16_layers(isa, name, size, cin, cout):
    x, kernel, bias, exact = vgg_layer_case(size, cin, cout)
    fast = _core.testing.conv3x3_winograd(x, kernel, bias, False, isa).astype(np.float64)
    relative_l2 = np.linalg.norm(fast - exact) / np.linalg.norm(exact)
    # Max error over the layer relative to its largest output (per-element relative errors are
    # meaningless at outputs that cancel to ~0), one sample per layer; its median over the
    # layers is NNPACK's criterion.
    max_relative = np.abs(fast - exact).max() / np.abs(exact).max()
    print(f"{isa} {name}: relative L2 {relative_l2:.2e}, max relative {max_relative:.2e}")
    assert relative_l2 < LAYER_RELATIVE_L2_LIMIT, f"{name}: relative L2 error {relative_l2:.3g}"
    assert max_relative < MEDIAN_MAX_RELATIVE_LIMIT, f"{name}: max relative error {max_relative:.3g}"
