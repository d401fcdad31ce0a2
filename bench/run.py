"""fastvgg against every installed peer, same weights, same inputs, same threads, in one run.

    pip install ".[bench]" && python bench/run.py            # full run, writes bench/results.md
    python bench/run.py --quick                              # smoke run: batch 1, few repeats

Contenders: fastvgg, Keras 3 (`predict` and a tf.function call), ONNX Runtime, OpenVINO (f32
forced and its default precision) and PyTorch (channels_last, inference_mode); a peer that is
not installed is skipped and the report says so. Keras is required: its random, seeded VGG is
the source of the weights (saved to .h5 for fastvgg, converted for the others) and its
predictions are the reference every contender is checked against before it is timed.

The report (markdown, printed and written to --output) has: the machine; ms/image (median and
min-max), images/s and the time ratio to fastvgg for VGG16 at batch 1, 8, 32 (224x224, with the
top), VGG16 without the top at 480x640 and VGG19 at batch 1, with each contender's agreement
with Keras; fastvgg per conv layer (effective GFLOP/s against the FMA peak measured here, 1 vs 2
threads) and per dense layer (GB/s against a measured streaming read); load time and peak RSS of
each contender in its own fresh subprocess.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def pin_threads(threads: int) -> None:
    # Every runtime reads these when it starts its pool, so they must be set before any import.
    for var in ("FASTVGG_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "TF_NUM_INTRAOP_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# ---------------------------------------------------------------- weights and peer models


def keras_layers(keras_model):
    """[(kind, kernel, bias)] of the conv/pool/dense layers in order, Keras layout."""
    out = []
    for layer in keras_model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            out.append(("conv",) + tuple(layer.get_weights()))
        elif kind == "MaxPooling2D":
            out.append(("pool", None, None))
        elif kind == "Dense":
            out.append(("dense",) + tuple(layer.get_weights()))
    return out


# The lowest ONNX versions this graph needs, so that older runtimes load it too: every op used
# (Conv, Relu, MaxPool, Transpose, Flatten, Gemm, Softmax with axis=-1, Identity) has had its
# present meaning since opset 13, which IR version 7 carries. onnx.helper.make_model would
# otherwise stamp the installed onnx's newest IR version (14 with onnx 1.23), which ONNX
# Runtime 1.31 refuses.
ONNX_OPSET = 13
ONNX_IR_VERSION = 7


def build_onnx(layers, include_top: bool, path: str) -> None:
    """NHWC in, NHWC (or class) out, the convolutions in NCHW as ONNX wants."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    nodes.append(helper.make_node("Transpose", ["input"], ["t0"], perm=[0, 3, 1, 2]))
    current, n = "t0", 0
    for kind, kernel, bias in layers:
        n += 1
        if kind == "conv":
            inits += [numpy_helper.from_array(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)), f"w{n}"),
                      numpy_helper.from_array(bias, f"b{n}")]
            nodes.append(helper.make_node("Conv", [current, f"w{n}", f"b{n}"], [f"c{n}"], kernel_shape=[3, 3],
                                          pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("Relu", [f"c{n}"], [f"r{n}"]))
            current = f"r{n}"
        elif kind == "pool":
            nodes.append(helper.make_node("MaxPool", [current], [f"p{n}"], kernel_shape=[2, 2], strides=[2, 2]))
            current = f"p{n}"
        else:
            if current.startswith("p"):  # first dense: Keras flattens NHWC, so fc1's rows are in that order
                nodes.append(helper.make_node("Transpose", [current], ["nhwc"], perm=[0, 2, 3, 1]))
                nodes.append(helper.make_node("Flatten", ["nhwc"], ["flat"], axis=1))
                current = "flat"
            inits += [numpy_helper.from_array(kernel, f"w{n}"), numpy_helper.from_array(bias, f"b{n}")]
            nodes.append(helper.make_node("Gemm", [current, f"w{n}", f"b{n}"], [f"g{n}"]))
            last = n == len(layers)
            nodes.append(helper.make_node("Softmax" if last else "Relu", [f"g{n}"], [f"a{n}"], **({"axis": -1} if last else {})))
            current = f"a{n}"
    if include_top:
        nodes.append(helper.make_node("Identity", [current], ["output"]))
        out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", layers[-1][1].shape[1]])
    else:
        nodes.append(helper.make_node("Transpose", [current], ["output"], perm=[0, 2, 3, 1]))
        out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "h", "w", 512])
    graph = helper.make_graph(nodes, "vgg", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "H", "W", 3])],
                              [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=ONNX_IR_VERSION)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def build_torch(layers, include_top: bool):
    import torch
    from torch import nn

    modules = []
    for kind, kernel, bias in layers:
        if kind == "conv":
            conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1)
            conv.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
            conv.bias.data = torch.from_numpy(bias.copy())
            modules += [conv, nn.ReLU()]
        elif kind == "pool":
            modules.append(nn.MaxPool2d(2))
        else:
            if isinstance(modules[-1], nn.MaxPool2d):
                modules += [NHWC(), nn.Flatten()]
            dense = nn.Linear(kernel.shape[0], kernel.shape[1])
            dense.weight.data = torch.from_numpy(kernel.T.copy())
            dense.bias.data = torch.from_numpy(bias.copy())
            modules += [dense, nn.ReLU()]
    if include_top:
        modules[-1] = nn.Softmax(dim=-1)
    else:
        modules.append(NHWC())
    return nn.Sequential(*modules).eval().to(memory_format=torch.channels_last)


