"""What the bf16 tests share: the skip when the CPU cannot run the kernels, and an independent
numpy model of the hardware's float32 -> bf16 rounding (vcvtneps2bf16)."""

import numpy as np
import pytest

from fastvgg import _core

BF16_UNAVAILABLE = _core.testing.bf16_unavailable_reason()
requires_bf16 = pytest.mark.skipif(bool(BF16_UNAVAILABLE), reason=f"bf16 kernels skipped: {BF16_UNAVAILABLE}")
AMX_UNAVAILABLE = _core.testing.amx_unavailable_reason()
requires_amx = pytest.mark.skipif(bool(AMX_UNAVAILABLE), reason=f"AMX kernels skipped: {AMX_UNAVAILABLE}")

# Awkward shapes (n, h, w, in, out) for the AMX kernels' tiles: 16 output positions along the
# padded rows (width + 2) x 16 output channels, 32 input channels deep, two of each a step.
# Widths whose padded rows make the positions end inside a tile pair or on its edge (1, 14, 30),
# a single pixel, channels around 32 (1, 31, 33, 65: zero padding in the last block of 32; up to
# 3: im2col), output blocks that leave a lone block (16, 48, 17).
AMX_AWKWARD_SHAPES = [
    (1, 7, 13, 3, 5),
    (3, 13, 7, 17, 33),
    (2, 1, 1, 32, 16),
    (1, 2, 14, 31, 48),
    (1, 6, 30, 33, 64),
    (1, 5, 28, 1, 1),
    (2, 4, 16, 64, 17),
    (1, 3, 43, 65, 96),
    (1, 14, 14, 96, 32),
]


def bf16_round(a):
    """float32 -> bf16 -> float32 as vcvtneps2bf16 does it (Intel SDM): round to nearest, ties to
    even; zero and denormal inputs become a zero of the same sign; NaN is made quiet."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    exponent = bits & 0x7F800000
    is_nan = (exponent == 0x7F800000) & ((bits & 0x007FFFFF) != 0)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    rounded = np.where(exponent == 0, bits & 0x80000000, rounded)
    rounded = np.where(is_nan, ((bits >> 16) | 0x40) << 16, rounded)
    return rounded.astype(np.uint32).view(np.float32).reshape(np.shape(a))
