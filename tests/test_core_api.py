"""The compiled core defends itself: every `_core` entry point checks its arguments and raises
a Python exception for nonsense, whoever calls it. Each case here once reached C++ unchecked
(an int overflow that wrote out of bounds, a division by zero, an uninitialised output, a dense
layer counted as loaded too early)."""

import threading

import numpy as np
import pytest

from fastvgg import _core

from helpers import aligned_copy


def small_graph(input_channels=3):
    graph = _core.Graph(input_channels)
    conv1 = graph.add_conv3x3(16, "relu")
    conv2 = graph.add_conv3x3(20, "relu")
    pool = graph.add_max_pool2x2()
    flatten = graph.add_flatten()
    dense = graph.add_dense(4 * 5 * 20, 7, "softmax")
    return graph, (conv1, conv2, pool, flatten, dense)


def loaded_executor(precision="fast", seed=0):
    graph, (conv1, conv2, pool, flatten, dense) = small_graph()
    executor = _core.CpuExecutor(graph, precision)
    rng = np.random.default_rng(seed)
    executor.set_conv3x3_weights(conv1, rng.standard_normal((3, 3, 3, 16), np.float32) * 0.3, np.zeros(16, np.float32))
    executor.set_conv3x3_weights(conv2, rng.standard_normal((3, 3, 16, 20), np.float32) * 0.1, np.ones(20, np.float32))
    executor.set_dense_kernel_rows(dense, 0, rng.standard_normal((400, 7), np.float32) * 0.05)
    executor.set_dense_bias(dense, rng.standard_normal(7, np.float32))
    return executor, (conv1, conv2, pool, flatten, dense)


def images(count=2, seed=1):
    return np.random.default_rng(seed).standard_normal((count, 8, 10, 3), np.float32)


def test_dense_rows_whose_end_overflows_int_are_refused():
    executor, (*_, dense) = loaded_executor()
    rows = np.zeros((8, 7), np.float32)
    with pytest.raises(ValueError, match="outside the 400 rows"):
        executor.set_dense_kernel_rows(dense, 2**31 - 6, rows)
    with pytest.raises(ValueError, match="outside"):
        executor.set_dense_kernel_rows(dense, -1, rows)
    with pytest.raises(ValueError, match="outside"):
        executor.set_dense_kernel_rows(dense, 2**62, rows)


@pytest.mark.parametrize("shape", [(1, 0, 8, 3), (1, 8, 0, 3), (0, 0, 0, 3)])
def test_empty_images_are_refused_before_any_kernel(shape):
    executor, (conv1, *_) = loaded_executor()
    with pytest.raises(ValueError, match="height and width"):
        executor.forward(np.zeros(shape, np.float32), [conv1])


def test_an_empty_batch_gives_empty_outputs():
    executor, (conv1, *_, dense) = loaded_executor()
    conv, probs = executor.forward(np.zeros((0, 8, 10, 3), np.float32), [conv1, dense])
    assert conv.shape == (0, 8, 10, 16) and probs.shape == (0, 7)


def test_the_same_output_twice_in_one_call_is_refused():
    executor, (conv1, *_) = loaded_executor()
    with pytest.raises(ValueError, match="requested twice"):
        executor.forward(images(), [conv1, conv1])
    # The output before and after the activation are two outputs.
    before, after = executor.forward(images(), [conv1, conv1], [True, False])
    np.testing.assert_array_equal(np.maximum(before, 0), after)


def test_a_dense_layer_is_loaded_only_when_every_row_and_its_bias_arrived():
    graph, (conv1, conv2, pool, flatten, dense) = small_graph()
    executor = _core.CpuExecutor(graph)
    rows = np.ones((400, 7), np.float32)
    executor.set_dense_kernel_rows(dense, 0, rows[:200])
    assert not executor.weights_loaded(dense)
    executor.set_dense_kernel_rows(dense, 300, rows[300:])
    assert not executor.weights_loaded(dense)  # rows 200..299 are still missing
    executor.set_dense_kernel_rows(dense, 200, rows[200:300])
    assert not executor.weights_loaded(dense)  # the bias is missing
    with pytest.raises(RuntimeError, match="no weights loaded"):
        executor.get_weights(dense)
    executor.set_dense_bias(dense, np.zeros(7, np.float32))
    assert executor.weights_loaded(dense)
    kernel, bias = executor.get_weights(dense)
    np.testing.assert_array_equal(kernel, rows)
    with pytest.raises(RuntimeError, match="no weights loaded"):
        executor.forward(images(), [dense])