def _nhwc_module():
    from torch import nn

    class _NHWC(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1)

    return _NHWC


def NHWC():
    return _nhwc_module()()


def torch_runner(model):
    import torch

    def run(x):
        with torch.inference_mode():
            # NHWC numpy viewed as NCHW is exactly channels_last memory: no copy.
            return model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()

    return run


def openvino_runner(onnx_path: str, threads: int, f32: bool):
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = {}

    def run(x):
        # One compiled model per input shape: static shapes are OpenVINO's fast path.
        if x.shape not in compiled:
            model = core.read_model(onnx_path)
            model.reshape({"input": list(x.shape)})
            compiled[x.shape] = core.compile_model(model, "CPU", config)
        return compiled[x.shape]([x])[0]

    return run


def onnxruntime_runner(onnx_path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["output"], {"input": x})[0]


PEERS = ["fastvgg", "fastvgg bf16x3", "fastvgg bf16", "fastvgg bf16 int14", "keras predict", "keras tf.function", "onnxruntime", "openvino f32", "openvino default", "torch"]
PEER_MODULES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino f32": ("onnx", "openvino"),
                "openvino default": ("onnx", "openvino"), "torch": ("torch",)}


ONNX_PEERS = ("onnxruntime", "openvino f32", "openvino default")


def bf16_unavailable():
    """Why this CPU or build cannot run precision='bf16', or None."""
    from fastvgg import _core

    if not hasattr(_core.testing, "bf16_unavailable_reason"):
        return "this build has no bf16 kernels"
    return _core.testing.bf16_unavailable_reason() or None


def bf16_sets():
    """The bf16 kernel sets this build and CPU run, the default (precision='bf16') first."""
    from fastvgg import _core

    return _core.testing.bf16_kernel_sets() if hasattr(_core.testing, "bf16_kernel_sets") else []


def amx_unavailable():
    """Why this CPU or build cannot run precision='bf16x3' (AMX), or None."""
    from fastvgg import _core

    if not hasattr(_core.testing, "amx_unavailable_reason"):
        return "this build has no AMX kernels"
    return _core.testing.amx_unavailable_reason() or None


def installed(name: str) -> bool:
    import importlib.util

    if name == "fastvgg bf16x3":
        return amx_unavailable() is None
    if name == "fastvgg bf16":
        return bf16_unavailable() is None
    if name == "fastvgg bf16 int14":
        # The AVX512_BF16 set (int14 Winograd) as a contender of its own where it is not the
        # default, i.e. where the AMX set runs precision='bf16'.
        return bf16_unavailable() is None and bf16_sets()[:1] != ["avx512_bf16"] and "avx512_bf16" in bf16_sets()
    return all(importlib.util.find_spec(m) is not None for m in PEER_MODULES.get(name, ()))


def skip_reason(name: str) -> str:
    """A contender left out of the run, and why: fastvgg bf16 needs CPU features, a peer its package."""
    if name == "fastvgg bf16":
        return f"{name} ({bf16_unavailable()})"
    if name == "fastvgg bf16x3":
        return f"{name} ({amx_unavailable()})"
    if name == "fastvgg bf16 int14":
        return f"{name} ({bf16_unavailable() or 'it is what fastvgg bf16 runs here'})"
    return f"{name} (not installed)"


