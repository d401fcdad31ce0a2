"""Command line: ``fastvgg info`` and ``fastvgg demo`` (also ``python -m fastvgg``)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import numpy as np


def _info(_args) -> int:
    import fastvgg
    from fastvgg import _core

    print(f"fastvgg {fastvgg.__version__}")
    print(f"kernels: {_core.active_isa()} (this CPU supports: {', '.join(_core.available_isas())})")
    print(f"threads: {fastvgg.get_num_threads()}")
    print("cuda: not built (this version has CPU kernels only)")
    return 0


def _demo(args) -> int:
    """Builds a model and times a prediction on a synthetic image: a smoke test of the install."""
    import fastvgg

    build = fastvgg.VGG16 if args.model == "vgg16" else fastvgg.VGG19
    started = time.perf_counter()
    try:
        model = build("imagenet")
        source = "ImageNet weights"
    except FileNotFoundError:
        model = build(None, seed=0)
        source = "random weights (no ImageNet file in the Keras or fastvgg cache)"
    loaded = time.perf_counter() - started
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, size=(1, 224, 224, 3)).astype(np.float32)
    x = image[..., ::-1] - np.array([103.939, 116.779, 123.68], dtype=np.float32)  # Keras's caffe preprocessing
    model.predict(x)  # first call warms caches and threads
    times = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        probs = model.predict(x)
        times.append(time.perf_counter() - started)
    top = np.argsort(probs[0])[::-1][:5]
    print(f"{model.name} with {source}: built in {loaded:.2f} s")
    print(f"predict, batch 1, 224x224: median {np.median(times) * 1e3:.1f} ms over {args.repeat} runs")
    print("top-5 class indices: " + ", ".join(f"{i} ({probs[0, i]:.4f})" for i in top))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastvgg", description="Keras VGG16/VGG19 inference without TensorFlow.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, chosen CPU kernels, threads").set_defaults(run=_info)
    demo = commands.add_parser("demo", help="build a model and time a prediction on a synthetic image")
    demo.add_argument("--model", choices=("vgg16", "vgg19"), default="vgg16")
    demo.add_argument("--repeat", type=int, default=5, help="timed predictions (default 5)")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
