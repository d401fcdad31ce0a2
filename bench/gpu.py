"""fastvgg's CUDA backend against PyTorch CUDA (and ONNX Runtime's CUDA provider), when a GPU
is usable; otherwise it prints why (fastvgg.cuda_status()) and exits 0 without timing anything.

    pip install ".[bench]" && FASTVGG_CUDA=ON pip install . && python bench/gpu.py
    python bench/gpu.py --quick          # batch 1 and 8, few repeats
    python bench/gpu.py --output bench/results-gpu.md

Same random, seeded VGG16 weights for everyone (taken from fastvgg's model, converted with
bench/run.py's builders); fp32 everywhere: PyTorch's TF32 is switched off for matmuls and
cuDNN, so its numbers are the issue's reference (goal: fastvgg within 1.5x of PyTorch at batch
64, batch-1 latency under 3 ms). Each timed call goes host to host: NHWC numpy in, numpy out,
so the transfers count for everyone. Every contender's output is first checked against
fastvgg's CPU result. Median ms per batch and ms per image over the repeats are reported.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def model_layers(model):
    """[(kind, kernel, bias)] in bench/run.py's form, from a fastvgg model."""
    layers = []
    for layer in model.layers[1:]:
        if layer.class_name == "Conv2D":
            layers.append(("conv",) + tuple(layer.get_weights()))
        elif layer.class_name == "MaxPooling2D":
            layers.append(("pool", None, None))
        elif layer.class_name == "Dense":
            layers.append(("dense",) + tuple(layer.get_weights()))
    return layers


def fastvgg_runner(model):
    from fastvgg import cuda

    executor = cuda.executor_for_model(model)
    last = len(model.layers) - 2
    return lambda x: executor.forward(x, [last])[0]


def torch_runner(layers):
    import torch

    from run import build_torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    model = build_torch(layers, include_top=True).cuda()

    def run(x):
        with torch.inference_mode():
            out = model(torch.from_numpy(x).cuda().permute(0, 3, 1, 2))
            return out.cpu().numpy()  # synchronises

    return run


def onnxruntime_cuda_runner(layers, directory):
    import onnxruntime as ort

    from run import build_onnx

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    path = os.path.join(directory, "vgg16.onnx")
    build_onnx(layers, True, path)
    session = ort.InferenceSession(path, providers=[("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"])
    return lambda x: session.run(["output"], {"input": x})[0]


def median_ms(run, x, repeats):
    run(x)  # warm-up: allocation, autotuning, first-touch of the weights
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(x)
        seconds.append(time.perf_counter() - t)
    return 1000 * statistics.median(seconds), 1000 * min(seconds), 1000 * max(seconds)


def gpu_description():
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "(nvidia-smi not available)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", help="also write the markdown report here")
    args = parser.parse_args()

    import numpy as np

    import fastvgg

    usable, reason = fastvgg.cuda_status()
    if not usable:
        print(f"GPU benchmark skipped: {reason}")
        return 0

    batches = [1, 8] if args.quick else [1, 8, 64]
    repeats = 5 if args.quick else 30
    model = fastvgg.VGG16(None, seed=0, precision="highest")
    layers = model_layers(model)
    rng = np.random.default_rng(0)
    contenders = {"fastvgg cuda": lambda: fastvgg_runner(model), "torch cuda": lambda: torch_runner(layers)}
    lines = [
        f"# fastvgg GPU benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"GPU: {reason}; nvidia-smi: {gpu_description()}; host {platform.node()}, Python {platform.python_version()}",
        "",
        "VGG16 224x224 fp32 (TF32 off), host to host, median ms per batch (min-max), ms per image:",
        "",
        "| contender | " + " | ".join(f"batch {b}" for b in batches) + " | max abs vs CPU |",
        "|---|" + "---|" * (len(batches) + 1),
    ]
    with tempfile.TemporaryDirectory() as directory:
        contenders["onnxruntime cuda"] = lambda: onnxruntime_cuda_runner(layers, directory)
        reference = {b: rng.uniform(-120, 140, (b, 224, 224, 3)).astype(np.float32) for b in batches}
        expected = model.predict(reference[batches[0]])
        for name, make in contenders.items():
            try:
                run = make()
            except Exception as error:  # not installed, no CUDA provider, ...
                lines.append(f"| {name} | skipped: {error} |")
                continue
            difference = float(np.abs(run(reference[batches[0]]) - expected).max())
            cells = []
            for b in batches:
                med, low, high = median_ms(run, reference[b], repeats)
                cells.append(f"{med:.2f} ({low:.2f}-{high:.2f}), {med / b:.2f}/img")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {difference:.1e} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
