"""Command line: ``fastvgg predict``, ``features``, ``info`` and ``demo`` (also ``python -m fastvgg``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

import numpy as np

# Errors a user can fix (a wrong path, a bad layer name, a missing extra): one line on stderr
# and exit status 1, not a traceback.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


BUILT_IN_MODELS = ("vgg16", "vgg19")


def _is_model_file(args) -> bool:
    return args.model not in BUILT_IN_MODELS


def _build_model(args, include_top: bool, input_shape=None):
    import fastvgg

    if _is_model_file(args):
        if not os.path.exists(args.model):
            raise FileNotFoundError(f"--model {args.model!r}: no such file (give vgg16, vgg19 or a .keras / .h5 model file)")
        return fastvgg.load_model(args.model, precision=args.precision)
    build = fastvgg.VGG16 if args.model == "vgg16" else fastvgg.VGG19
    weights = None if args.weights == "none" else args.weights
    return build(weights, include_top=include_top, input_shape=input_shape, precision=args.precision, seed=0)


def _load_images(paths: Sequence[str], size) -> np.ndarray:
    from fastvgg.image import img_to_array, load_img

    return np.stack([img_to_array(load_img(path, target_size=tuple(size))) for path in paths])


def _preprocessing(args, model) -> str:
    """What the images go through before the model: --preprocess, else Keras's VGG ("caffe")
    preprocessing, unless a model file preprocesses its input itself (Rescaling or Normalization
    first, or preprocess_input inside the model)."""
    if args.preprocess != "auto":
        return args.preprocess
    from fastvgg.saved_model import preprocesses_its_input

    if _is_model_file(args) and preprocesses_its_input(model):
        return "none"
    return "caffe"


def _class_labels(path: Optional[str], classes: int) -> List[str]:
    """Names of the classes: Keras's class_indices ({"cat": 0, "dog": 1}) or a list of names in a JSON file."""
    if path is None:
        return [f"class {i}" for i in range(classes)]
    import json

    with open(path, encoding="utf8") as handle:
        try:
            labels = json.load(handle)
        except ValueError as error:
            raise ValueError(f"--labels {path!r} is not JSON ({error})") from None
    if isinstance(labels, dict):
        names = {}
        for name, index in labels.items():
            if isinstance(index, bool) or not isinstance(index, int):
                raise ValueError(f"--labels {path!r}: class {name!r} has index {index!r}, not an integer")
            names[index] = str(name)
        labels = [names.get(i, f"class {i}") for i in range(classes)]
    if not isinstance(labels, list) or len(labels) != classes:
        raise ValueError(
            f"--labels {path!r} must name the model's {classes} classes, as Keras's class_indices "
            '({"cat": 0, "dog": 1}) or a list of names'
        )
    return [str(label) for label in labels]


def _predict(args) -> int:
    import fastvgg

    model = _build_model(args, include_top=True)
    size = tuple(d or 224 for d in model.input_shape[1:3])  # a model of any input size gets 224x224
    x = _load_images(args.images, size)
    preprocessing = _preprocessing(args, model)
    if preprocessing == "caffe":
        x = fastvgg.preprocess_input(x)
    elif preprocessing == "scale":
        x = x / np.float32(255.0)
    probs = model.predict(x, batch_size=args.batch_size)
    outputs = list(probs.values()) if isinstance(probs, dict) else probs if isinstance(probs, list) else [probs]
    if len(outputs) != 1:
        raise ValueError(
            f"the model has {len(outputs)} outputs; `predict` shows one model's class scores. Take its layers' "
            "outputs with `fastvgg features --model FILE --layer NAME`"
        )
    probs = outputs[0]  # a Keras 3 model built with outputs={"name": ...} gives a dict of one
    if probs.ndim != 2:
        raise ValueError(f"the model's output has shape {probs.shape[1:]}; `predict` shows flat class scores only")
    if probs.shape[1] == 1 and _is_model_file(args):  # a binary (sigmoid) head: the score of class 1
        probs = np.concatenate([1.0 - probs, probs], axis=1)
    if probs.shape[1] == 1000 and args.labels is None:
        rows = fastvgg.decode_predictions(probs, top=args.top)
    else:  # a fine-tuned top: the names come from --labels, if given
        labels = _class_labels(args.labels, probs.shape[1])
        rows = [[(labels[i], "", float(p[i])) for i in np.argsort(p)[::-1][: args.top]] for p in probs]
    for path, ranked in zip(args.images, rows):
        print(path)
        print(f"  {'rank':<6}{'class':<32}{'wnid':<12}{'score':>8}")
        for rank, (wnid, name, score) in enumerate(ranked, start=1):
            label, ident = (name, wnid) if name else (wnid, "")
            print(f"  {rank:<6}{label:<32}{ident:<12}{score:>8.4f}")
    return 0


