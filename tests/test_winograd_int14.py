"""Winograd F(4x4, 3x3) with 14-bit integer products (csrc/bf16/winograd_int14.cpp) against its
double-precision twin and the exact float64 convolution.

The kernel quantises the transformed input V = B^T d B to integers |q| <= 8191 with one step per
tile and point (the largest |V| over the channels / 8191) and the transformed weights U = G g G^T
with one step per point and output channel, sums the integer products exactly (int32, cleared
every 32 channels, which cannot overflow) and dequantises. Its error is then bounded by what
the arithmetic allows, computed here in float64 for every output:

    |A^T| ( sum_c dV |U| + |V| dU + dV dU  +  gamma_(C/32+4) sum_c |V| |U| ) |A|
        + gamma_14 ( |A^T| sum_c |V| |U| |A| + |bias| )

with dV = half a step of V plus the fp32 transform's rounding (gamma_16 |B^T| |d| |B|) and
dU = half a step of U plus the fp32 step's rounding. The twin quantises exactly V in double, so it
may round a value the other way than the kernel: each is held to the bound, and to each other
within twice it. A layout or scale bug errs by the size of the outputs, far above the bound.
On a VGG-like layer the relative L2 error must also stay below 3e-3 (measured ~1.4e-3; the
network's budget is 1e-2 over 13 layers, see bench/winograd_rounding_study.py).
"""

import numpy as np
import pytest

from bf16_checks import requires_bf16
from fastvgg import _core
from kernel_checks import assert_within, gamma, random_array
from kernel_checks import A_T, A_T_EDGE, B_T, B_T_EDGE, axis_matrices, winograd_float64, winograd_parts

pytestmark = requires_bf16
testing = _core.testing
QUANT_MAX = 8191


