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
within gamma_{K+24} times the same computation on absolute values (the code of both bounds is
in kernel_checks.py, shared with tests/test_kernels.py):

    |A^T| ( sum_ic (|G| |g| |G^T|) (.) (|B^T| |d| |B|) ) |A|  +  |bias|.

A layout, tiling or edge bug gives errors of the size of the outputs, orders of magnitude
above it. But it is loose where it matters: the absolute values undo every cancellation of
the transforms, and at 512 input channels a Winograd that rounded V and U to bfloat16 (8
significant bits instead of 24) would still pass it.

So every check also bounds the relative L2 error, from the same computation followed
stage by stage, under the standard probabilistic model of rounding errors (Higham and Mary,
SIAM J. Sci. Comput. 2019; Connolly, Higham and Mary 2021): each rounding multiplies its
result by (1 + delta), the deltas independent with mean zero and |delta| <= u. To first order
the error of an output is a sum of contributions; independent ones add in mean square, and
a value whose every term passes through at most n roundings (however correlated) has an rms
error of at most sqrt(n) u times the sum of its terms' absolute values. Per output (pixel p of
a tile, xi the 36 transformed points, ic the input channels):

    U rounded to float once:   u^2 sum_{xi,ic} (A_{p,xi} V U)^2
    V = B^T d B, <= 8 roundings, independent between input channels but not between the
    xi of one tile (weighted Cauchy-Schwarz over xi):
                               (sum_xi |A_{p,xi}|) sum_{xi,ic} |A_{p,xi}| U^2 (sqrt(8) u |B^T||d||B|)^2
    M = sum_ic V U, in order:  u^2 sum_xi A_{p,xi}^2 sum_k (s_k^2 + (V_k U_k)^2), s_k the
                               partial sums (one rounding per add, one per unfused product)
    Y = A^T M A + bias, <= 13: (sqrt(13) u (|A^T||M||A| + |bias|))^2

The four root mean squares are added (Minkowski: no independence between them needed), and
E||error||^2 is the sum over the outputs. By Chebyshev's inequality ||error|| exceeds
ROUNDING_SAFETY = 10 times its root mean square with probability at most 1/100 under the
model; the checks use fixed seeds, so a pass or a failure repeats. The V term dominates and
is the loosest (it assumes the errors of one tile's 36 points conspire): measured, the
kernels stay 100-300x inside the bound, while a Winograd that rounds V and U to bfloat16
exceeds it about 50x at 64 and at 512 input channels (simulated in numpy).

On the real VGG16 layers (post-ReLU inputs, Glorot weights) the relative L2 error is also
checked against 1e-5: the whole network must stay within 1e-4 of Keras, and thirteen
layers each adding ~1e-6 to 3e-6 (measured, printed by the test) keep well inside that.
"""

import functools

import numpy as np
import pytest

from fastvgg import _core
from kernel_checks import (
    ISAS,
    VGG_CHANNEL_PAIRS,
    assert_relative_l2_within,
    assert_within,
    conv3x3_float64,
    gamma,
    random_array,
    winograd_error_bound,
    winograd_float64,
    winograd_rms_error,
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
    assert_relative_l2_within(fast, exact, winograd_rms_error(x, kernel, bias), f"{isa} winograd vs float64")


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
    return x, kernel, bias, conv3x3_float64(x, kernel, bias), winograd_rms_error(x, kernel, bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name, size, cin, cout", VGG16_CONV_LAYERS)
def test_winograd_accuracy_on_vgg16_layers(isa, name, size, cin, cout):
    x, kernel, bias, exact, rms_error = vgg_layer_case(size, cin, cout)
    fast = _core.testing.conv3x3_winograd(x, kernel, bias, False, isa).astype(np.float64)
    relative_l2 = np.linalg.norm(fast - exact) / np.linalg.norm(exact)
    # Max error over the layer relative to its largest output (per-element relative errors are
    # meaningless at outputs that cancel to ~0), one sample per layer; its median over the
    # layers is NNPACK's criterion.
    max_relative = np.abs(fast - exact).max() / np.abs(exact).max()
    print(f"{isa} {name}: relative L2 {relative_l2:.2e}, max relative {max_relative:.2e}")
    assert relative_l2 < LAYER_RELATIVE_L2_LIMIT, f"{name}: relative L2 error {relative_l2:.3g}"
    assert_relative_l2_within(fast, exact, rms_error, name)
    assert max_relative < MEDIAN_MAX_RELATIVE_LIMIT, f"{name}: max relative error {max_relative:.3g}"
