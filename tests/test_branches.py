"""Models that are not one chain: heads that split from one trunk (a class head and a box head
on one VGG base, an auxiliary head from block3, a head that splits again) and merges
(Concatenate, Add, Average, ...), built, saved and run by real Keras, loaded by fastvgg.

Each chain of the tree runs on its own executor (saved_model.Branches); every layer's output is
held to Keras's own sub-model and to the float64 numpy chain, and the model API (layers,
get_weights order, summary, sub-models, the packed cache) to Keras's.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastvgg
import keras_finetuned as kf
import numpy_chain
from helpers import keras_flavor
from fastvgg import keras_model
from fastvgg.keras_model import UnsupportedModelError

KERAS_ATOL = 1e-4  # test_load_model's bound; not to be loosened
NUMPY_REL_L2 = 1e-4  # "fast" precision against the float64 chain, per layer (test_load_model's)


def box_and_class(keras):
    """The common detector-style fine-tune: one VGG16 base (nested), a class head on global
    pooling and a box-regression head on the flattened features."""
    layers = keras.layers
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(48, 48, 3))
    inputs = keras.Input((48, 48, 3), name="image")
    features = base(inputs)
    c = layers.GlobalAveragePooling2D(name="gap")(features)
    c = layers.Dense(12, activation="relu", name="cls_dense")(c)
    c = layers.BatchNormalization(name="cls_bn")(c)
    c = layers.Dropout(0.3, name="cls_drop")(c)
    c = layers.Dense(3, activation="softmax", name="cls")(c)
    b = layers.Flatten(name="flat")(features)
    b = layers.Dense(16, activation="relu", name="box_dense")(b)
    b = layers.Dense(4, activation="sigmoid", name="box")(b)
    return keras.Model(inputs, [c, b])


def aux_and_tree(keras):
    """A flat VGG16 with an auxiliary head from block3_pool (a 1x1 convolution, global max
    pooling, softmax), block4_pool's features as an output along the trunk, and a main head
    that splits again (softmax and sigmoid heads on one Dense layer; Dense on an image in one)."""
    layers = keras.layers
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(40, 40, 3))
    aux = layers.Conv2D(6, 1, activation="relu", name="aux_conv")(base.get_layer("block3_pool").output)
    aux = layers.GlobalMaxPooling2D(name="aux_pool")(aux)
    aux = layers.Dense(2, activation="softmax", name="aux")(aux)
    shared = layers.GlobalAveragePooling2D(name="gap")(base.output)
    shared = layers.Dense(10, activation="tanh", name="shared")(shared)
    main = layers.Dense(5, activation="softmax", name="main")(shared)
    flag = layers.Dense(1, activation="sigmoid", name="flag")(shared)
    pixels = layers.Dense(3, activation="relu", name="per_pixel")(base.get_layer("block5_conv3").output)
    pixels = layers.GlobalAveragePooling2D(name="pixel_pool")(pixels)
    return keras.Model(base.input, [main, aux, base.get_layer("block4_pool").output, flag, pixels])


def merges(keras):
    """Merges on a flat VGG16 base: a residual Add around a 1x1 convolution on block4_pool,
    "concat pooling" (Concatenate of average and max pooling), an Average of two Dense heads
    and a Maximum of two 1x1 convolutions on the image; every merge kind once more in a side
    head (Subtract, Multiply, Minimum, a three-input Add, Concatenate of images)."""
    layers = keras.layers
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(48, 48, 3))
    pool4 = base.get_layer("block4_pool").output
    residual = layers.Add(name="residual")([pool4, layers.Conv2D(512, 1, name="res_conv")(pool4)])
    residual = layers.Activation("relu", name="res_relu")(residual)
    cat = layers.Concatenate(name="concat_pool")([layers.GlobalAveragePooling2D(name="gap")(residual),
                                                 layers.GlobalMaxPooling2D(name="gmp")(residual)])
    averaged = layers.Average(name="avg")([layers.Dense(6, name="da")(cat), layers.Dense(6, name="db")(cat)])
    main = layers.Dense(4, activation="softmax", name="main")(layers.Activation("tanh", name="avg_tanh")(averaged))
    k1, k2 = (layers.Conv2D(3, 1, name=n)(base.output) for n in ("k1", "k2"))
    image_max = layers.Maximum(name="img_max")([k1, k2])
    side = layers.Concatenate(name="img_cat")([image_max, layers.Minimum(name="img_min")([k1, k2])])
    side = layers.GlobalAveragePooling2D(name="side_gap")(side)
    s1, s2, s3 = (layers.Dense(5, name=n)(side) for n in ("s1", "s2", "s3"))
    mixed = layers.Add(name="add3")([layers.Subtract(name="sub")([s1, s2]), layers.Multiply(name="mul")([s2, s3]), s3])
    flag = layers.Dense(1, activation="sigmoid", name="flag")(mixed)
    return keras.Model(base.input, [main, flag, image_max])


BUILDERS = {"box_and_class": box_and_class, "aux_and_tree": aux_and_tree, "merges": merges}
FORMATS = {"keras3": (".keras", ".h5"), "tf_keras": (".h5", ".keras", "savedmodel")}
CASES = [(flavor, name, ext) for flavor in FORMATS for name in BUILDERS for ext in FORMATS[flavor]]


def _keras_layer_outputs(model, spec, x):
    """Every layer's output as Keras's own layer computes it (called eagerly, training=False),
    each fed what the spec says it reads: the per-layer half of the check (the wiring is held
    to Keras by the model's outputs)."""
    by_name = {layer.name: layer for layer in kf._leaf_layers(model)}
    found = {spec.layers[0].name: x}
    for index, layer in enumerate(spec.layers[1:], start=1):
        if layer.name in spec.merge_inputs:
            result = by_name[layer.name]([found[name] for name in spec.merge_inputs[layer.name]], training=False)
        else:
            result = by_name[layer.name](found[spec.input_of(index)], training=False)
        found[layer.name] = np.asarray(result.numpy() if hasattr(result, "numpy") else result)
    return found


def _classifier_heads(model):
    return [layer for layer in kf._leaf_layers(model) if layer.__class__.__name__ == "Dense"
            and layer.get_config()["activation"] in ("softmax", "sigmoid")]


def _spread_heads(keras, model, x):
    """Random VGG activations shrink at these sizes, so a softmax or sigmoid head would sit at
    uniform and a 1e-4 check of it say little: each such head's Dense layer is rescaled (as
    training would) so that its logits are centred with a spread of about 2 on these images."""
    for layer in _classifier_heads(model):
        features = np.asarray(keras.Model(model.inputs, layer.input).predict(x, verbose=0), dtype=np.float64)
        kernel, bias = layer.get_weights()
        contribution = features @ kernel
        mean = contribution.mean(axis=0)
        gain = min(2.0 / max(float((contribution - mean).std()), 1e-12), 1e4)
        layer.set_weights([(kernel * gain).astype(kernel.dtype), (-gain * mean).astype(bias.dtype)])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}
    directory = tmp_path_factory.mktemp("branches")

    def get(flavor, name):
        if (flavor, name) not in cache:
            keras = keras_flavor(flavor)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                keras.utils.set_random_seed(7)
                model = BUILDERS[name](keras)
                rng = np.random.default_rng(7)
                for layer in kf._leaf_layers(model):  # every weight off its initial value (biases too)
                    layer.set_weights([(w + rng.normal(0, 1, w.shape) * 0.05 * (np.abs(w).mean() + 0.1)).astype(w.dtype)
                                       for w in layer.get_weights()])
                x = rng.uniform(-2, 2, (3,) + tuple(model.input_shape[1:])).astype(np.float32)
                _spread_heads(keras, model, x)
                expected = model.predict(x, verbose=0)
                paths = {}
                for ext in FORMATS[flavor]:
                    if ext == "savedmodel":
                        path = str(directory / f"{flavor}_{name}_savedmodel")
                        model.save(path, save_format="tf")
                    else:
                        path = str(directory / f"{flavor}_{name}{ext}")
                        model.save(path)
                    paths[ext] = path
            cache[(flavor, name)] = (model, x, expected, paths)
        return cache[(flavor, name)]

    return get