def failure_reason(error: BaseException) -> str:
    """One table-safe line: the exception's type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}".replace("|", "/")


def make_contenders(keras_model, h5_path, onnx_path, include_top, input_shape, threads, names, failed):
    """{name: run} for every contender that could be built; the others go to failed[name] with
    the reason (a peer that cannot load the model must not end the run)."""
    import fastvgg

    arch = "vgg19" if len([l for l in keras_model.layers if type(l).__name__ == "Conv2D"]) == 16 else "vgg16"
    build = fastvgg.VGG19 if arch == "vgg19" else fastvgg.VGG16
    layers = keras_layers(keras_model)
    runners = {}
    for name in names:
        if name in failed:
            continue
        try:
            runners[name] = _make_runner(name, build, layers, keras_model, h5_path, onnx_path, include_top,
                                         input_shape, threads)
        except Exception as error:  # noqa: BLE001 - any failure of a peer is reported, not fatal
            failed[name] = failure_reason(error)
            print(f"{name}: skipped, {failed[name]}", flush=True)
    return runners


def _make_runner(name, build, layers, keras_model, h5_path, onnx_path, include_top, input_shape, threads):
    import tensorflow as tf

    if name.startswith("fastvgg"):
        precision = {"fastvgg": "fast", "fastvgg bf16x3": "bf16x3"}.get(name, "bf16")
        # FASTVGG_BF16_KERNELS is read when the model's executor is made.
        previous = os.environ.get("FASTVGG_BF16_KERNELS")
        if name == "fastvgg bf16 int14":
            os.environ["FASTVGG_BF16_KERNELS"] = "avx512_bf16"
        try:
            ours = build(h5_path, include_top=include_top, input_shape=input_shape, precision=precision,
                         packed_cache=False)
        finally:
            if name == "fastvgg bf16 int14":
                if previous is None:
                    del os.environ["FASTVGG_BF16_KERNELS"]
                else:
                    os.environ["FASTVGG_BF16_KERNELS"] = previous
        return lambda x, m=ours: m.predict(x, batch_size=len(x))
    if name == "keras predict":
        return lambda x: keras_model.predict(x, batch_size=len(x), verbose=0)
    if name == "keras tf.function":
        call = tf.function(lambda x: keras_model(x, training=False))
        return lambda x, c=call: c(x).numpy()
    if name == "onnxruntime":
        return onnxruntime_runner(onnx_path, threads)
    if name.startswith("openvino"):
        return openvino_runner(onnx_path, threads, f32=name.endswith("f32"))
    if name == "torch":
        return torch_runner(build_torch(layers, include_top))
    raise ValueError(f"unknown contender {name!r}")


# ---------------------------------------------------------------- timing


def timed_rounds(runs, x, repeats: int, budget_s: float) -> dict:
    """{name: [seconds of each timed call]} for the contenders in `runs` (already warmed up),
    measured side by side: round after round, each contender makes one untimed call (its caches
    and thread pool back after the others ran) and one timed call, starting each round one
    contender further on. A slow drift of the machine (a neighbour's load, memory bandwidth that
    comes and goes) then reaches every contender alike instead of whichever ran in the slow
    minute. At least min(3, repeats) rounds, then more up to `repeats` while the time spent stays
    within budget_s per contender. A contender whose call raises is dropped from the later
    rounds, with its error as its value."""
    seconds = {name: [] for name in runs}
    if not runs:
        return seconds
    started = time.perf_counter()
    rounds = 0
    while rounds < repeats and (rounds < min(3, repeats) or time.perf_counter() - started < budget_s * len(runs)):
        order = list(runs)
        order = order[rounds % len(order):] + order[:rounds % len(order)]  # no one always runs after the same peer
        for name in order:
            run = runs[name]
            if isinstance(seconds[name], BaseException):
                continue
            try:
                run(x)
                t = time.perf_counter()
                run(x)
                seconds[name].append(time.perf_counter() - t)
            except Exception as error:  # noqa: BLE001 - reported by the caller, the others go on
                seconds[name] = error
        rounds += 1
    return seconds


def agreement(out, ref, include_top: bool) -> str:
    import numpy as np

    if include_top:
        top5 = lambda p: [set(row) for row in np.argsort(-p, axis=1)[:, :5]]
        same = sum(a == b for a, b in zip(top5(out), top5(ref)))
        return f"max abs {np.abs(out - ref).max():.1e}, top-5 same {same}/{len(ref)}"
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    return f"rel L2 {rel:.1e}"


def compare(title, keras_model, h5_path, onnx_path, include_top, input_shape, batches, threads, repeats, budget, names, lines,
            failed, medians):
    """failed: {contender: reason} of peers that could not be built or run (grows here);
    medians[(title, batch, contender)] = seconds per image (filled here)."""
    import numpy as np

    failed = dict(failed)  # a peer that fails on one model may still load the next
    runners = make_contenders(keras_model, h5_path, onnx_path, include_top, input_shape, threads, names, failed)
    rng = np.random.default_rng(0)
    lines += [f"### {title}", "",
              "| contender | batch | ms/image median | min-max | images/s | time / fastvgg | agreement with Keras |",
              "|---|---|---|---|---|---|---|"]
    for batch in batches:
        # Preprocessed-image range (caffe mode: BGR minus the ImageNet mean).
        x = rng.uniform(-124, 152, (batch,) + input_shape).astype(np.float32)
        reference = keras_model.predict(x, batch_size=batch, verbose=0)
        checks, live = {}, {}
        for name in names:  # warm-up (allocation, pools, tracing, compilation); agreement on its output
            if name in failed:
                continue
            try:
                checks[name] = agreement(np.asarray(runners[name](x)), reference, include_top)
                live[name] = runners[name]
            except Exception as error:  # noqa: BLE001 - report the peer and go on with the others
                failed[name] = failure_reason(error)
        seconds = timed_rounds(live, x, repeats.get(batch, 3), budget)
        base = None
        for name in names:
            if isinstance(seconds.get(name), BaseException):
                failed[name] = failure_reason(seconds[name])
            if name in failed:
                row = f"| {name} | {batch} | skipped: {failed[name]} | | | | |"
            else:
                per_image = [s / batch for s in seconds[name]]
                median = statistics.median(per_image)
                base = base or median
                medians[(title, batch, name)] = median
                row = (f"| {name} | {batch} | {median * 1e3:.1f} | {min(per_image) * 1e3:.1f}-{max(per_image) * 1e3:.1f} "
                       f"| {1 / median:.2f} | {median / base:.2f}x | {checks[name]} |")
            lines.append(row)
            print(row, flush=True)
    lines.append("")


FP32_PEERS = ("onnxruntime", "openvino f32", "torch", "keras predict", "keras tf.function")


def goals(medians, lines):
    """The speed goals as ratios of this run's medians: fastvgg fp32 against the fastest fp32
    peer (at most 0.4 at batch 1, a third at batch 32) and fastvgg bf16 against OpenVINO's
    default precision (at most half)."""
    lines += ["### Against the goals (ratios of this run's medians; lower is faster)", "",
              "| model | batch | fastvgg fp32 / fastest fp32 peer | goal | fastvgg bf16 / OpenVINO default | goal "
              "| fastvgg bf16x3 / fastest fp32 peer |",
              "|---|---|---|---|---|---|---|"]
    for title, batch in dict.fromkeys((t, b) for t, b, _ in medians):
        get = lambda name: medians.get((title, batch, name))
        peers = {name: get(name) for name in FP32_PEERS if get(name)}
        fp32_goal = {1: "0.40", 32: "0.33"}.get(batch, "") if title.startswith("VGG16, 224") else ""
        if get("fastvgg") and peers:
            fastest = min(peers, key=peers.get)
            fp32 = f"{get('fastvgg') / peers[fastest]:.2f} ({fastest})"
        else:
            fp32 = "n/a"
        bf16 = f"{get('fastvgg bf16') / get('openvino default'):.2f}" if get("fastvgg bf16") and get("openvino default") else "n/a"
        x3 = f"{get('fastvgg bf16x3') / peers[fastest]:.2f}" if get("fastvgg bf16x3") and get("fastvgg") and peers else "n/a"
        lines.append(f"| {title} | {batch} | {fp32} | {fp32_goal} | {bf16} | 0.50 | {x3} |")
    lines.append("")


# ---------------------------------------------------------------- fastvgg per layer

VGG16_CONVS = [(224, 3, 64), (224, 64, 64), (112, 64, 128), (112, 128, 128), (56, 128, 256), (56, 256, 256),
               (56, 256, 256), (28, 256, 512), (28, 512, 512), (28, 512, 512), (14, 512, 512), (14, 512, 512),
               (14, 512, 512)]
CONV_NAMES = ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2", "block3_conv1", "block3_conv2",
              "block3_conv3", "block4_conv1", "block4_conv2", "block4_conv3", "block5_conv1", "block5_conv2",
              "block5_conv3"]
DENSES = [("fc1", 25088, 4096, "relu"), ("fc2", 4096, 4096, "relu"), ("predictions", 4096, 1000, "softmax")]


def fma_peak(core, threads: int, quick: bool):
    if not hasattr(core.testing, "fma_peak_gflops"):
        return None  # an extension built before csrc/fma_peak.cpp
    iterations = 5_000_000 if quick else 30_000_000
    return max(core.testing.fma_peak_gflops(threads, iterations) for _ in range(3))


def bf16_dot_peak(core, threads: int, quick: bool):
    """Measured vdpbf16ps GFLOP/s, or None where the CPU or the build has no bf16 kernels."""
    if not hasattr(core.testing, "bf16_dot_peak_gflops") or core.testing.bf16_unavailable_reason():
        return None
    iterations = 5_000_000 if quick else 30_000_000
    return max(core.testing.bf16_dot_peak_gflops(threads, iterations) for _ in range(3))


def amx_peak(core, threads: int, quick: bool):
    """Measured TDPBF16PS GFLOP/s, or None where the CPU or the build has no AMX kernels."""
    if not hasattr(core.testing, "amx_bf16_peak_gflops") or core.testing.amx_unavailable_reason():
        return None
    iterations = 300_000 if quick else 2_000_000
    return max(core.testing.amx_bf16_peak_gflops(threads, iterations) for _ in range(3))


def stream_read_gbps(threads: int) -> tuple:
    """A streaming read measured two ways: numpy sum (one thread) and BLAS sgemv over an
    fc1-sized matrix (`threads` threads, the dense layer's own access pattern)."""
    import numpy as np

    w = np.random.default_rng(1).standard_normal((25088, 4096), dtype=np.float32)
    v = np.ones(25088, np.float32)
    results = []
    for fn in (lambda: w.sum(), lambda: v @ w):
        results.append(w.nbytes / min(_best(fn, 7)) / 1e9)
    return tuple(results)


def _best(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def per_layer(threads: int, quick: bool, lines):
    import numpy as np

    from fastvgg import _core

    isa = _core.active_isa()
    repeats = 3 if quick else 11
    peaks = {t: fma_peak(_core, t, quick) for t in sorted({1, threads})}
    bf16_peak = bf16_dot_peak(_core, threads, quick)
    tile_peak = amx_peak(_core, threads, quick)
    amx_missing = None if tile_peak else (_core.testing.amx_unavailable_reason()
                                          if hasattr(_core.testing, "amx_unavailable_reason")
                                          else "not in this build of the extension")
    bf16_missing = None if bf16_peak else (_core.testing.bf16_unavailable_reason()
                                           if hasattr(_core.testing, "bf16_unavailable_reason")
                                           else "not in this build of the extension")
    rng = np.random.default_rng(0)
    lines += ["### fastvgg per layer (VGG16, batch 1, 224x224)", "",
              f"Measured fp32 FMA peak ({isa}, csrc/fma_peak.cpp): "
              + (", ".join(f"{p:.0f} GFLOP/s on {t} thread{'s' * (t > 1)}" for t, p in peaks.items())
                 if peaks[threads] else "not in this build of the extension (rebuild fastvgg)") + ".",
              f"Measured bf16 dot-product peak (vdpbf16ps, csrc/bf16/dot_peak_bf16.cpp): "
              + (f"{bf16_peak:.0f} GFLOP/s on {threads} thread{'s' * (threads > 1)}." if bf16_peak
                 else f"n/a ({bf16_missing})."),
              f"Measured AMX bf16 peak (TDPBF16PS, csrc/bf16/dot_peak_bf16.cpp): "
              + (f"{tile_peak:.0f} GFLOP/s on {threads} thread{'s' * (threads > 1)}." if tile_peak
                 else f"n/a ({amx_missing})."), "",
              "Effective GFLOP/s count direct-convolution FLOPs (2·H·W·Cin·Cout·9) whatever the algorithm, "
              "so Winograd layers can pass the peak. The bf16 columns time the bf16 kernel set's direct "
              "convolution (vdpbf16ps) on the same layer, % of the bf16 peak; int14: its Winograd F(4x4) with "
              "int14 products (vpdpwssd, the same peak). AMX: the AMX set's direct convolution (TDPBF16PS, "
              "activations as bf16 hi + lo, so twice the products: % of the AMX peak counts them both). "
              "bf16x3: the AMX convolution of precision='bf16x3' (activations and weights as hi + lo, three products; "
              "% of the AMX peak counts all three; block1_conv1 there runs the fp32 direct kernel, as in a model).", "",
              f"| layer | algorithm | ms ({threads}T) | GFLOP/s | % of peak | ms (1T) | {threads}T/1T speedup "
              f"| bf16 direct ms ({threads}T) | bf16 GFLOP/s | % of bf16 peak | int14 winograd ms ({threads}T) | int14 GFLOP/s "
              f"| AMX ms ({threads}T) | AMX GFLOP/s | % of AMX peak | bf16x3 ms ({threads}T) | % of AMX peak |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    total = {1: 0.0, threads: 0.0}
    bf16_total = int14_total = amx_total = x3_total = 0.0
    for name, (size, cin, cout) in zip(CONV_NAMES, VGG16_CONVS):
        x = np.maximum(rng.standard_normal((1, size, size, cin)), 0).astype(np.float32)
        kernel = (rng.standard_normal((3, 3, cin, cout)) * np.sqrt(2.0 / (9 * (cin + cout)))).astype(np.float32)
        bias = np.zeros(cout, np.float32)
        algorithm = "winograd" if cin >= 16 else "direct"  # what precision="fast" picks
        flop = 2.0 * size * size * cin * cout * 9
        ms = {}
        for t in total:
            _core.set_num_threads(t)
            ms[t] = _core.testing.time_conv3x3(x, kernel, bias, algorithm, isa, repeats)
            total[t] += ms[t]
        gflops = flop / ms[threads] / 1e9
        pct = f"{100 * gflops / peaks[threads]:.0f}%" if peaks[threads] else "n/a"
        bf16_cells = "n/a | n/a | n/a | n/a | n/a"
        if bf16_peak:
            bf16_s = _core.testing.time_conv3x3_bf16(x, kernel, bias, repeats, "direct")  # threads: still `threads`
            int14_s = _core.testing.time_conv3x3_bf16(x, kernel, bias, repeats, "winograd_int14")
            bf16_total += bf16_s
            int14_total += int14_s
            bf16_gflops = flop / bf16_s / 1e9
            bf16_cells = (f"{bf16_s * 1e3:.2f} | {bf16_gflops:.0f} | {100 * bf16_gflops / bf16_peak:.0f}% "
                          f"| {int14_s * 1e3:.2f} | {flop / int14_s / 1e9:.0f}")
        amx_cells = "n/a | n/a | n/a | n/a | n/a"
        if tile_peak:
            amx_s = _core.testing.time_conv3x3_bf16(x, kernel, bias, repeats, "amx")
            amx_total += amx_s
            amx_cells = f"{amx_s * 1e3:.2f} | {flop / amx_s / 1e9:.0f} | {100 * 2 * flop / amx_s / 1e9 / tile_peak:.0f}%"
            if algorithm == "direct":  # bf16x3 keeps the fp32 direct kernel on the first layer
                x3_s, x3_pct = ms[threads], "(fp32)"
            else:
                x3_s = _core.testing.time_conv3x3_bf16(x, kernel, bias, repeats, "amx_x3")
                x3_pct = f"{100 * 3 * flop / x3_s / 1e9 / tile_peak:.0f}%"
            x3_total += x3_s
            amx_cells += f" | {x3_s * 1e3:.2f} | {x3_pct}"
        lines.append(f"| {name} | {algorithm} | {ms[threads] * 1e3:.2f} | {gflops:.0f} | {pct} | {ms[1] * 1e3:.2f} "
                     f"| {ms[1] / ms[threads]:.2f} | {bf16_cells} | {amx_cells} |")
    bf16_sum = f"{bf16_total * 1e3:.1f} | | | {int14_total * 1e3:.1f} |" if bf16_peak else "n/a | | | n/a |"
    amx_sum = f"{amx_total * 1e3:.1f} | | | {x3_total * 1e3:.1f} |" if tile_peak else "n/a | | | n/a |"
    lines.append(f"| all convs | | {total[threads] * 1e3:.1f} | | | {total[1] * 1e3:.1f} | {total[1] / total[threads]:.2f} "
                 f"| {bf16_sum} | {amx_sum} |")
    _core.set_num_threads(threads)

    sum_gbps, gemv_gbps = stream_read_gbps(threads)
    lines += ["", f"Measured streaming read of a 411 MB float32 matrix: numpy sum (1 thread) {sum_gbps:.1f} GB/s, "
              f"numpy/BLAS sgemv ({threads} threads) {gemv_gbps:.1f} GB/s.", "",
              f"| dense layer | weights MB | ms ({threads}T, batch 1) | GB/s | bf16 weights MB | bf16 ms | bf16 GB/s |",
              "|---|---|---|---|---|---|---|"]
    for name, depth, units, act in DENSES:
        kernel = (rng.standard_normal((depth, units), dtype=np.float32) * np.float32(0.01))
        graph = _core.Graph(depth)
        graph.add_flatten()
        index = graph.add_dense(depth, units, act)
        network = _core.CpuExecutor(graph)
        network.set_dense_kernel_rows(index, 0, kernel)
        network.set_dense_bias(index, np.zeros(units, np.float32))
        x = rng.standard_normal((1, 1, 1, depth)).astype(np.float32)
        seconds = min(_best(lambda: network.forward(x, [index]), repeats * 2))
        del network
        nbytes = depth * units * 4
        bf16_cells = "n/a | n/a | n/a"
        if bf16_peak:
            bf16_s = _core.testing.time_dense_bf16(x.reshape(1, depth), kernel, np.zeros(units, np.float32), repeats * 2)
            bf16_cells = f"{nbytes / 2e6:.0f} | {bf16_s * 1e3:.2f} | {nbytes / 2 / bf16_s / 1e9:.1f}"
        lines.append(f"| {name} | {nbytes / 1e6:.0f} | {seconds * 1e3:.2f} | {nbytes / seconds / 1e9:.1f} | {bf16_cells} |")
    lines.append("")


# ---------------------------------------------------------------- load time and peak memory


def child(name: str, model_dir: str, threads: int) -> None:
    """Fresh process: import, load VGG16, predict one image; prints JSON."""
    started = time.perf_counter()
    import numpy as np

    h5, onnx_path, torch_path = (os.path.join(model_dir, f) for f in ("vgg16.h5", "vgg16.onnx", "vgg16_torch.pt"))
    if name.startswith("fastvgg"):
        import fastvgg
    elif name.startswith("keras"):
        import keras
    elif name == "onnxruntime":
        import onnxruntime  # noqa: F401
    elif name.startswith("openvino"):
        import openvino  # noqa: F401
    elif name == "torch":
        import torch
    imported = time.perf_counter()
    if name.startswith("fastvgg"):
        # "fastvgg" and the bf16 ones unpack the .h5 file; "fastvgg cached" maps the packed
        # cache that an earlier process wrote (FASTVGG_PACKED_CACHE, set by the parent);
        # "fastvgg bf16 int14" runs the AVX512_BF16 set (FASTVGG_BF16_KERNELS, set by the parent).
        precision = {"fastvgg": "fast", "fastvgg cached": "fast", "fastvgg bf16x3": "bf16x3"}.get(name, "bf16")
        cache = os.environ["FASTVGG_PACKED_CACHE"] if name == "fastvgg cached" else False
        run = lambda x, m=fastvgg.VGG16(h5, precision=precision, packed_cache=cache): m.predict(x, batch_size=1)
    elif name.startswith("keras"):
        model = keras.models.load_model(h5, compile=False)
        run = lambda x: model.predict(x, verbose=0)
    elif name == "onnxruntime":
        run = onnxruntime_runner(onnx_path, threads)
    elif name.startswith("openvino"):
        run = openvino_runner(onnx_path, threads, f32=name.endswith("f32"))
    else:
        model = torch.jit.load(torch_path)
        run = torch_runner(model)
    x = np.random.default_rng(0).uniform(-124, 152, (1, 224, 224, 3)).astype(np.float32)
    loaded = time.perf_counter()
    run(x)  # OpenVINO compiles here, on the first shape it sees
    ready = time.perf_counter()
    # Not ru_maxrss: Linux carries it across fork+exec, so a child would report the parent's
    # peak. VmHWM belongs to this address space, which exec started afresh.
    with open("/proc/self/status") as status:
        hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"import_s": imported - started, "load_s": loaded - imported, "first_predict_s": ready - loaded,
                      "peak_rss_mb": hwm_kb / 1024}))


