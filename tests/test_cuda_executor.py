"""The CUDA executor on a whole small VGG-shaped network, on the emulator (always) and on a
GPU (``pytest -m gpu``): every layer's output against float64 numpy applied to the previous
layer's output (so each layer is held to its own rounding bound), the whole network against
the CPU core, the fused pool against the unfused one, batches, threads, and bad input.
"""

import threading

import numpy as np
import pytest

from cuda_backends import backend  # noqa: F401 (a fixture)
from fastvgg import _core
from kernel_checks import assert_within, conv3x3_float64, gamma, random_array

# A VGG-shaped graph (as _core.Graph.describe() will list it): 3 input channels, a 'valid'
# convolution as fine-tuned models have, both pools, flatten, ReLU and softmax dense layers.
SMALL_VGG = [
    {"kind": "conv3x3", "out_channels": 8, "activation": "relu"},
    {"kind": "conv3x3", "out_channels": 8, "activation": "relu"},
    {"kind": "max_pool2x2"},
    {"kind": "conv3x3", "out_channels": 17, "activation": "relu", "padding": "valid"},
    {"kind": "conv3x3", "out_channels": 16, "activation": "linear"},
    {"kind": "max_pool2x2"},
    {"kind": "flatten"},
    {"kind": "dense", "in_channels": 2 * 3 * 16, "out_channels": 70, "activation": "relu"},
    {"kind": "dense", "in_channels": 70, "out_channels": 10, "activation": "softmax"},
]
HEIGHT, WIDTH = 14, 17  # -> 14x17, 14x17, 7x8, 5x6, 5x6, 2x3
GLOBAL_POOLED = [
    {"kind": "conv3x3", "out_channels": 20, "activation": "relu"},
    {"kind": "max_pool2x2"},
    {"kind": "global_pool", "pool_mode": "max"},
    {"kind": "dense", "in_channels": 20, "out_channels": 3, "activation": "linear"},
]


def loaded_executor(module, ops, input_channels=3, seed=0):
    executor = module.CudaExecutor(ops, input_channels)
    rng = np.random.default_rng(seed)
    weights = {}
    channels = input_channels
    for index, op in enumerate(ops):
        if op["kind"] == "conv3x3":
            kernel = random_array(rng, (3, 3, channels, op["out_channels"])) / np.float32(3 * np.sqrt(channels))
            bias = random_array(rng, (op["out_channels"],)) * np.float32(0.1)
            executor.set_conv3x3_weights(index, kernel, bias)
            channels = op["out_channels"]
        elif op["kind"] == "dense":
            kernel = random_array(rng, (op["in_channels"], op["out_channels"])) / np.float32(np.sqrt(op["in_channels"]))
            bias = random_array(rng, (op["out_channels"],)) * np.float32(0.1)
            half = op["in_channels"] // 2  # in two slices, as the loader sends large kernels
            executor.set_dense_kernel_rows(index, 0, kernel[:half])
            executor.set_dense_kernel_rows(index, half, kernel[half:])
            executor.set_dense_bias(index, bias)
        else:
            continue
        weights[index] = (kernel, bias)
    return executor, weights