def _features(args) -> int:
    from fastvgg.stream import extract_files

    layers = args.layer or ["block5_pool"]
    model = _build_model(args, include_top=False, input_shape=(args.size[0], args.size[1], 3))
    weights = args.weights if args.weights in ("imagenet", "none") else os.path.abspath(args.weights)
    settings = {"model": args.model, "weights": weights, "precision": args.precision}
    try:
        summary = extract_files(
            model, args.images, layers, args.output, size=args.size, pooling=args.pooling,
            batch_size=args.batch_size, workers=args.workers, settings=settings, restart=args.restart,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print(f"fastvgg features: interrupted; run the same command again to resume "
              f"(progress is kept in {args.output}.partial).", file=sys.stderr)
        return 130
    if summary["resumed_at"] is not None:
        print(f"resumed after {summary['resumed_at']} of {summary['files']} file(s)")
    shapes = ", ".join(f"{layer} {(summary['rows'],) + shape}" for layer, shape in summary["shapes"].items())
    print(f"{args.output}: features of {summary['rows']} image(s): {shapes}")
    if summary["skipped"]:
        stem = os.path.splitext(args.output)[0]
        print(f"skipped {len(summary['skipped'])} unreadable file(s), listed in {stem}.skipped.txt:", file=sys.stderr)
        for path, reason in summary["skipped"]:
            print(f"  {path}: {reason}", file=sys.stderr)
    return 0


def _info(args) -> int:
    import fastvgg
    from fastvgg import _core

    if args.model_file is not None:
        return _model_info(args.model_file)
    print(f"fastvgg {fastvgg.__version__}")
    print(f"kernels: {_core.active_isa()} (this CPU supports: {', '.join(_core.available_isas())})")
    print(f"threads: {fastvgg.get_num_threads()}")
    # Each precision's kernel set, from an executor of an empty graph: exactly what a model gets.
    from fastvgg.models import PRECISIONS

    for precision in PRECISIONS:
        try:
            runs = _core.CpuExecutor(_core.Graph(3), precision).kernel_set
        except RuntimeError as error:
            runs = f"unavailable ({error})"
        print(f"precision {precision}: {runs}")
    from fastvgg import cuda

    usable, detail = cuda.cuda_status()
    if not cuda.cuda_built():
        print("cuda: not built (rebuild with FASTVGG_CUDA=ON for the GPU backend)")
    else:
        print(f"cuda: built; {'usable: ' if usable else 'not usable: '}{detail}")
    return 0


def _model_info(path: str) -> int:
    """The layers of a model file, with shapes and parameter counts, or what keeps it from loading."""
    import fastvgg

    model = fastvgg.load_model(path)
    lines: List[str] = []
    model.summary(print_fn=lines.append)
    print("\n".join(lines))
    return 0


def _demo(args) -> int:
    """Builds a model and times a prediction on a synthetic image: a smoke test of the install."""
    import fastvgg

    from fastvgg.download import IMAGENET_FILES, weights_cache_dirs

    build = fastvgg.VGG16 if args.model == "vgg16" else fastvgg.VGG19
    # The demo times the kernels on a synthetic image, so it never starts a 500 MB download:
    # it uses the ImageNet file when a cache has it, and random weights otherwise.
    filename, _ = IMAGENET_FILES[(args.model, True)]
    cached = [os.path.join(d, filename) for d in weights_cache_dirs() if os.path.isfile(os.path.join(d, filename))]
    started = time.perf_counter()
    if cached:
        model = build(cached[0])
        source = f"ImageNet weights ({cached[0]})"
    else:
        model = build(None, seed=0)
        source = "random weights (no ImageNet file in the Keras or fastvgg cache)"
    loaded = time.perf_counter() - started
    rng = np.random.default_rng(0)
    x = fastvgg.preprocess_input(rng.uniform(0, 255, size=(1, 224, 224, 3)).astype(np.float32))
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


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="vgg16",
        help="vgg16 (default), vgg19, or a Keras model file (.keras or .h5, e.g. your fine-tuned model; "
        "--weights is then not used)",
    )
    parser.add_argument(
        "--weights", default="imagenet",
        help="'imagenet' (default; downloaded once if not cached), a Keras weights file, or 'none' for random weights",
    )
    # fastvgg.models.PRECISIONS, written out so that --help does not import the extension.
    parser.add_argument(
        "--precision", choices=("fast", "highest", "bf16", "bf16x3"), default="fast",
        help="as fastvgg.VGG16's precision: 'fast' (default, float32), 'highest', 'bf16' (AVX512_BF16 or AMX) or "
             "'bf16x3' (AMX)",
    )
    parser.add_argument("--batch-size", type=int, default=32)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvgg", description="Keras VGG16/VGG19 inference without TensorFlow.")
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="classify images; prints the top classes of each")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    _add_model_options(predict)
    predict.add_argument("--top", type=int, default=5, help="classes shown per image (default 5)")
    predict.add_argument("--labels", help="JSON file naming a model file's classes: Keras's class_indices or a list")
    predict.add_argument(
        "--preprocess", choices=("auto", "caffe", "scale", "none"), default="auto",
        help="caffe: Keras's VGG preprocess_input; scale: divide by 255; none: pixels 0..255 as they are; "
        "auto (default): none for a model file that starts with Rescaling, Normalization or preprocess_input, else caffe",
    )
    predict.set_defaults(run=_predict)

    features = commands.add_parser(
        "features", help="save layer outputs for many images (files, directories, globs) as .npy/.npz/.parquet",
    )
    features.add_argument("images", nargs="+", metavar="IMAGE",
                          help="image files, directories (searched recursively) or glob patterns")
    features.add_argument("--layer", action="append",
                          help="layer name, e.g. block4_pool or block5_conv3:preact (default block5_pool); "
                               "repeat for several layers (then write .npz or .parquet)")
    features.add_argument("--pooling", choices=("avg", "max"), help="average or max over height and width")
    features.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("HEIGHT", "WIDTH"),
                          help="images are resized to this (default 224 224)")
    features.add_argument("-o", "--output", required=True,
                          help="output file: .npy (one layer), .npz or .parquet (one or several layers)")
    features.add_argument("--workers", type=int, help="image decoding threads (default: the cores, 2 to 8)")
    features.add_argument("--restart", action="store_true",
                          help="discard an interrupted run's progress instead of resuming it")
    features.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_options(features)
    features.set_defaults(run=_features)

    info = commands.add_parser("info", help="version, chosen CPU kernels, threads; or a model file's layers")
    info.add_argument("model_file", nargs="?", metavar="MODEL", help="a .keras or .h5 model file: print its layers")
    info.set_defaults(run=_info)

    demo = commands.add_parser("demo", help="build a model and time a prediction on a synthetic image")
    demo.add_argument("--model", choices=("vgg16", "vgg19"), default="vgg16")
    demo.add_argument("--repeat", type=int, default=5, help="timed predictions (default 5)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"fastvgg {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
