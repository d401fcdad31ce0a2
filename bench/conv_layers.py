"""Times the 3x3 convolution kernels on the 13 VGG16 layer shapes (224x224 input), batch 1.

Each layer is timed by fastvgg._core.testing.time_conv3x3, which packs the weights and lays
out the input once and returns the median seconds of `repeats` kernel calls, so only the
kernel is measured. Effective GFLOP/s count direct-convolution FLOPs (2 * 9 * H * W * Cin *
Cout) for every algorithm, so Winograd's figure can exceed the machine's FMA peak.

Algorithms "bf16" (direct, vdpbf16ps) and "int14" (Winograd F(4x4) with int14 products,
vpdpwssd) are the bf16 kernel set's (csrc/bf16/), timed by time_conv3x3_bf16 the same way; they
are offered (and in the default list) only where the CPU reports AVX512_BF16 and AVX512_VNNI,
and --isa does not apply to them.

Algorithm "winograd-batch" runs conv3x3_winograd_batch over --batch images in one call (U read
once per block of tiles, not once per image) and reports ms per image.

    python bench/conv_layers.py [--isa avx512] [--threads 2] [--repeats 21] [--batch 8]
                                [--algorithms direct winograd bf16 int14 winograd-batch]
"""

import argparse

import numpy as np

from fastvgg import _core

# (height = width, input channels, output channels) of VGG16's convolutions at 224x224.
VGG16_CONV_LAYERS = [
    ("block1_conv1", 224, 3, 64),
    ("block1_conv2", 224, 64, 64),
    ("block2_conv1", 112, 64, 128),
    ("block2_conv2", 112, 128, 128),
    ("block3_conv1", 56, 128, 256),
    ("block3_conv2", 56, 256, 256),
    ("block3_conv3", 56, 256, 256),
    ("block4_conv1", 28, 256, 512),
    ("block4_conv2", 28, 512, 512),
    ("block4_conv3", 28, 512, 512),
    ("block5_conv1", 14, 512, 512),
    ("block5_conv2", 14, 512, 512),
    ("block5_conv3", 14, 512, 512),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", default=_core.available_isas()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    bf16_missing = _core.testing.bf16_unavailable_reason()
    default_algorithms = ["direct", "winograd"] + ([] if bf16_missing else ["bf16", "int14"])
    parser.add_argument("--algorithms", nargs="+", default=default_algorithms,
                        choices=["direct", "winograd", "bf16", "int14", "winograd-batch"])
    parser.add_argument("--batch", type=int, default=8, help="images per call for winograd-batch")
    parser.add_argument("--layers", nargs="*", help="only these layer names")
    args = parser.parse_args()
    if {"bf16", "int14"} & set(args.algorithms) and bf16_missing:
        parser.error(f"bf16/int14: {bf16_missing}")
    _core.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"isa={args.isa} threads={args.threads} repeats={args.repeats} (median ms, effective GFLOP/s)")
    header = f"{'layer':14s} {'HxW':>7s} {'Cin':>4s} {'Cout':>4s} {'GFLOP':>6s}"
    for a in args.algorithms:
        header += f" {a + ' ms':>13s} {'GFLOP/s':>8s}"
    print(header)
    totals = {a: 0.0 for a in args.algorithms}
    best_total = 0.0
    for name, size, cin, cout in VGG16_CONV_LAYERS:
        if args.layers and name not in args.layers:
            continue
        images = args.batch if "winograd-batch" in args.algorithms else 1
        x = np.maximum(rng.standard_normal((images, size, size, cin)), 0).astype(np.float32)
        kernel = (rng.standard_normal((3, 3, cin, cout)) * np.sqrt(2.0 / (9 * (cin + cout)))).astype(np.float32)
        bias = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        flop = 2.0 * 9 * size * size * cin * cout
        line = f"{name:14s} {size:>3d}x{size:<3d} {cin:4d} {cout:4d} {flop / 1e9:6.3f}"
        times = []
        for a in args.algorithms:
            if a == "bf16":
                seconds = _core.testing.time_conv3x3_bf16(x, kernel, bias, args.repeats, "direct")
            elif a == "int14":
                seconds = _core.testing.time_conv3x3_bf16(x, kernel, bias, args.repeats, "winograd_int14")
            elif a == "winograd-batch":
                seconds = _core.testing.time_conv3x3_winograd_batch(x, kernel, bias, args.isa, args.repeats) / len(x)
            else:
                seconds = _core.testing.time_conv3x3(x, kernel, bias, a, args.isa, args.repeats)
            totals[a] += seconds
            times.append(seconds)
            line += f" {seconds * 1e3:13.3f} {flop / seconds / 1e9:8.1f}"
        best_total += min(times)
        print(line)
    print("total ms:  " + "  ".join(f"{a} {t * 1e3:.2f}" for a, t in totals.items()) + f"  best-per-layer {best_total * 1e3:.2f}")


if __name__ == "__main__":
    main()