# One fresh process per sample: on a shared VM a single load can take twice the usual time
# (first touches of fresh memory), so each figure is the median of this many processes.
LOAD_SAMPLES = 3


def load_and_memory(names, model_dir, threads, lines):
    lines += ["### Load time and peak memory (VGG16, each in a fresh subprocess, warm page cache)", "",
              "fastvgg and Keras read the .h5 file; ONNX Runtime and OpenVINO the .onnx file built from it; "
              "PyTorch a TorchScript (traced) copy of the nn.Sequential. Load: from file to model object; first predict: one "
              "224x224 image (OpenVINO compiles here). Peak RSS: VmHWM of the whole process (ru_maxrss would include the parent's, inherited across exec). "
              f"Each figure is the median of {LOAD_SAMPLES} fresh processes; the load + first predict column also gives their min-max.", "",
              "| contender | import s | load s | first predict s | load + first predict s | peak RSS MB |",
              "|---|---|---|---|---|---|"]
    cache_dir = os.path.join(model_dir, "packed-cache")
    rows = names[:1] + ["fastvgg cached"] + names[1:]
    for name in rows:
        if name == "keras tf.function":
            continue  # same process footprint as keras predict
        env = os.environ.copy()
        if name == "fastvgg bf16 int14":
            env["FASTVGG_BF16_KERNELS"] = "avx512_bf16"
        if name == "fastvgg cached":
            env["FASTVGG_PACKED_CACHE"] = cache_dir
            # The first process writes the cache file; the timed ones map it.
            subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--model-dir", model_dir,
                            "--threads", str(threads)], capture_output=True, text=True, env=env)
        samples = []
        for _ in range(LOAD_SAMPLES):
            # The page cache is warm: the parent just wrote the files and imported the libraries.
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--model-dir", model_dir,
                                   "--threads", str(threads)], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                break
            samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if len(samples) < LOAD_SAMPLES:
            last_line = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            lines.append(f"| {name} | failed: {last_line[:120].replace('|', '/')} | | | | |")
            continue
        median = {key: statistics.median(r[key] for r in samples) for key in samples[0]}
        ready = [r["load_s"] + r["first_predict_s"] for r in samples]
        label = {"keras predict": "keras", "fastvgg cached": "fastvgg, packed cache warm"}.get(name, name)
        lines.append(f"| {label} | {median['import_s']:.2f} | {median['load_s']:.2f} | {median['first_predict_s']:.2f} "
                     f"| {statistics.median(ready):.2f} ({min(ready):.2f}-{max(ready):.2f}) | {median['peak_rss_mb']:.0f} |")
        print(lines[-1], flush=True)
    lines.append("")


