"""What the kernel tests share: the ISAs to run, the float32 rounding bound, exact float64
convolution, VGG16's convolution shapes, and the float64 model of Winograd F(4x4, 3x3) with
its error bounds (derived in tests/test_winograd.py's docstring)."""

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


# Along an axis where an image's last tile has at most 2 output pixels (size 1 or 2 past a
# multiple of 4), the fp32 kernel's last tile runs F(2, 3) on F(4, 3)'s points 0, -1, 1 and
# infinity (csrc/winograd_f4x4.h): as 6-point matrices, its input transform diag(4, -3, -3, 1)
# B2^T on the first 4 pixels into points 0, 1, 2, 5, and A2^T from those points (2 outputs).
B_T_EDGE = np.zeros((6, 6))
B_T_EDGE[[0, 1, 2, 5], :4] = np.diag([4.0, -3.0, -3.0, 1.0]) @ np.array(
    [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64
)
A_T_EDGE = np.zeros((4, 6))
A_T_EDGE[:2] = [[1, 1, 1, 0, 0, 0], [0, 1, -1, 0, 0, -1]]


def axis_matrices(size, full, edge):
    """The transform of each tile along an axis of `size` pixels: `edge` for a last tile with at
    most 2 output pixels, else `full`."""
    stack = np.repeat(full[None], -(-size // 4), axis=0)
    if size % 4 in (1, 2):
        stack[-1] = edge
    return stack


def winograd_parts(x, kernel, b_t=B_T, g=G, b_t_edge=B_T_EDGE):
    """V = B^T d B (36, tiles, in) for every 6x6 input tile with 'same' padding, and
    U = G g G^T (36, in, out), in float64."""
    n, h, w, cin = x.shape
    tiles_y, tiles_x = -(-h // 4), -(-w // 4)
    padded = np.zeros((n, 4 * tiles_y + 2, 4 * tiles_x + 2, cin))
    padded[:, 1 : h + 1, 1 : w + 1, :] = x
    tiles = np.lib.stride_tricks.sliding_window_view(padded, (6, 6), axis=(1, 2))[:, ::4, ::4]
    # tiles: (n, ty, tx, cin, 6, 6) -> V: (36, n*ty*tx, cin), U: (36, cin, cout)
    rows, columns = axis_matrices(h, b_t, b_t_edge), axis_matrices(w, b_t, b_t_edge)
    v = np.einsum("yai,nyxcij,xbj->abnyxc", rows, tiles, columns).reshape(36, -1, cin)
    u = np.einsum("ai,ijco,bj->abco", g, kernel.astype(np.float64), g).reshape(36, cin, kernel.shape[3])
    return v, u


def output_transform(m, a_t, x_shape, a_t_edge=A_T_EDGE):
    """A^T M A for M (36, tiles, out), cropped to the image: (n, h, w, out)."""
    n, h, w, _ = x_shape
    tiles_y, tiles_x = -(-h // 4), -(-w // 4)
    m = m.reshape(6, 6, n, tiles_y, tiles_x, m.shape[-1])
    rows, columns = axis_matrices(h, a_t, a_t_edge), axis_matrices(w, a_t, a_t_edge)
    y = np.einsum("yia,abnyxo,xjb->nyixjo", rows, m, columns).reshape(n, 4 * tiles_y, 4 * tiles_x, -1)
    return y[:, :h, :w, :]


def winograd_float64(x, kernel, bias, b_t=B_T, g=G, a_t=A_T, b_t_edge=B_T_EDGE, a_t_edge=A_T_EDGE):
    """F(4x4, 3x3) (F(2) along the edges above) in float64 on tiles with 'same' padding; with
    absolute values of the data and the matrices, the scale of the rounding errors."""
    v, u = winograd_parts(x, kernel, b_t, g, b_t_edge)
    return output_transform(np.matmul(v, u), a_t, x.shape, a_t_edge) + bias.astype(np.float64)


def winograd_error_bound(x, kernel, bias):
    """gamma_{K+24} times the computation on absolute values (see the module docstring)."""
    magnitude = winograd_float64(
        np.abs(x), np.abs(kernel), np.abs(bias), np.abs(B_T), np.abs(G), np.abs(A_T), np.abs(B_T_EDGE), np.abs(A_T_EDGE)
    )
    return gamma(x.shape[3] + 24) * magnitude


# Chebyshev: P(||error|| > k * rms) <= 1/k^2 under the rounding model (module docstring).
ROUNDING_SAFETY = 10.0


def winograd_rms_error(x, kernel, bias):
    """sqrt(E ||error||^2) of the float32 Winograd computation (see the module docstring)."""
    u = UNIT_ROUNDOFF
    v, w = winograd_parts(x, kernel)
    v_abs, _ = winograd_parts(np.abs(x), kernel, np.abs(B_T), b_t_edge=np.abs(B_T_EDGE))
    a_squared, a_abs = A_T**2, np.abs(A_T)
    a_squared_edge, a_abs_edge = A_T_EDGE**2, np.abs(A_T_EDGE)
    # sum_xi |A_{p,xi}| for each of the 16 output pixels p of a tile, as an (n, h, w, 1) array.
    pixel_weight = output_transform(np.ones((36, v.shape[1], 1)), a_abs, x.shape, a_abs_edge)

    mean_square_u = u**2 * output_transform(np.matmul(v**2, w**2), a_squared, x.shape, a_squared_edge)
    rms_v = np.sqrt(8) * u * v_abs  # at most 8 roundings per V value (1-2 in the edge transform)
    mean_square_v = pixel_weight * output_transform(np.matmul(rms_v**2, w**2), a_abs, x.shape, a_abs_edge)
    partial = np.zeros((36, v.shape[1], w.shape[2]))
    squares = np.zeros_like(partial)
    for ic in range(v.shape[2]):  # the kernel's order: input channels 0, 1, ... into a zero accumulator
        term = v[:, :, ic, None] * w[:, None, ic, :]
        partial += term
        squares += partial**2 + term**2
    mean_square_m = u**2 * output_transform(squares, a_squared, x.shape, a_squared_edge)
    m_abs = np.abs(np.matmul(v, w))
    rms_y = np.sqrt(13) * u * (output_transform(m_abs, a_abs, x.shape, a_abs_edge) + np.abs(bias.astype(np.float64)))
    rms = np.sqrt(mean_square_u) + np.sqrt(mean_square_v) + np.sqrt(mean_square_m) + rms_y
    return float(np.sqrt(np.sum(rms**2)))


def assert_relative_l2_within(actual, exact, rms_error, what):
    """||actual - exact|| / ||exact|| within ROUNDING_SAFETY root mean squares of the error."""
    norm = np.linalg.norm(exact)
    error = np.linalg.norm(actual.astype(np.float64) - exact)
    bound = ROUNDING_SAFETY * rms_error
    assert error <= bound, (
        f"{what}: relative L2 error {error / norm:.3g} exceeds the bound {bound / norm:.3g} "
        f"({ROUNDING_SAFETY:g} x the rms rounding error {rms_error / norm:.3g})"
    )