@pytest.mark.parametrize("flavor, name, ext", CASES)
def test_every_output_is_keras_s(saved, flavor, name, ext):
    model, x, expected, paths = saved(flavor, name)
    ours = fastvgg.load_model(paths[ext], packed_cache=False)
    got = ours.predict(x)
    assert isinstance(got, list) and len(got) == len(expected)
    for a, b, tensor in zip(got, expected, ours.outputs):
        assert a.shape == b.shape, tensor.name
        np.testing.assert_allclose(a, b, atol=KERAS_ATOL, err_msg=tensor.name)
    # The classifier heads are informative: away from uniform, and not saturated everywhere.
    heads = {layer.name for layer in _classifier_heads(model)}
    for b, tensor in zip(expected, ours.outputs):
        if tensor.layer.name in heads:
            assert np.std(b) > 0.05 and ((b > 0.005) & (b < 0.995)).any(), tensor.layer.name


@pytest.mark.parametrize("flavor, name", [(f, n) for f in FORMATS for n in BUILDERS])
def test_every_layer_matches_keras_and_the_numpy_chain(saved, flavor, name):
    model, x, _, paths = saved(flavor, name)
    path = paths[FORMATS[flavor][0]]
    spec = keras_model.read_model(path)
    assert spec.branch_inputs  # it is not a chain
    assert bool(spec.merge_inputs) == (name == "merges")
    names = [layer.name for layer in spec.layers[1:] if layer.kind != "identity"]
    ours = fastvgg.load_model(path, packed_cache=False).extract(x, names)
    reference = numpy_chain.run_chain(spec, x, names)
    theirs = _keras_layer_outputs(model, spec, x)
    for layer_name in names:
        got, want = ours[layer_name], np.asarray(theirs[layer_name])
        assert got.shape == want.shape, layer_name
        np.testing.assert_allclose(got, want, atol=KERAS_ATOL, err_msg=layer_name)
        error = np.linalg.norm(got - reference[layer_name]) / max(np.linalg.norm(reference[layer_name]), 1e-30)
        assert error <= NUMPY_REL_L2, f"{layer_name}: relative L2 {error:.2g} against the float64 chain"