@pytest.mark.parametrize("index", [-1, 5, 2**40])
def test_layer_indices_out_of_range_raise_index_error(index):
    executor, _ = loaded_executor()
    with pytest.raises(IndexError, match="out of range"):
        executor.get_weights(index)
    with pytest.raises(IndexError, match="out of range"):
        executor.forward(images(), [index])


def test_weights_for_the_wrong_kind_of_layer_are_refused():
    executor, (conv1, conv2, pool, flatten, dense) = loaded_executor()
    with pytest.raises(ValueError, match="not dense"):
        executor.set_dense_bias(conv1, np.zeros(16, np.float32))
    with pytest.raises(ValueError, match="not a 3x3 convolution"):
        executor.set_conv3x3_weights(pool, np.zeros((3, 3, 3, 16), np.float32), np.zeros(16, np.float32))
    with pytest.raises(ValueError, match="has no weights"):
        executor.get_weights(pool)
    with pytest.raises(ValueError, match="kernel has size 4 on axis 2"):
        executor.set_conv3x3_weights(conv1, np.zeros((3, 3, 4, 16), np.float32), np.zeros(16, np.float32))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda g: g.add_dense(10, 10, "relu"), "needs a flatten"),
        (lambda g: (g.add_flatten(), g.add_conv3x3(4, "relu")), "cannot follow"),
        (lambda g: (g.add_flatten(), g.add_flatten()), "already flat"),
        (lambda g: g.add_conv3x3(0, "relu"), "filters must be between"),
        (lambda g: g.add_conv3x3(2**20, "relu"), "filters must be between"),
        (lambda g: g.add_conv3x3(4, "l2_normalize"), "l2_normalize is an op of its own"),
        (lambda g: g.add_conv3x3(4, "sparsemax"), "unknown activation"),
        (lambda g: g.add_global_pool("median"), "unknown pooling mode"),
        (lambda g: g.add_l2_normalize(1e12), "l2_normalize is an op of its own on flat rows"),
        (lambda g: (g.add_flatten(), g.add_dense(3, 4, "l2_normalize")), "not a layer's activation"),
        (lambda g: (g.add_flatten(), g.add_activation("l2_normalize")), "use add_l2_normalize"),
        (lambda g: (g.add_flatten(), g.add_l2_normalize(0.0)), "finite number above 0"),
        (lambda g: (g.add_flatten(), g.add_l2_normalize(float("nan"))), "finite number above 0"),
    ],
)
def test_graphs_that_make_no_sense_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build(_core.Graph(3))


def test_graph_limits_and_shapes():
    with pytest.raises(ValueError, match="input_channels"):
        _core.Graph(0)
    graph, (conv1, conv2, pool, flatten, dense) = small_graph()
    assert graph.output_shapes(8, 10) == [(8, 10, 16), (8, 10, 20), (4, 5, 20), (400,), (7,)]
    with pytest.raises(ValueError, match="expects 400 input features"):
        graph.output_shapes(10, 10)
    with pytest.raises(ValueError, match="too small"):
        graph.output_shapes(1, 10)
    with pytest.raises(ValueError, match="height and width"):
        graph.output_shapes(2**20, 8)
    assert [op["kind"] for op in graph.describe()] == ["conv3x3", "conv3x3", "max_pool2x2", "flatten", "dense"]
    assert graph.describe()[1] == {
        "kind": "conv3x3", "in_channels": 16, "out_channels": 20, "activation": "relu", "pool_mode": "avg",
        "kernel_size": 3, "padding": "same", "on_image": False, "negative_slope": 0.0, "max_inverse_norm": 0.0,
        "threshold": 0.0, "alpha_height": 1, "alpha_width": 1, "size_height": 1, "size_width": 1,
    }