# ---------------------------------------------------------------- machine


def machine(threads, names, missing):
    import numpy as np

    import fastvgg

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    versions = {"fastvgg": fastvgg.__version__, "numpy": np.__version__}
    for module in ("tensorflow", "keras", "onnx", "onnxruntime", "openvino", "torch"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    return ["# fastvgg benchmark", "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- CPU: {cpu}, {os.cpu_count()} logical cores visible, this process may use {len(os.sched_getaffinity(0))}",
            f"- fastvgg kernels: {fastvgg._core.active_isa()} (available: {', '.join(fastvgg._core.available_isas())})",
            f"- threads: {threads} for every contender (intra-op; OMP/MKL/OpenBLAS env set before import)",
            f"- Python {platform.python_version()}; " + ", ".join(f"{k} {v}" for k, v in versions.items()),
            f"- contenders: {', '.join(names)}" + (f"; skipped: {'; '.join(map(skip_reason, missing))}" if missing else ""),
            "- weights: Keras `applications.VGG16/VGG19(weights=None)` after `keras.utils.set_random_seed(0)`, saved "
            "to .h5 (fastvgg loads it) and converted to ONNX (onnx.helper) and PyTorch (nn.Sequential).",
            "- inputs: uniform in [-124, 152) (the range of caffe-preprocessed images), seeded; the same arrays for all.",
            ""]


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 1 only, few repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(HERE, "results.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    pin_threads(args.threads)
    if args.child:
        child(args.child, args.model_dir, args.threads)
        return 0

    began = time.perf_counter()
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import fastvgg

    fastvgg.set_num_threads(args.threads)
    names = [n for n in PEERS if installed(n)]
    missing = [n for n in PEERS if n not in names]
    if "torch" in names:
        import torch

        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
    lines = machine(args.threads, names, missing)
    print("\n".join(lines), flush=True)
    batches = [1] if args.quick else [1, 8, 32]
    repeats = {1: 5, 8: 3, 32: 3} if args.quick else {1: 9, 8: 3, 32: 2}  # ~12 min on 2 cores
    budget = 5.0 if args.quick else 20.0
    onnx_wanted = any(n in names for n in ONNX_PEERS)

    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        lines.append("## Speed and agreement\n")
        for arch, include_top, shape, sizes in (("VGG16", True, (224, 224, 3), batches),
                                               ("VGG16", False, (480, 640, 3), [1]),
                                               ("VGG19", True, (224, 224, 3), [1])):
            keras.utils.set_random_seed(0)
            kmodel = getattr(keras.applications, arch)(weights=None, include_top=include_top, input_shape=shape)
            stem = os.path.join(tmp, f"{arch.lower()}{'' if include_top else '_notop'}")
            kmodel.save(stem + ".h5")  # Keras 3 writes the legacy HDF5 layout fastvgg reads
            failed = {}
            if onnx_wanted:
                try:
                    build_onnx(keras_layers(kmodel), include_top, stem + ".onnx")
                except Exception as error:  # noqa: BLE001 - the ONNX peers are skipped, the rest go on
                    failed.update({n: "ONNX export failed, " + failure_reason(error) for n in ONNX_PEERS})
            if arch == "VGG16" and include_top and "torch" in names:
                with torch.no_grad():  # TorchScript: a module file that loads without this script's classes
                    example = torch.zeros(1, 3, 224, 224).to(memory_format=torch.channels_last)
                    torch.jit.save(torch.jit.trace(build_torch(keras_layers(kmodel), True), example), stem + "_torch.pt")
            title = f"{arch}, {'224x224 with the top (softmax)' if include_top else '480x640 without the top (block5_pool)'}"
            print(f"\n{title}", flush=True)
            compare(title, kmodel, stem + ".h5", stem + ".onnx", include_top, shape, sizes, args.threads, repeats,
                    budget, names, lines, failed, medians)
        goals(medians, lines)
        lines.append("## fastvgg in detail\n")
        per_layer(args.threads, args.quick, lines)
        load_and_memory(names, tmp, args.threads, lines)
    lines.append(f"Run took {time.perf_counter() - began:.0f} s ({'--quick' if args.quick else 'full run'}).")
    report = "\n".join(lines) + "\n"
    print(report)
    with open(args.output, "w") as f:
        f.write(report)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
