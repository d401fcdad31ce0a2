"""What the kernel tests share: the ISAs to run, the float32 rounding bound, exact float64
convolution, and VGG16's convolution shapes."""

import numpy as np
import pytest

from fastvgg import _core

UNIT_ROUNDOFF = 2.0**-24
ALL_ISAS = ["avx512", "avx2", "generic"]
# Every (input, output) channel pair of VGG's convolutions.
VGG_CHANNEL_PAIRS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]


def isa_param(isa):
    supported = isa in _core.available_isas()
    return pytest.param(
        isa, marks=pytest.mark.skipif(not supported, reason=f"this CPU or build has no {isa} kernels")
    )


ISAS = [isa_param(isa) for isa in ALL_ISAS]


def gamma(k):
    """Higham's gamma_k = k*u / (1 - k*u): the relative bound of k float32 roundings."""
    return k * UNIT_ROUNDOFF / (1 - k * UNIT_ROUNDOFF)


def conv3x3_float64(x, kernel, bias):
    """Exact (float64) 'same' 3x3 cross-correlation plus bias, no activation."""
    n, h, w, _ = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.broadcast_to(bias.astype(np.float64), (n, h, w, kernel.shape[3])).copy()
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy : dy + h, dx : dx + w, :] @ kernel[dy, dx].astype(np.float64)
    return out


def random_array(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def assert_within(actual, exact, bound, what):
    error = np.abs(actual.astype(np.float64) - exact)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert np.all(error <= bound), (
        f"{what}: error {error[worst]:.3g} exceeds bound {bound[worst]:.3g} at {worst} "
        f"(got {actual[worst]}, exact {exact[worst]})"
    )