def test_forward_into_writes_the_callers_arrays_and_checks_them():
    executor, (conv1, conv2, pool, flatten, dense) = loaded_executor()
    x = images(3)
    expected_pool, expected_probs = executor.forward(x, [pool, dense])
    out_pool = np.full((3, 4, 5, 20), np.nan, np.float32)
    out_probs = np.full((3, 7), np.nan, np.float32)
    executor.forward_into(x, [(pool, False, out_pool), (dense, False, out_probs)])
    np.testing.assert_array_equal(out_pool, expected_pool)
    np.testing.assert_array_equal(out_probs, expected_probs)
    bad = [
        (np.zeros((3, 7), np.float64), "float32"),
        (np.zeros((3, 14), np.float32)[:, ::2], "C-contiguous"),
        (np.zeros((2, 7), np.float32), "wrong shape"),
    ]
    for array, message in bad:
        with pytest.raises(ValueError, match=message):
            executor.forward_into(x, [(dense, False, array)])
    readonly = np.zeros((3, 7), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        executor.forward_into(x, [(dense, False, readonly)])
    shared = np.zeros((2, 3, 7), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        executor.forward_into(x, [(dense, False, shared[0]), (dense, True, shared[0])])
    buffer = np.zeros(x.size + 21, np.float32)
    aliased_input = buffer[: x.size].reshape(x.shape)
    aliased_input[:] = x
    with pytest.raises(ValueError, match="overlaps the input"):
        executor.forward_into(aliased_input, [(dense, False, buffer[x.size - 1 : x.size + 20].reshape(3, 7))])
    with pytest.raises(TypeError):
        executor.forward_into(x, [(dense, False, [0.0] * 21)])
    with pytest.raises(ValueError, match="\\(layer_index, before_activation, out_array\\)"):
        executor.forward_into(x, [(dense, out_probs)])


def test_packed_sections_adopted_by_a_second_executor_give_the_same_model():
    executor, (conv1, conv2, pool, flatten, dense) = loaded_executor()
    sections = executor.packed_sections()
    names = [name for name, _ in sections]
    assert "op1.packed" in names and "op1.correction.ulps" in names and "op4.bias" in names
    copy = _core.CpuExecutor(executor.graph, "fast")
    # Copies aligned like a mapped file's sections; the executor keeps each buffer alive.
    for name, view in sections:
        copy.adopt_section(name, aligned_copy(view))
    del sections
    x = images()
    for a, b in zip(executor.forward(x, [conv2, dense]), copy.forward(x, [conv2, dense])):
        np.testing.assert_array_equal(a, b)
    for index in (conv1, conv2, dense):
        for a, b in zip(executor.get_weights(index), copy.get_weights(index)):
            np.testing.assert_array_equal(a, b)
    # A section of the wrong size, name or alignment is refused.
    with pytest.raises(ValueError, match="expected"):
        copy.adopt_section("op1.packed", np.zeros(64, np.uint8))
    with pytest.raises(ValueError, match="unknown packed section"):
        copy.adopt_section("op9x.packed", np.zeros(64, np.uint8))
    with pytest.raises(ValueError, match="without weights"):
        copy.adopt_section("op2.packed", np.zeros(64, np.uint8))
    with pytest.raises(ValueError, match="aligned"):
        copy.adopt_section("op4.packed", np.zeros(25601, np.uint8)[1:])


def test_a_forward_on_another_thread_waits_for_a_weight_update():
    executor, (conv1, *_) = loaded_executor()
    x = images()
    before = executor.forward(x, [conv1])[0]
    new_kernel = np.random.default_rng(5).standard_normal((3, 3, 3, 16), np.float32)
    finished = threading.Event()
    results = []

    def predict():
        results.append(executor.forward(x, [conv1])[0])
        finished.set()

    with executor.updating():
        executor.set_conv3x3_weights(conv1, new_kernel, np.zeros(16, np.float32))
        worker = threading.Thread(target=predict)
        worker.start()
        # The forward cannot start while the update holds the weights.
        assert not finished.wait(0.3)
        with pytest.raises(RuntimeError, match="holds the weights"):
            executor.forward(x, [conv1])  # on the updating thread itself: refused, not a deadlock
    worker.join(10)
    assert finished.is_set()
    assert not np.array_equal(results[0], before)
    np.testing.assert_array_equal(results[0], executor.forward(x, [conv1])[0])


def test_concurrent_forwards_keep_one_workspace_between_calls():
    executor, (conv1, conv2, pool, flatten, dense) = loaded_executor()
    x = images(4)
    expected = executor.forward(x, [dense])[0]
    one = executor.workspace_nbytes()
    assert one > 0
    outputs = []
    threads = [threading.Thread(target=lambda: outputs.append(executor.forward(x, [dense])[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in outputs:
        np.testing.assert_array_equal(out, expected)
    assert executor.workspace_nbytes() == one


def test_threads_are_per_executor():
    executor, (conv1, *_) = loaded_executor()
    default = _core.get_num_threads()
    assert executor.num_threads == default
    executor.num_threads = 1
    assert executor.num_threads == 1 and _core.get_num_threads() == default
    single = executor.forward(images(), [conv1])[0]
    executor.num_threads = 0
    assert executor.num_threads == default
    np.testing.assert_array_equal(single, executor.forward(images(), [conv1])[0])
    with pytest.raises(ValueError):
        executor.num_threads = -1
