"""A fine-tuned model from one .keras file: fastvgg.load_model against Keras, and the head's cost.

The issue's first shape at 224x224: Sequential([VGG16(include_top=False), GlobalAveragePooling2D,
Dense(1024, relu), Dense(5, softmax)]), random weights (seeded), saved by Keras 3. Measured, all
with the same threads:

* load: fastvgg.load_model(file) against fastvgg.VGG16(base weights, include_top=False), each the
  median of a few loads in this process (warm page cache);
* predict at batch 1 (ms/image, median and min-max) of fastvgg's fine-tuned model, of fastvgg's
  base alone, of the head alone (a model of the same head on block5_pool's 7x7x512: the head's
  cost), of Keras 3 predict and of a tf.function call;
* agreement: max |fastvgg - Keras| on the untimed warm-up call.

    PYTHONPATH=python python bench/finetuned.py [--threads 2] [--repeats 15] [--output PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def pin_threads(threads: int) -> None:
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "FASTVGG_NUM_THREADS"):
        os.environ[name] = str(threads)
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def layers_from(keras, layer):
    """A fresh copy of a Keras layer (same config, no weights yet)."""
    return layer.__class__.from_config(layer.get_config())


def timed(run, repeats: int):
    run()  # warm-up: caches, threads, tracing
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), min(seconds), max(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--output", help="also write the table (markdown) here")
    args = parser.parse_args()
    pin_threads(args.threads)

    import numpy as np
    import keras
    import tensorflow as tf

    import fastvgg

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    fastvgg.set_num_threads(args.threads)
    keras.utils.set_random_seed(0)
    layers = keras.layers
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3))
    model = keras.Sequential(
        [base, layers.GlobalAveragePooling2D(), layers.Dense(1024, activation="relu"), layers.Dense(5, activation="softmax")]
    )
    directory = tempfile.mkdtemp(prefix="fastvgg_bench_")
    path = os.path.join(directory, "finetuned.keras")
    base_path = os.path.join(directory, "base.weights.h5")
    model.save(path)
    base.save_weights(base_path)
    # The head alone, on block5_pool's 7x7x512, with the same weights: its time is the head's
    # cost measured directly (the difference of two ~70 ms medians drowns in noise on a busy machine).
    head = keras.Sequential([keras.Input((7, 7, 512))] + [layers_from(keras, layer) for layer in model.layers[1:]])
    for ours_layer, theirs in zip(head.layers, model.layers[1:]):
        ours_layer.set_weights(theirs.get_weights())
    head_path = os.path.join(directory, "head.keras")
    head.save(head_path)

    cache = os.path.join(directory, "packed")

    def load_finetuned(packed_cache=False):
        return fastvgg.load_model(path, packed_cache=packed_cache)

    def load_base(packed_cache=False):
        return fastvgg.VGG16(base_path, include_top=False, input_shape=(224, 224, 3), packed_cache=packed_cache)

    # Unpacked from the file each time, and mapped from a warm packed cache (the first call of
    # timed() is its warm-up, which writes the cache file).
    loads = {(name, label): timed(lambda: load(setting), args.loads)[0]
             for name, load in (("fine-tuned", load_finetuned), ("base", load_base))
             for label, setting in (("unpacked", False), ("cached", cache))}
    ours, ours_base = load_finetuned(), load_base()
    ours_head = fastvgg.load_model(head_path)
    features = np.random.default_rng(1).uniform(0, 4, (1, 7, 7, 512)).astype(np.float32)
    head_difference = float(np.abs(ours_head.predict(features) - head.predict(features, verbose=0)).max())

    x = fastvgg.preprocess_input(np.random.default_rng(0).uniform(0, 255, (1, 224, 224, 3)).astype(np.float32))
    expected = model.predict(x, verbose=0)
    difference = float(np.abs(ours.predict(x) - expected).max())
    call = tf.function(lambda t: model(t, training=False))
    rows = [
        ("fastvgg.load_model, fine-tuned", timed(lambda: ours.predict(x), args.repeats)),
        ("fastvgg VGG16 base alone (no head)", timed(lambda: ours_base.predict(x), args.repeats)),
        ("fastvgg head alone (7x7x512 in)", timed(lambda: ours_head.predict(features), args.repeats * 20)),
        ("Keras 3 predict", timed(lambda: model.predict(x, verbose=0), args.repeats)),
        ("Keras 3 tf.function", timed(lambda: call(x).numpy(), args.repeats)),
    ]
    head = rows[0][1][0] - rows[1][1][0]
    lines = [
        f"Fine-tuned VGG16 (GAP, Dense 1024 relu, Dense 5 softmax), 224x224, batch 1, {args.threads} threads, "
        f"median of {args.repeats} (min-max)",
        "",
        "| contender | ms/image |",
        "|---|---|",
    ]
    lines += [f"| {name} | {m * 1e3:.2f} ({lo * 1e3:.2f}-{hi * 1e3:.2f}) |" for name, (m, lo, hi) in rows]
    lines += [
        "",
        f"The head costs {rows[2][1][0] * 1e3:.2f} ms per image run alone, predict's Python included "
        f"({head * 1e3:.2f} ms as fine-tuned minus base medians).",
        f"Load (median of {args.loads} after one warm-up): fastvgg.load_model of the .keras file "
        f"{loads['fine-tuned', 'unpacked']:.2f} s unpacked, {loads['fine-tuned', 'cached']:.3f} s from the packed cache; "
        f"fastvgg.VGG16 from the base's weights {loads['base', 'unpacked']:.2f} s unpacked, "
        f"{loads['base', 'cached']:.3f} s from the cache.",
        f"Agreement: max |fastvgg - Keras| = {difference:.2e} (whole model), {head_difference:.2e} (head alone).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf8") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