@pytest.mark.parametrize("flavor", list(FORMATS))
def test_model_api_lists_layers_and_weights_as_keras(saved, flavor):
    model, x, expected, paths = saved(flavor, "box_and_class")
    ours = fastvgg.load_model(paths[".h5"], packed_cache=False)
    # Keras's order (its config's, heads interleaved), the nested base flattened.
    assert [layer.name for layer in ours.layers][1:] == [l.name for l in kf._leaf_layers(model) if l.__class__.__name__ != "InputLayer"]
    keras_weights = model.get_weights()
    our_weights = ours.get_weights()
    assert len(our_weights) == len(keras_weights)
    for a, b in zip(our_weights, keras_weights):
        np.testing.assert_array_equal(a, b)
    assert ours.count_params() == model.count_params()
    lines = []
    ours.summary(print_fn=lines.append)
    assert f"Total params: {model.count_params():,} " in "\n".join(lines)
    # Keras's set_weights order: weights moved in Keras and given to fastvgg in that order
    # change the predictions as in Keras.
    moved = [w * 1.01 for w in keras_weights]
    model.set_weights(moved)
    try:
        ours.set_weights(moved)
        for a, b in zip(ours.predict(x), model.predict(x, verbose=0)):
            np.testing.assert_allclose(a, b, atol=KERAS_ATOL)
    finally:
        model.set_weights(keras_weights)


def test_sub_models_run_only_the_branches_they_need(saved):
    model, x, expected, paths = saved("keras3", "aux_and_tree")
    ours = fastvgg.load_model(paths[".keras"], packed_cache=False)
    aux_only = fastvgg.Model(ours.input, ours.get_layer("aux").output)
    assert "block4_conv1" not in [layer.name for layer in aux_only.layers]  # the aux head leaves at block3
    assert "aux_conv" in [layer.name for layer in aux_only.layers]
    np.testing.assert_allclose(aux_only.predict(x), expected[1], atol=KERAS_ATOL)
    both = fastvgg.Model(ours.input, {"flag": ours.get_layer("flag").output, "aux": ours.get_layer("aux").output})
    got = both.predict(x)
    np.testing.assert_allclose(got["flag"], expected[3], atol=KERAS_ATOL)
    np.testing.assert_allclose(got["aux"], expected[1], atol=KERAS_ATOL)
    # extract across heads and the trunk in one pass
    found = ours.extract(x, ["main", "block3_pool", "aux_pool", "shared"])
    np.testing.assert_allclose(found["main"], expected[0], atol=KERAS_ATOL)


