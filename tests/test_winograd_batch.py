"""The batched Winograd convolution (csrc/winograd_batch.h) on every instruction set this CPU runs.

It computes each image exactly as conv3x3_winograd does (the same sums in the same order; the
tiles of all images only share blocks), so it must match the per-image kernel bit for bit, and
both are held to the float64 error bound of tests/test_winograd.py. Shapes: batches whose tile
blocks end inside an image and span several images, the shared-block schedule of block4/block5
(U of 12 MB and more) and the private-block one, odd sizes with partial edge tiles.
"""

import numpy as np
import pytest

from fastvgg import _core
from kernel_checks import ISAS, assert_within, random_array
from test_winograd import winograd_error_bound, winograd_float64

testing = _core.testing


def check_batch(isa, rng, n, h, w, cin, cout, relu):
    x = random_array(rng, (n, h, w, cin))
    kernel = random_array(rng, (3, 3, cin, cout))
    bias = random_array(rng, (cout,))
    batched = testing.conv3x3_winograd_batch(x, kernel, bias, relu, isa)
    per_image = testing.conv3x3_winograd(x, kernel, bias, relu, isa)
    assert batched.shape == (n, h, w, cout) and batched.dtype == np.float32
    mismatch = np.argwhere(batched.view(np.uint32) != per_image.view(np.uint32))
    assert mismatch.size == 0, f"{len(mismatch)} outputs differ from the per-image kernel, first at {mismatch[0]}"
    exact = winograd_float64(x, kernel, bias)
    if relu:
        exact = np.maximum(exact, 0.0)
    assert_within(batched, exact, winograd_error_bound(x, kernel, bias), f"{isa} batched winograd vs float64")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "n, h, w, cin, cout",
    [
        (1, 5, 7, 3, 5),
        (3, 13, 7, 17, 33),
        (5, 4, 4, 16, 16),  # one tile an image: each register tile of 6 spans images
        (7, 14, 14, 32, 48),
        (2, 9, 30, 1, 1),
    ],
)
@pytest.mark.parametrize("relu", [True, False])
def test_batch_matches_per_image_awkward_shapes(isa, n, h, w, cin, cout, relu):
    check_batch(isa, np.random.default_rng([n, h, w, cin, cout]), n, h, w, cin, cout, relu)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "n, size, cin, cout",
    [
        (3, 14, 512, 512),  # block5: shared blocks, all 48 tiles in one block
        (2, 10, 256, 512),  # U of 18.9 MB: shared blocks
        (4, 12, 64, 128),   # private blocks that cross image borders
    ],
)
def test_batch_matches_per_image_vgg_channels(isa, n, size, cin, cout):
    check_batch(isa, np.random.default_rng([n, size, cin, cout]), n, size, size, cin, cout, relu=True)


def test_batch_rejects_bad_shapes():
    x = np.zeros((2, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="kernel"):
        testing.conv3x3_winograd_batch(x, np.zeros((3, 3, 4, 8), np.float32), np.zeros(8, np.float32), True, "generic")
    with pytest.raises(ValueError, match="bias"):
        testing.conv3x3_winograd_batch(x, np.zeros((3, 3, 3, 8), np.float32), np.zeros(7, np.float32), True, "generic")
    with pytest.raises(ValueError, match="instruction set"):
        testing.conv3x3_winograd_batch(x, np.zeros((3, 3, 3, 8), np.float32), np.zeros(8, np.float32), True, "sse9")