def layer_in_float64(op, x, weights):
    """(pre-activation, output, bound on the output's error) of one op on x, in float64."""
    x64 = x.astype(np.float64)
    if op["kind"] == "conv3x3":
        kernel, bias = weights
        pre = conv3x3_float64(x, kernel, bias)
        magnitude = conv3x3_float64(np.abs(x), np.abs(kernel), np.abs(bias))
        if op.get("padding") == "valid":
            pre, magnitude = pre[:, 1:-1, 1:-1], magnitude[:, 1:-1, 1:-1]
        bound = gamma(9 * x.shape[3] + 1) * magnitude
        return pre, (np.maximum(pre, 0) if op["activation"] == "relu" else pre), bound
    if op["kind"] == "max_pool2x2":
        n, h, w, c = x.shape
        out = x64[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
        return out, out, np.zeros_like(out)
    if op["kind"] == "flatten":
        out = x64.reshape(len(x), -1)
        return out, out, np.zeros_like(out)
    if op["kind"] == "global_pool":
        out = x64.max(axis=(1, 2)) if op["pool_mode"] == "max" else x64.mean(axis=(1, 2))
        return out, out, gamma(x.shape[1] * x.shape[2] + 4) * np.abs(x64).max(axis=(1, 2))
    kernel, bias = weights
    pre = x64 @ kernel + bias
    bound = gamma(x.shape[1] + 2 + (x.shape[1] + 255) // 256) * (np.abs(x64) @ np.abs(kernel) + np.abs(bias))
    if op["activation"] == "softmax":
        e = np.exp(pre - pre.max(axis=1, keepdims=True))
        out = e / e.sum(axis=1, keepdims=True)
        # softmax moves by at most 2 * max|logit error| (relative), plus its own roundings.
        return pre, out, out * (2 * bound.max(axis=1, keepdims=True) + gamma(pre.shape[1] + 6) * 30)
    return pre, (np.maximum(pre, 0) if op["activation"] == "relu" else pre), bound


@pytest.mark.parametrize("count", [1, 3, 6])  # batches of up to 4 take the bandwidth-bound dense path
def test_every_layer_against_float64(backend, count):
    executor, weights = loaded_executor(backend, SMALL_VGG)
    x = random_array(np.random.default_rng(count), (count, HEIGHT, WIDTH, 3))
    layers = list(range(len(SMALL_VGG)))
    weighted = [i for i, op in enumerate(SMALL_VGG) if op["kind"] in ("conv3x3", "dense")]
    outputs = executor.forward(x, layers + weighted, [False] * len(layers) + [True] * len(weighted))
    after, before = outputs[: len(layers)], dict(zip(weighted, outputs[len(layers) :]))
    assert [o.shape[1:] for o in after] == executor.output_shapes(HEIGHT, WIDTH)
    previous = x
    for index, op in enumerate(SMALL_VGG):
        pre, out, bound = layer_in_float64(op, previous, weights.get(index))
        assert_within(after[index], out, bound, f"op {index} ({op['kind']}), batch {count}")
        if index in before:
            pre_bound = bound if op["kind"] == "conv3x3" else gamma(op["in_channels"] + 4) * np.abs(pre) + bound
            assert_within(before[index], pre, pre_bound, f"op {index} before its activation")
        previous = after[index]
    np.testing.assert_allclose(after[-1].sum(axis=1), 1, rtol=1e-6)


def test_fused_pool_equals_the_unfused_pool(backend):
    """Asking for a pool's output alone fuses it into the convolution; asking for the
    convolution's output too keeps them apart. Both give the same bits."""
    executor, _ = loaded_executor(backend, SMALL_VGG)
    x = random_array(np.random.default_rng(5), (2, HEIGHT, WIDTH, 3))
    fused = executor.forward(x, [2, 5, 8])
    unfused = executor.forward(x, [1, 2, 4, 5, 8])
    for a, b in zip(fused, [unfused[1], unfused[3], unfused[4]]):
        np.testing.assert_array_equal(a, b)


def test_whole_network_against_the_cpu_core(backend):
    ops = [op for op in SMALL_VGG if op.get("padding") != "valid"]  # the CPU core has 'same' only
    ops[6] = dict(ops[6], in_channels=3 * 4 * 16)  # flatten of 3x4x16: 14x17 -> 7x8 -> 3x4
    executor, weights = loaded_executor(backend, ops)
    graph = _core.Graph(3)
    for op in ops:
        if op["kind"] == "conv3x3":
            graph.add_conv3x3(op["out_channels"], op["activation"])
        elif op["kind"] == "max_pool2x2":
            graph.add_max_pool2x2()
        elif op["kind"] == "flatten":
            graph.add_flatten()
        else:
            graph.add_dense(op["in_channels"], op["out_channels"], op["activation"])
    # The CPU graph describes itself as the CUDA executor reads it.
    assert [(d["kind"], d["out_channels"]) for d in graph.describe() if d["kind"] in ("conv3x3", "dense")] == [
        (op["kind"], op["out_channels"]) for op in ops if op["kind"] in ("conv3x3", "dense")
    ]
    network = _core.CpuExecutor(graph, "highest")
    for index, (kernel, bias) in weights.items():
        if ops[index]["kind"] == "conv3x3":
            network.set_conv3x3_weights(index, kernel, bias)
        else:
            network.set_dense_kernel_rows(index, 0, kernel)
            network.set_dense_bias(index, bias)
    x = random_array(np.random.default_rng(6), (5, HEIGHT, WIDTH, 3)) * 50
    features = len(ops) - 3
    gpu = executor.forward(x, [features, len(ops) - 1])
    cpu = network.forward(x, [features, len(ops) - 1])
    for g, c in zip(gpu, cpu):
        assert g.shape == c.shape
        # Different summation orders; the goal on real VGG16 is 1e-4.
        assert np.linalg.norm(g - c) <= 1e-5 * np.linalg.norm(c), np.abs(g - c).max()


def test_built_from_the_cpu_graphs_describe(backend):
    graph = _core.Graph(4)
    graph.add_conv3x3(20, "relu")
    graph.add_max_pool2x2()
    graph.add_global_pool("max")
    graph.add_dense(20, 3, "softmax")
    executor = backend.CudaExecutor(graph.describe(), graph.input_channels)
    assert [tuple(s) for s in executor.output_shapes(9, 11)] == [tuple(s) for s in graph.output_shapes(9, 11)]


def test_updating_holds_other_threads(backend):
    executor, weights = loaded_executor(backend, SMALL_VGG)
    x = random_array(np.random.default_rng(12), (1, HEIGHT, WIDTH, 3))
    before = executor.forward(x, [8])[0]
    kernel, bias = weights[8]  # the softmax layer
    seen = []
    with executor.updating():
        worker = threading.Thread(target=lambda: seen.append(executor.forward(x, [8])[0]))
        worker.start()
        executor.set_dense_kernel_rows(8, 0, kernel * 0)  # the same thread may still call in
        worker.join(timeout=0.5)
        assert worker.is_alive(), "a forward ran in the middle of an update"
        executor.set_dense_bias(8, bias * 0)
        assert executor.weights_loaded(8)
    worker.join()
    # The waiting forward ran after the whole update: zero weights give a uniform softmax.
    np.testing.assert_allclose(seen[0], np.full_like(before, 0.1), rtol=1e-6)
    assert not np.allclose(before, 0.1)


def test_global_pooling_graph(backend):
    executor, weights = loaded_executor(backend, GLOBAL_POOLED, input_channels=4)
    x = random_array(np.random.default_rng(7), (2, 9, 11, 4))
    conv, pooled, globally, dense = executor.forward(x, [0, 1, 2, 3])
    np.testing.assert_array_equal(globally, pooled.max(axis=(1, 2)))
    _, expected, bound = layer_in_float64(GLOBAL_POOLED[3], globally, weights[3])
    assert_within(dense, expected, bound, "dense after a global max pool")


def test_batch_rows_match_single_images(backend):
    executor, _ = loaded_executor(backend, SMALL_VGG)
    x = random_array(np.random.default_rng(8), (6, HEIGHT, WIDTH, 3))
    (batch,) = executor.forward(x, [6])
    for i in range(len(x)):
        (single,) = executor.forward(x[i : i + 1], [6])
        np.testing.assert_array_equal(single[0], batch[i])  # convolutions: the same sums per pixel


def test_forward_into_and_weights(backend):
    executor, weights = loaded_executor(backend, SMALL_VGG)
    x = random_array(np.random.default_rng(9), (2, HEIGHT, WIDTH, 3))
    expected = executor.forward(x, [3, 7], [True, False])
    targets = [np.full((2, 5, 6, 17), np.nan, np.float32), np.full((2, 70), np.nan, np.float32)]
    executor.forward_into(x, [(3, True, targets[0]), (7, False, targets[1])])
    for got, want in zip(targets, expected):
        np.testing.assert_array_equal(got, want)
    for index, (kernel, bias) in weights.items():
        got_kernel, got_bias = executor.get_weights(index)
        np.testing.assert_array_equal(got_kernel, kernel)
        np.testing.assert_array_equal(got_bias, bias)
    assert executor.weights_nbytes() == 4 * sum(k.size + b.size for k, b in weights.values())


def test_threads_share_one_executor(backend):
    executor, _ = loaded_executor(backend, SMALL_VGG)
    images = [random_array(np.random.default_rng(10 + i), (1 + i % 2, HEIGHT, WIDTH, 3)) for i in range(4)]
    expected = [executor.forward(x, [8])[0] for x in images]
    results = {}

    def work(i):
        results[i] = executor.forward(images[i], [8])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_array_equal(results[i], expected[i])


@pytest.mark.parametrize(
    "ops, channels, error, message",
    [
        ([{"kind": "conv5x5", "out_channels": 3}], 3, ValueError, "unsupported kind"),
        ([{"kind": "dense", "in_channels": 3, "out_channels": 2}], 3, ValueError, "flat input"),
        ([{"kind": "conv3x3", "out_channels": 3, "activation": "l2_normalize", "max_inverse_norm": 1.0}], 3, ValueError,
         "l2_normalize is an op of its own"),
        ([{"kind": "conv3x3", "out_channels": 3, "padding": "causal"}], 3, ValueError, "padding"),
        ([{"kind": "conv3x3"}], 3, ValueError, "missing 'out_channels'"),
        ([{"kind": "flatten"}, {"kind": "flatten"}], 3, ValueError, "already flat"),
        ([{"kind": "flatten"}, {"kind": "dense", "in_channels": 3, "out_channels": 5_000_000}], 3, ValueError, "out of range"),
        (["conv3x3"], 3, TypeError, "dict"),
        ([], 0, ValueError, "input_channels"),
    ],
)  # fmt: skip
def test_bad_graphs_raise(backend, ops, channels, error, message):
    with pytest.raises(error, match=message):
        backend.CudaExecutor(ops, channels)


def test_bad_calls_raise(backend):
    executor = backend.CudaExecutor(SMALL_VGG, 3)
    x = np.zeros((1, HEIGHT, WIDTH, 3), np.float32)
    with pytest.raises(RuntimeError, match="no weights loaded"):
        executor.forward(x, [0])
    executor, _ = loaded_executor(backend, SMALL_VGG)
    with pytest.raises(ValueError, match="channels"):
        executor.forward(np.zeros((1, HEIGHT, WIDTH, 4), np.float32), [0])
    with pytest.raises(ValueError, match="input features"):
        executor.forward(np.zeros((1, 20, 20, 3), np.float32), [8])
    with pytest.raises(ValueError, match="too small"):
        executor.forward(np.zeros((1, 3, 3, 3), np.float32), [3])
    with pytest.raises(IndexError):
        executor.forward(x, [9])
    with pytest.raises(ValueError, match="kernel must have shape"):
        executor.set_conv3x3_weights(0, np.zeros((3, 3, 4, 8), np.float32), np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="not a dense layer"):
        executor.set_dense_bias(0, np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="out of range"):
        executor.set_dense_kernel_rows(7, 90, np.zeros((10, 70), np.float32))
    with pytest.raises(ValueError, match="output array"):
        executor.forward_into(x, [(0, False, np.zeros((1, 2, 2, 8), np.float32))])
    with pytest.raises(ValueError, match="overlaps the input"):
        executor.forward_into(x, [(6, False, x.reshape(1, -1)[:, :96])])  # flatten: 2x3x16 features
    shared = np.zeros((1, 80), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        executor.forward_into(x, [(7, False, shared[:, :70]), (7, True, shared[:, :70])])
    with pytest.raises(ValueError, match=r"\(layer_index, before_activation, out_array\)"):
        executor.forward_into(x, [(7, False)])


def test_vgg16_graph_against_the_cpu_model():
    """The real VGG16 graph (13 convolutions, 5 fused pools, fc1/fc2/softmax) at 32x48 on the
    emulator, weights copied from a fastvgg model, against that model on the CPU."""
    import fastvgg
    from cuda_builds import emulated_module
    from fastvgg import cuda as fastvgg_cuda

    model = fastvgg.VGG16(None, seed=0, input_shape=(32, 48, 3), classes=10, precision="highest")
    ops, channels = fastvgg_cuda.describe_model(model)
    executor = emulated_module().CudaExecutor(ops, channels)
    for index, layer in enumerate(model.layers[1:]):
        if layer.weight_shapes():
            kernel, bias = layer.get_weights()
            if ops[index]["kind"] == "conv3x3":
                executor.set_conv3x3_weights(index, kernel, bias)
            else:
                executor.set_dense_kernel_rows(index, 0, kernel)
                executor.set_dense_bias(index, bias)
    x = np.random.default_rng(11).uniform(-120, 140, (2, 32, 48, 3)).astype(np.float32)
    pool5 = [layer.name for layer in model.layers[1:]].index("block5_pool")
    probabilities, features = executor.forward(x, [len(ops) - 1, pool5])
    cpu_features = fastvgg.Model(model.inputs, model.get_layer("block5_pool").output).predict(x)
    assert np.linalg.norm(features - cpu_features) <= 1e-5 * np.linalg.norm(cpu_features)
    assert np.abs(probabilities - model.predict(x)).max() <= 1e-6


def test_a_model_runs_unchanged_on_the_cuda_executor(monkeypatch):
    """fastvgg.cuda.CudaExecutor has what models.py uses of the CPU executor: a model whose
    executor is swapped for it (here over the emulator) predicts, extracts and round-trips its
    weights through the unchanged Model code. This is what device="cuda" will do."""
    import fastvgg
    from cuda_builds import emulated_module
    from fastvgg import cuda as fastvgg_cuda

    monkeypatch.setattr(fastvgg_cuda, "_loaded", True)
    monkeypatch.setattr(fastvgg_cuda, "_module", emulated_module())
    model = fastvgg.VGG16(None, seed=5, input_shape=(32, 32, 3), classes=6, precision="highest")
    x = np.random.default_rng(13).uniform(-120, 140, (3, 32, 32, 3)).astype(np.float32)
    expected = model.predict(x, batch_size=2)
    expected_pool = fastvgg.Model(model.inputs, model.get_layer("block3_pool").output).predict(x)
    weights = [layer.get_weights() for layer in model.layers]

    executor = fastvgg_cuda.CudaExecutor(model._executor.graph, "highest")
    for layer in model.layers:
        layer._executor = executor
    model._executor = executor
    with pytest.raises(RuntimeError, match="no weights loaded"):
        model.predict(x)
    for layer, w in zip(model.layers, weights):
        if w:
            layer.set_weights(w)
    probabilities = model.predict(x, batch_size=2)
    assert np.abs(probabilities - expected).max() <= 1e-6
    pool = fastvgg.Model(model.inputs, model.get_layer("block3_pool").output).predict(x)
    assert np.linalg.norm(pool - expected_pool) <= 1e-5 * np.linalg.norm(expected_pool)
    for layer, w in zip(model.layers, weights):
        for got, want in zip(layer.get_weights(), w):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="not available on the GPU"):
        fastvgg_cuda.CudaExecutor(model._executor.graph, "bf16")