def test_two_heads_of_one_shape_keep_their_own_packed_weights(tmp_path):
    """Two heads with the same layers but different weights are two cache entries, not one."""
    keras = keras_flavor("keras3")
    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    first = keras.layers.Dense(4, name="first")(x)
    second = keras.layers.Dense(4, name="second")(x)
    model = keras.Model(inputs, [first, second])
    path = str(tmp_path / "two.keras")
    model.save(path)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    expected = model.predict(images, verbose=0)
    assert not np.allclose(expected[0], expected[1])
    built = fastvgg.load_model(path, packed_cache=tmp_path / "cache")
    hit = fastvgg.load_model(path, packed_cache=tmp_path / "cache")
    assert (built._packed_cache_status, hit._packed_cache_status) == ("built", "hit")
    for ours in (built, hit):
        for a, b in zip(ours.predict(images), expected):
            np.testing.assert_allclose(a, b, atol=KERAS_ATOL)


def test_what_cannot_run_is_refused_by_name(tmp_path):
    keras = keras_flavor("keras3")
    layers = keras.layers

    def refused(build, match):
        inputs = keras.Input((8, 8, 3))
        path = str(tmp_path / "refused.keras")
        keras.Model(inputs, build(inputs)).save(path)
        with pytest.raises(UnsupportedModelError, match=match):
            fastvgg.load_model(path)

    # Concatenate along the height, not the channels.
    refused(lambda x: layers.Concatenate(axis=1, name="rows")([layers.Conv2D(2, 1)(x), layers.Conv2D(2, 1)(x)]),
            "'rows' .*along axis 1")
    # A merge inside a nested model (used as a layer of another).
    inner_in = keras.Input((8, 8, 3))
    a = layers.Conv2D(2, 1, name="a")(inner_in)
    inner = keras.Model(inner_in, layers.Add(name="sum")([layers.Conv2D(2, 1, name="b")(a), a]), name="inner")
    refused(lambda x: inner(x), "'sum' .*takes 2 inputs.*inside a model used as a layer of another")
    # A layer that takes two tensors and is no merge.
    refused(lambda x: layers.Dot(axes=1, name="dot")([layers.Flatten()(x), layers.Flatten()(layers.Conv2D(3, 1)(x))]),
            "'dot' .*takes 2 inputs.*merges tensors only with Concatenate")


