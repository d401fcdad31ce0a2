"""Times what issue 9 changed in the output path: a requested early layer on large images
(each output used to be copied twice, C++ into a temporary then into the result) and a batch-1
VGG16 prediction. Run it once per build to compare two builds on the same machine:

    python bench/outputs.py --repeats 7

Prints the median and best wall milliseconds and the median CPU milliseconds of each case;
the README records a comparison.
"""

import argparse
import statistics
import time

import numpy as np

import fastvgg


def timed(function, repeats):
    """Median and best wall milliseconds, and the median CPU milliseconds of this process (all
    threads): on a machine shared with other work the CPU time moves less than the wall time."""
    function()  # warm-up: page faults, workspace growth
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        function()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    return statistics.median(seconds) * 1e3, min(seconds) * 1e3, statistics.median(cpu_seconds) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    fastvgg.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    notop = fastvgg.VGG16(None, include_top=False, seed=0)
    large = rng.uniform(-100, 100, (4, 480, 640, 3)).astype(np.float32)
    top = fastvgg.VGG16(None, seed=0)
    one = rng.uniform(-100, 100, (1, 224, 224, 3)).astype(np.float32)
    cases = {
        'extract(["block1_conv2"]) 4x480x640': lambda: notop.extract(large, ["block1_conv2"]),
        "VGG16 predict batch 1": lambda: top.predict(one),
    }
    for name, function in cases.items():
        median, best, cpu = timed(function, args.repeats)
        print(f"{name}: median {median:.1f} ms, best {best:.1f} ms, CPU {cpu:.1f} ms")


if __name__ == "__main__":
    main()
