"""fastvgg against the installed peers, same weights, same inputs, same thread count, one run.

Measures VGG16 (or VGG19) at 224x224 with random weights: median and spread of ms per
image over repeated predict calls, images/s, each contender's time as a ratio to fastvgg's,
and the largest difference of its predictions from Keras's. Peers that are not installed
are skipped and said so. So far the peers covered are Keras 3 (`model.predict` and a
compiled call); ONNX Runtime, OpenVINO and PyTorch are still to come.

    python bench/peers.py [--model vgg16] [--threads 2] [--batches 1 8] [--repeats 7]

Run it on an otherwise idle machine: the numbers are medians, but a busy neighbour still
shifts them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def timed(fn, repeats: int):
    fn()  # warm-up: first-call allocation, thread start, graph tracing
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("vgg16", "vgg19"), default="vgg16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    # Thread counts must be fixed before TensorFlow or OpenMP start their pools.
    os.environ["FASTVGG_NUM_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np

    import fastvgg

    try:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import keras
    except ImportError as error:
        print(f"Keras/TensorFlow not installed ({error}); only fastvgg is timed.", file=sys.stderr)
        keras = None

    build = fastvgg.VGG16 if args.model == "vgg16" else fastvgg.VGG19
    rng = np.random.default_rng(0)
    contenders = {}
    with tempfile.TemporaryDirectory() as tmp:
        if keras is not None:
            keras_model = getattr(keras.applications, args.model.upper())(weights=None)
            path = os.path.join(tmp, "weights.h5")
            keras_model.save(path)  # Keras 3 writes the legacy layout for .h5 full-model files
            ours = build(path)
            compiled = tf.function(lambda x: keras_model(x, training=False), jit_compile=False)
            contenders["keras predict"] = lambda x: keras_model.predict(x, batch_size=len(x), verbose=0)
            contenders["keras compiled call"] = lambda x: compiled(x).numpy()
        else:
            ours = build(None, seed=0)
        contenders = {"fastvgg": ours.predict, **contenders}

        print(f"{args.model}, 224x224, float32, {args.threads} threads, kernels: {fastvgg._core.active_isa()}")
        print()
        print("| contender | batch | ms/image (median) | spread | images/s | time vs fastvgg | max abs diff vs Keras |")
        print("|---|---|---|---|---|---|---|")
        for batch in args.batches:
            x = rng.uniform(-120, 135, (batch, 224, 224, 3)).astype(np.float32)
            reference = contenders["keras predict"](x) if keras is not None else None
            base = None
            for name, run in contenders.items():
                seconds = [s / batch for s in timed(lambda: run(x), args.repeats)]
                median = statistics.median(seconds)
                base = base or median
                diff = "" if reference is None else f"{np.abs(run(x) - reference).max():.1e}"
                print(
                    f"| {name} | {batch} | {median * 1e3:.1f} | {min(seconds) * 1e3:.1f}-{max(seconds) * 1e3:.1f} "
                    f"| {1 / median:.2f} | {median / base:.2f}x | {diff} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
