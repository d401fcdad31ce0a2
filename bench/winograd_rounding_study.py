"""How much one convolution layer's output moves when its products take reduced-precision inputs:
the measurement behind the bf16 kernel set's choice of algorithm (numpy only, float64 sums).

For a He-scaled 3x3 layer on post-ReLU Gaussian input, the relative L2 error against the exact
float64 convolution of:
  direct bf16      inputs and weights rounded to bf16 (what csrc/bf16/conv3x3_bf16.cpp does);
  F(4x4) bf16      Winograd F(4x4, 3x3), transforms in fp32, V and U rounded to bf16;
  F(2x2) bf16      the same with F(2x2, 3x3);
  F(4x4) intN      V and U quantised to N-bit integers, one scale per (tile, point) for V and
                   per (point, output channel) for U, the products summed exactly (VNNI
                   vpdpwssd would sum them in int32: at 14 bits 16 channel pairs fit, at 13 bits 64);
  F(4x4) fp32      for scale: fastvgg's fp32 Winograd.
The issue's bar is 1e-2 on block5_pool after 13 layers; independent per-layer errors add
roughly in quadrature (tests/test_bf16_accuracy.py measured 7.4e-3 after 13 bf16 direct
layers), so a layer may cost at most ~2.5e-3.

    python bench/winograd_rounding_study.py [--sizes 28x256x256 ...]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from bf16_checks import bf16_round  # noqa: E402
from kernel_checks import conv3x3_float64  # noqa: E402

# Lavin & Gray's matrices (points 0, +-1, +-2, infinity for F(4x4); 0, +-1, infinity for F(2x2)).
F4 = (
    np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
    np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
    np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64),
    4,
)
F2 = (
    np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
    np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]),
    np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64),
    2,
)


def quantise(a, axis, bits):
    """Symmetric integer quantisation with one scale per slice along `axis` (the sum's axis)."""
    peak = np.abs(a).max(axis=axis, keepdims=True)
    peak[peak == 0] = 1
    scale = (2 ** (bits - 1) - 1) / peak
    return np.round(a * scale) / scale


def winograd(x, kernel, matrices, products):
    """'same' convolution of one HWC image by Winograd; products in {'fp32', 'bf16', int bits}."""
    b_t, g, a_t, m = matrices
    h, w, _ = x.shape
    a = m + 2
    padded = np.pad(x, ((1, 1 + a), (1, 1 + a), (0, 0)))
    rows, cols = -(-h // m), -(-w // m)
    tiles = np.stack([np.stack([padded[i * m:i * m + a, j * m:j * m + a] for j in range(cols)]) for i in range(rows)])
    v = np.einsum("pi,xyijc,qj->xypqc", b_t, tiles, b_t).astype(np.float32).astype(np.float64)
    u = np.einsum("pi,ijcf,qj->pqcf", g, kernel.astype(np.float64), g).astype(np.float32).astype(np.float64)
    if products == "bf16":
        v, u = bf16_round(v.astype(np.float32)).astype(np.float64), bf16_round(u.astype(np.float32)).astype(np.float64)
    elif isinstance(products, int):
        v, u = quantise(v, -1, products), quantise(u, 2, products)
    mm = np.einsum("xypqc,pqcf->xypqf", v, u)
    y = np.einsum("rp,xypqf,sq->xyrsf", a_t, mm, a_t)
    return y.transpose(0, 2, 1, 3, 4).reshape(rows * m, cols * m, -1)[:h, :w]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["56x128x128", "28x256x256", "14x512x512"],
                        help="HxCinxCout of the layers to try")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    variants = [("direct bf16", None, None), ("F(4x4) bf16", F4, "bf16"), ("F(2x2) bf16", F2, "bf16"),
                ("F(4x4) int14", F4, 14), ("F(4x4) int13", F4, 13), ("F(4x4) fp32", F4, "fp32")]
    print("relative L2 error of one layer against float64 (He-scaled weights, post-ReLU Gaussian input)")
    print(f"{'layer':>12s} " + " ".join(f"{name:>13s}" for name, _, _ in variants))
    for spec in args.sizes:
        size, cin, cout = (int(v) for v in spec.split("x"))
        x = np.maximum(rng.standard_normal((size, size, cin)), 0).astype(np.float32)
        kernel = (rng.standard_normal((3, 3, cin, cout)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        zero = np.zeros(cout, np.float32)
        exact = conv3x3_float64(x[None], kernel, zero)[0]
        cells = []
        for _, matrices, products in variants:
            if matrices is None:
                y = conv3x3_float64(bf16_round(x)[None], bf16_round(kernel), zero)[0]
            else:
                y = winograd(x.astype(np.float64), kernel, matrices, products)
            cells.append(np.linalg.norm(y - exact) / np.linalg.norm(exact))
        print(f"{spec:>12s} " + " ".join(f"{e:13.2e}" for e in cells), flush=True)


if __name__ == "__main__":
    main()
