"""Features from any layer: ``fastvgg.Model(inputs, outputs)``, ``model.extract`` and
pre-activation outputs, against the float64 numpy VGG and against Keras 3 sub-models.

The numpy reference gives every layer's output; a pre-activation output is the reference's
previous layer run through a 3x3 convolution with bias and no ReLU.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastvgg
import numpy_vgg as nv
from helpers import BIAS_SCALE, CONSTRUCTORS, noise_images, rel_l2
from kernel_checks import conv3x3_float64

PARITY_BAR = 1e-4  # relative L2, the project's bar for features
# Neither side a multiple of 32: the pools floor (200 -> 6, 328 -> 10).
ODD_HW = (200, 328)



def assert_close(actual, expected, what: str) -> None:
    assert actual.dtype == np.float32, what
    assert actual.shape == expected.shape, what
    assert np.count_nonzero(expected) > 0.1 * expected.size, f"{what}: reference is (nearly) all zero"
    error = rel_l2(actual, expected)
    assert error < PARITY_BAR, f"{what}: relative L2 error {error:.3g}"



def weighted_model(depth: int, weights: nv.Weights, **kwargs):
    model = CONSTRUCTORS[depth](None, include_top=False, **kwargs)
    model.set_weights([a for name in nv.layer_names(depth, False) if name in weights for a in weights[name]])
    return model


@pytest.fixture(scope="module")
def vgg16_case():
    weights = nv.random_weights(16, include_top=False, seed=7, bias_scale=BIAS_SCALE)
    model = weighted_model(16, weights)
    x = noise_images(2, ODD_HW, seed=3)
    names = nv.layer_names(16, include_top=False)
    reference = nv.forward(x, weights, 16, include_top=False, outputs=names)
    return weights, model, x, reference


# Sub-models, as Keras's functional API builds them ---------------------------------------
def test_model_from_tensors_returns_each_output(vgg16_case):
    _, base, x, reference = vgg16_case
    names = ["block1_conv2", "block3_conv3", "block4_pool"]
    sub = fastvgg.Model(inputs=base.input, outputs=[base.get_layer(n).output for n in names])
    results = sub.predict(x)
    assert isinstance(results, list) and len(results) == len(names)
    for name, result in zip(names, results):
        assert_close(result, reference[name], name)
    assert sub.output_shape == [base.get_layer(n).output_shape for n in names]
    # The pass is cut at the deepest output: the sub-model has no layers after block4_pool.
    assert sub.layers[-1].name == "block4_pool"
    assert [layer.name for layer in sub.layers] == [layer.name for layer in base.layers[: len(sub.layers)]]


def test_model_output_structures_follow_keras(vgg16_case):
    _, base, x, _ = vgg16_case
    pool3 = base.get_layer("block3_pool").output
    pool2 = base.get_layer("block2_pool").output
    single = fastvgg.Model(base.input, pool3).predict(x)
    one_in_list = fastvgg.Model(base.input, [pool3]).predict(x)
    as_dict = fastvgg.Model(base.input, {"mid": pool3, "early": pool2}).predict(x)
    assert isinstance(single, np.ndarray) and isinstance(one_in_list, np.ndarray)  # as Keras 3's predict
    assert set(as_dict) == {"mid", "early"}
    np.testing.assert_array_equal(single, one_in_list)
    np.testing.assert_array_equal(single, as_dict["mid"])
    assert as_dict["early"].shape == (len(x), x.shape[1] // 4, x.shape[2] // 4, 128)


def test_an_output_asked_for_twice_comes_back_as_two_arrays(vgg16_case):
    """Model(x, [t, pool, t]) (Keras allows it): before, the core was handed one output array
    twice and stopped ("two out_arrays overlap"); now each position gets its own array."""
    _, base, x, reference = vgg16_case
    pool1 = base.get_layer("block1_pool").output
    pool2 = base.get_layer("block2_pool").output
    first, middle, again = fastvgg.Model(base.input, [pool1, pool2, pool1]).predict(x)
    assert_close(first, reference["block1_pool"], "block1_pool")
    assert_close(middle, reference["block2_pool"], "block2_pool")
    np.testing.assert_array_equal(first, again)
    assert first is not again and not np.shares_memory(first, again)
    both = fastvgg.Model(base.input, {"a": base.input, "b": base.input}).predict(x)
    np.testing.assert_array_equal(both["a"], both["b"])
    assert not np.shares_memory(both["a"], both["b"])


def test_sub_model_shares_the_base_weights(vgg16_case):
    weights, _, x, _ = vgg16_case
    base = weighted_model(16, weights)
    sub = fastvgg.Model(base.input, base.get_layer("block1_pool").output)
    before = sub.predict(x)
    kernel, bias = base.get_layer("block1_conv1").get_weights()
    base.get_layer("block1_conv1").set_weights([kernel, bias + 1.0])
    assert not np.array_equal(sub.predict(x), before)
    assert sub.count_params() == sum(layer.count_params() for layer in sub.layers)


def test_input_tensor_as_an_output_returns_the_input(vgg16_case):
    _, base, x, reference = vgg16_case
    both = fastvgg.Model(base.input, [base.input, base.get_layer("block1_conv1").output]).predict(x)
    np.testing.assert_array_equal(both[0], x)
    assert_close(both[1], reference["block1_conv1"], "block1_conv1")


# extract -----------------------------------------------------------------------------------
def test_extract_gives_a_dict_from_one_pass(vgg16_case):
    _, model, x, reference = vgg16_case
    wanted = ["block5_pool", "block1_conv2", "block4_conv1"]
    features = model.extract(x, layers=wanted, batch_size=1)
    assert list(features) == wanted
    for name in wanted:
        assert_close(features[name], reference[name], name)


def test_preactivation_outputs_are_the_sums_before_relu(vgg16_case):
    weights, model, x, reference = vgg16_case
    features = model.extract(x, ["block1_conv1:preact", "block3_conv2:preact", "block3_conv2", "block5_conv3:preact"])
    for name, previous in (("block1_conv1", None), ("block3_conv2", "block3_conv1"), ("block5_conv3", "block5_conv2")):
        before = x if previous is None else reference[previous]
        expected = conv3x3_float64(before, *weights[name])
        got = features[f"{name}:preact"]
        assert (got < 0).mean() > 0.2, f"{name}: a pre-activation output should have negative values"
        assert_close(got, expected, f"{name}:preact")
    # The ReLU'd output of the same pass is the ReLU of the pre-activation, exactly.
    np.testing.assert_array_equal(features["block3_conv2"], np.maximum(features["block3_conv2:preact"], 0))
    assert_close(features["block3_conv2"], reference["block3_conv2"], "block3_conv2")


def test_preact_output_tensor_of_a_conv_layer(vgg16_case):
    weights, model, x, reference = vgg16_case
    layer = model.get_layer("block2_conv2")
    result = fastvgg.Model(model.input, layer.preact_output).predict(x)
    assert_close(result, conv3x3_float64(reference["block2_conv1"], *weights["block2_conv2"]), "block2_conv2:preact")
    assert layer.preact_output.name == "block2_conv2:preact"


@pytest.mark.parametrize("precision", ["fast", "highest"])
def test_preact_with_both_convolution_algorithms_on_vgg19(precision):
    weights = nv.random_weights(19, include_top=False, seed=19, bias_scale=BIAS_SCALE)
    model = weighted_model(19, weights, input_shape=(32, 48, 3), precision=precision)
    x = noise_images(3, (32, 48), seed=5)
    reference = nv.forward(x, weights, 19, include_top=False, outputs=["block5_conv3"])
    features = model.extract(x, ["block5_conv4:preact", "block5_pool"])
    assert_close(features["block5_conv4:preact"], conv3x3_float64(reference["block5_conv3"], *weights["block5_conv4"]),
                 "block5_conv4:preact")
    assert_close(features["block5_pool"], nv.forward(x, weights, 19, include_top=False), "block5_pool")


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_pooled_features_are_two_dimensional(vgg16_case, pooling):
    weights, _, x, reference = vgg16_case
    model = weighted_model(16, weights, pooling=pooling)
    features = model.predict(x)
    assert features.shape == (len(x), 512)
    block5 = reference["block5_pool"]
    assert_close(features, block5.mean(axis=(1, 2)) if pooling == "avg" else block5.max(axis=(1, 2)), pooling)


def test_smallest_input_size(vgg16_case):
    weights, _, _, _ = vgg16_case
    model = weighted_model(16, weights, input_shape=(32, 32, 3))
    x = noise_images(2, (32, 32), seed=11)
    features = model.extract(x, ["block5_pool", "block2_conv2"])
    assert features["block5_pool"].shape == (2, 1, 1, 512)
    reference = nv.forward(x, weights, 16, include_top=False, outputs=["block2_conv2", "block5_pool"])
    for name in features:
        assert_close(features[name], reference[name], name)


def test_progress_bar_with_verbose(vgg16_case, capsys):
    _, model, x, _ = vgg16_case
    quiet = model.predict(x[:1], verbose=0)
    assert capsys.readouterr().err == ""
    shown = model.predict(x, batch_size=1, verbose=1)
    err = capsys.readouterr().err
    assert "2/2" in err, err
    assert shown.shape[0] == 2 and np.array_equal(shown[:1], quiet)


# Bad requests --------------------------------------------------------------------------------
def test_extract_errors_name_the_problem(vgg16_case):
    _, model, x, _ = vgg16_case
    with pytest.raises(ValueError, match="No such layer: 'block6_conv1'"):
        model.extract(x, ["block6_conv1"])
    with pytest.raises(ValueError, match="only convolution layers have a pre-activation output"):
        model.extract(x, ["block1_pool:preact"])
    with pytest.raises(ValueError, match="`layers` is empty"):
        model.extract(x, [])
    with pytest.raises(TypeError, match="Layer names must be strings"):
        model.extract(x, [3])
    with pytest.raises(ValueError, match="`verbose` must be"):
        model.predict(x, verbose=5)
    sub = fastvgg.Model(model.input, model.get_layer("block2_pool").output)
    with pytest.raises(ValueError, match="No such layer: 'block3_conv1'"):
        sub.extract(x, ["block3_conv1"])


def test_model_from_mismatched_tensors_is_refused(vgg16_case):
    _, model, _, _ = vgg16_case
    other = fastvgg.VGG16(None, include_top=False, input_shape=(32, 32, 3), seed=0)
    with pytest.raises(ValueError, match="not connected to the inputs"):
        fastvgg.Model(model.input, other.get_layer("block1_pool").output)
    with pytest.raises(ValueError, match="must be a model's input tensor"):
        fastvgg.Model(model.get_layer("block1_pool").output, model.get_layer("block2_pool").output)
    with pytest.raises(ValueError, match="`outputs` must be layer outputs"):
        fastvgg.Model(model.input, ["block2_pool"])
    with pytest.raises(ValueError, match="`outputs` is empty"):
        fastvgg.Model(model.input, [])


# Against Keras 3's own sub-models -------------------------------------------------------------
@pytest.fixture(scope="module")
def keras3():
    import os

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    return keras


@pytest.mark.parametrize("hw", [(480, 640), (200, 328)], ids=["480x640", "200x328"])
def test_extraction_matches_keras_sub_models(keras3, hw):
    weights = nv.random_weights(16, include_top=False, seed=31, bias_scale=BIAS_SCALE)
    names = ["block1_conv2", "block3_pool", "block4_conv3", "block5_pool"]
    keras_base = keras3.applications.VGG16(weights=None, include_top=False, input_shape=hw + (3,))
    for name, arrays in weights.items():
        keras_base.get_layer(name).set_weights(list(arrays))
    keras_sub = keras3.Model(keras_base.input, [keras_base.get_layer(n).output for n in names])
    x = noise_images(1, hw, seed=13)
    expected = [np.asarray(t, np.float64) for t in keras_sub(x, training=False)]

    base = weighted_model(16, weights)
    ours = fastvgg.Model(base.input, [base.get_layer(n).output for n in names]).predict(x)
    extracted = base.extract(x, names)
    for name, want, got in zip(names, expected, ours):
        assert_close(got, want, f"Model output {name}")
        assert_close(extracted[name], want, f"extract {name}")