def transformed(x, kernel):
    """V (n, ty, tx, 6, 6, C), U (6, 6, C, F) and |B^T| |d| |B| in float64 (F(2) along an image's
    edge where its last tile has at most 2 output pixels, as the kernel runs it):
    kernel_checks.winograd_parts, per tile."""
    n, h, w, c = x.shape
    per_tile = lambda v: v.reshape(6, 6, n, -(-h // 4), -(-w // 4), c).transpose(2, 3, 4, 0, 1, 5)
    v, u = winograd_parts(x.astype(np.float64), kernel)
    v_abs, _ = winograd_parts(np.abs(x.astype(np.float64)), kernel, np.abs(B_T), b_t_edge=np.abs(B_T_EDGE))
    return per_tile(v), u.reshape(6, 6, c, -1), per_tile(v_abs)


def int14_error_bound(x, kernel, bias):
    n, h, w, c = x.shape
    v, u, v_abs = transformed(x, kernel)
    dv = 0.5 * np.abs(v).max(axis=-1, keepdims=True) / QUANT_MAX * (1 + 1e-5) + gamma(16) * v_abs
    du = (0.5 * np.abs(u).max(axis=2, keepdims=True) / QUANT_MAX + np.abs(u) * 2.0**-23) * (1 + 1e-5)
    magnitude_m = np.einsum("nyxpqc,pqcf->nyxpqf", np.abs(v), np.abs(u))
    error_m = (np.einsum("nyxpqc,pqcf->nyxpqf", dv, np.abs(u)) + np.einsum("nyxpqc,pqcf->nyxpqf", np.abs(v), du)
               + np.einsum("nyxpqc,pqcf->nyxpqf", dv, du) + gamma(c // 32 + 4) * magnitude_m)
    a_rows, a_columns = np.abs(axis_matrices(h, A_T, A_T_EDGE)), np.abs(axis_matrices(w, A_T, A_T_EDGE))
    to_pixels = lambda m: np.einsum("yrp,nyxpqf,xsq->nyrxsf", a_rows, m, a_columns).reshape(
        n, m.shape[1] * 4, m.shape[2] * 4, -1)[:, :h, :w]
    return to_pixels(error_m) + gamma(14) * (to_pixels(magnitude_m) + np.abs(bias))


def check(rng, n, h, w, cin, cout, relu):
    x = random_array(rng, (n, h, w, cin))
    kernel = random_array(rng, (3, 3, cin, cout))
    bias = random_array(rng, (cout,))
    exact = winograd_float64(x, kernel, bias)
    if relu:
        exact = np.maximum(exact, 0.0)
    bound = int14_error_bound(x, kernel, bias)
    fast = testing.conv3x3_winograd_int14(x, kernel, bias, relu)
    twin = testing.conv3x3_winograd_int14_reference(x, kernel, bias, relu)
    assert fast.shape == (n, h, w, cout) and fast.dtype == np.float32
    assert_within(twin, exact, bound, "int14 twin vs float64")
    assert_within(fast, exact, bound, "int14 winograd vs float64")
    assert_within(fast, twin.astype(np.float64), 2 * bound, "int14 winograd vs its twin")


# Edge tiles (sizes not multiples of 4), channels across blocks and pairs (1, 3, 15, 17, 33),
# output blocks that leave the 6-tile x 2-block register tile's edge paths (5, 33), the
# private schedule and the shared one (U of 6 MB and more: 320 x 288 channels).
@pytest.mark.parametrize(
    "n, h, w, cin, cout",
    [
        (1, 7, 13, 3, 5),
        (2, 13, 7, 17, 33),
        (1, 1, 1, 16, 16),
        (1, 5, 28, 1, 1),
        (1, 9, 30, 33, 64),
        (1, 6, 11, 15, 48),
        (3, 4, 4, 32, 16),
        (1, 6, 9, 320, 288),
    ],
)
@pytest.mark.parametrize("relu", [True, False])
def test_winograd_int14_shapes(n, h, w, cin, cout, relu):
    check(np.random.default_rng([n, h, w, cin, cout]), n, h, w, cin, cout, relu)


@pytest.mark.parametrize("cin, cout", [(64, 64), (128, 256), (512, 512)])
def test_winograd_int14_vgg_channels(cin, cout):
    check(np.random.default_rng([cin, cout, 14]), 1, 9, 14, cin, cout, relu=True)


@pytest.mark.parametrize("size, cin, cout", [(28, 128, 128), (14, 512, 512)])
def test_winograd_int14_relative_error_on_a_vgg_layer(size, cin, cout):
    # He-scaled weights on post-ReLU input, as in a VGG layer: the per-layer accuracy budget.
    rng = np.random.default_rng([size, cin, cout])
    x = np.maximum(rng.standard_normal((1, size, size, cin)), 0).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, cin, cout)) * np.sqrt(2.0 / (9 * cin))).astype(np.float32)
    bias = np.zeros(cout, np.float32)
    exact = winograd_float64(x, kernel, bias)
    fast = testing.conv3x3_winograd_int14(x, kernel, bias, False)
    error = np.linalg.norm(fast - exact) / np.linalg.norm(exact)
    print(f"\nint14 winograd relative L2 error {error:.2e} ({size}x{size}, {cin}->{cout})")
    assert 1e-4 < error < 3e-3


def test_winograd_int14_nan_reaches_its_tiles_only():
    x = np.ones((1, 12, 12, 4), np.float32)
    x[0, 5, 5, 2] = np.nan  # inside tile (1, 1): pixels 4..7
    y = testing.conv3x3_winograd_int14(x, np.ones((3, 3, 4, 3), np.float32), np.zeros(3, np.float32), True)
    assert np.isnan(y[0, 4:7, 4:7]).all()  # every output the NaN pixel feeds
    assert not np.isnan(y[0, :, 8:]).any() and not np.isnan(y[0, 8:, :]).any()  # tiles it does not touch


def test_winograd_int14_tiny_values_quantise_to_zero_without_overflow():
    x = np.full((1, 4, 4, 16), 1e-35, np.float32)
    y = testing.conv3x3_winograd_int14(x, np.ones((3, 3, 16, 16), np.float32), np.ones(16, np.float32), False)
    assert np.allclose(y, 1.0)