def test_tf_keras_ops_on_two_tensors_say_which_layer_to_use(tmp_path):
    """tf.keras records x + y on two tensors as a TFOpLambda with the second tensor among its
    arguments: refused with the merge layer to use instead (never read as a constant)."""
    keras = keras_flavor("tf_keras")
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = layers.Conv2D(4, 1, name="b")(inputs)
    path = str(tmp_path / "tf_add.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keras.Model(inputs, layers.Flatten()(a + b)).save(path)
    with pytest.raises(UnsupportedModelError, match=r"add of two tensors .*keras.layers.Add\(\)\(\[x, y\]\)"):
        fastvgg.load_model(path)


def test_keras3_ops_on_two_tensors_are_merges(tmp_path):
    """keras.ops.add(x, y) (or x + y) on two tensors records Keras 3's Add op, which is the Add
    merge; with a constant it stays the per-channel affine map it was."""
    keras = keras_flavor("keras3")
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = layers.Conv2D(4, 1, name="b")(inputs)
    summed = keras.ops.add(a, b) * 0.5
    model = keras.Model(inputs, layers.Dense(2, name="out")(layers.Flatten()(summed)))
    path = str(tmp_path / "ops.keras")
    model.save(path)
    images = np.random.default_rng(2).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    ours = fastvgg.load_model(path)
    assert [layer.class_name for layer in ours.layers if layer.class_name in ("Add", "Multiply")] == ["Add", "Multiply"]
    np.testing.assert_allclose(ours.predict(images), model.predict(images, verbose=0), atol=KERAS_ATOL)


def test_heads_run_on_the_cuda_executor_through_its_emulator(tmp_path, monkeypatch):
    """device="cuda": each chain of the tree gets a CUDA executor (here over the CPU grid
    emulator of the CUDA kernels; no GPU is needed), a head on flat rows included."""
    from cuda_builds import emulated_module
    from fastvgg import cuda as fastvgg_cuda

    keras = keras_flavor("keras3")
    layers = keras.layers
    keras.utils.set_random_seed(5)
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(name="pool1")(x)
    side = layers.Conv2D(4, 1, activation="relu", name="side_conv")(x)
    side = layers.GlobalAveragePooling2D(name="side_pool")(side)
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    first = layers.Dense(3, activation="softmax", name="first")(x)
    second = layers.Dense(2, activation="tanh", name="second")(x)
    model = keras.Model(inputs, [first, second, side])
    path = str(tmp_path / "heads.keras")
    model.save(path)
    images = np.random.default_rng(1).uniform(-2, 2, (3, 12, 12, 3)).astype(np.float32)
    expected = model.predict(images, verbose=0)
    monkeypatch.setattr(fastvgg_cuda, "_loaded", True)
    monkeypatch.setattr(fastvgg_cuda, "_module", emulated_module())
    ours = fastvgg.load_model(path, device="cuda")
    chains = ours._branches.chains
    assert len(chains) == 3 and all(isinstance(chain.executor, fastvgg_cuda.CudaExecutor) for chain in chains)
    for a, b in zip(ours.predict(images, batch_size=2), expected):
        np.testing.assert_allclose(a, b, atol=KERAS_ATOL)
    # One CUDA executor for a whole model is for chains; a tree says how to get its chains there.
    with pytest.raises(ValueError, match="heads that split from one trunk.*device='cuda'"):
        fastvgg_cuda.executor_for_model(fastvgg.load_model(path))


def test_open_sizes_that_disagree_at_run_time_are_a_clear_error(tmp_path):
    """An input of any size: two poolings of different depth both have shape (None, None, C)
    in the file, so only the image size decides whether they can be concatenated."""
    keras = keras_flavor("keras3")
    layers = keras.layers
    inputs = keras.Input((None, None, 3))
    shallow = layers.MaxPooling2D(name="once")(inputs)
    deep = layers.MaxPooling2D(name="twice")(layers.MaxPooling2D(name="first")(inputs))
    model = keras.Model(inputs, layers.Concatenate(name="cat")([shallow, deep]))
    path = str(tmp_path / "sizes.keras")
    model.save(path)
    ours = fastvgg.load_model(path)
    with pytest.raises(ValueError, match=r"'cat' \(Concatenate\) cannot merge tensors of shapes \[\(4, 4, 3\), \(2, 2, 3\)\]"):
        ours.predict(np.zeros((1, 8, 8, 3), np.float32))


def test_threads_predict_and_set_weights_on_a_model_of_several_chains(tmp_path):
    """Four threads predict on one model of several chains (each chain's executor called
    concurrently) while another thread swaps its weights back and forth: every prediction is
    one of the two models' whole results, bit for bit, never a mix of old and new chains'."""
    import threading

    keras = keras_flavor("keras3")
    layers = keras.layers
    keras.utils.set_random_seed(9)
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    x = layers.MaxPooling2D(name="pool")(x)
    cat = layers.Concatenate(name="cat")([layers.GlobalAveragePooling2D(name="gap")(x),
                                          layers.GlobalMaxPooling2D(name="gmp")(x)])
    model = keras.Model(inputs, [layers.Dense(3, name="left")(cat), layers.Dense(2, name="right")(x)])
    path = str(tmp_path / "threads.keras")
    model.save(path)
    ours = fastvgg.load_model(path)
    original = ours.get_weights()
    changed = [w * 1.5 + 0.25 for w in original]
    images = {size: np.random.default_rng(size).uniform(-1, 1, (2, size, size, 3)).astype(np.float32) for size in (8, 12, 16, 20)}

    def results(weights):
        ours.set_weights(weights)
        return {size: ours.predict(x) for size, x in images.items()}

    expected = [results(original), results(changed)]
    ours.set_weights(original)
    failures, stop = [], threading.Event()

    def predict(size):
        for _ in range(30):
            got = ours.predict(images[size])
            if not any(all(np.array_equal(a, b) for a, b in zip(got, want[size])) for want in expected):
                failures.append(size)

    def swap():
        while not stop.is_set():
            for weights in (changed, original):
                ours.set_weights(weights)

    swapper = threading.Thread(target=swap)
    workers = [threading.Thread(target=predict, args=(size,)) for size in images]
    swapper.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    swapper.join()
    assert not failures, f"predictions that mix the weights of different moments, for image sizes {sorted(set(failures))}"
