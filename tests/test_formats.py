"""Every weight file a Keras user has loads into fastvgg, matched by layer name.

Files come from two sources: the writers of ``weight_files.py`` (h5py and zipfile, for layouts
and corner cases real Keras no longer writes: early Keras 3 files without layer names,
Theano-ordered files) and real Keras (tf_keras writes Keras 2 files, Keras 3 its own). A
loaded model must hold exactly the weights that were saved (``get_weights`` compared bit for
bit) and, for the real Keras files, predict what Keras predicts.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

import fastvgg
import keras_h5
import numpy_vgg as nv
from helpers import BIAS_SCALE
import weight_files as wf

SMALL = dict(input_shape=(32, 32, 3), classes=10)


def assert_holds(model, weights) -> None:
    """The model's weights are exactly ``weights`` (layer name -> (kernel, bias))."""
    for layer in model.layers:
        if not layer.weight_shapes():
            continue
        for got, saved in zip(layer.get_weights(), weights[layer.name]):
            assert got.dtype == np.float32 and got.shape == saved.shape, layer.name
            assert np.array_equal(got, saved), f"{layer.name}: weights differ from the file's"


@pytest.fixture(scope="module")
def small_top():
    """VGG16 with a 10-class top on 32x32 images: fc1 has 512 rows."""
    return nv.random_weights(16, True, input_hw=(32, 32), classes=10, seed=21, bias_scale=BIAS_SCALE)


@pytest.fixture(scope="module")
def base16():
    return nv.random_weights(16, False, seed=22, bias_scale=BIAS_SCALE)


@pytest.fixture(scope="module")
def head():
    rng = np.random.default_rng(5)
    return {"head": (rng.standard_normal((512, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32))}


# Written with h5py ------------------------------------------------------------------------------
@pytest.mark.parametrize("name_attributes", [True, False], ids=["names", "early-keras3-no-names"])
def test_keras3_weights_h5(tmp_path, small_top, name_attributes):
    path = tmp_path / "vgg16.weights.h5"
    wf.write_keras3_weights(path, small_top, 16, True, name_attributes=name_attributes)
    with h5py.File(path) as f:  # the writer really sorts conv2d_10 before conv2d_2
        assert list(f["layers"]).index("conv2d_10") < list(f["layers"]).index("conv2d_2")
    assert_holds(fastvgg.VGG16(path, **SMALL), small_top)


@pytest.mark.parametrize("name_attributes", [True, False], ids=["names", "names-from-config"])
def test_keras_archive_read_in_place(tmp_path, small_top, name_attributes):
    path = tmp_path / "vgg16.keras"
    data = wf.keras3_weights_bytes(small_top, 16, True, name_attributes=name_attributes)
    wf.write_keras_archive(path, data, wf.keras3_config(16, True))
    before = set(os.listdir(tmp_path))
    assert_holds(fastvgg.VGG16(path, **SMALL), small_top)
    assert set(os.listdir(tmp_path)) == before  # nothing unpacked beside it


def test_keras3_nested_base_with_a_head(tmp_path, base16, head):
    path = tmp_path / "finetuned.weights.h5"
    wf.write_keras3_weights(path, base16, 16, False, head=head)
    assert_holds(fastvgg.VGG16(path, include_top=False), base16)
    archive = tmp_path / "finetuned.keras"
    data = wf.keras3_weights_bytes(base16, 16, False, head=head, name_attributes=False)
    wf.write_keras_archive(archive, data, wf.keras3_config(16, False, head=head))
    assert_holds(fastvgg.VGG16(archive, include_top=False), base16)


def test_classic_nested_base_with_a_head(tmp_path, base16, head):
    path = tmp_path / "finetuned.h5"
    wf.write_nested_classic(path, base16, 16, head)
    assert_holds(fastvgg.VGG16(path, include_top=False, input_shape=(32, 32, 3)), base16)


@pytest.mark.parametrize("tf_kernels", [False, True], ids=["th_kernels", "tf_kernels"])
def test_theano_ordered_file(tmp_path, tf_kernels):
    weights = nv.random_weights(16, True, input_hw=(64, 96), classes=10, seed=23, bias_scale=BIAS_SCALE)
    name = "vgg16_weights_th_dim_ordering_" + ("tf" if tf_kernels else "th") + "_kernels.h5"
    converted = wf.to_theano(weights, pool_hw=(2, 3))
    if tf_kernels:  # the same layout, kernels not flipped
        converted = {n: (k[:, :, ::-1, ::-1] if k.ndim == 4 else k, b) for n, (k, b) in converted.items()}
    keras_h5.write_classic_h5(tmp_path / name, converted, nv.layer_names(16, True), naming="legacy2016")
    model = fastvgg.VGG16(tmp_path / name, input_shape=(64, 96, 3), classes=10)
    assert_holds(model, weights)
    # And the numbers: a flipped kernel or a wrong fc1 order would change the predictions.
    x = np.random.default_rng(1).uniform(-100, 100, (2, 64, 96, 3)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), nv.forward(x, weights, 16), atol=1e-5)


def test_whole_model_h5_with_split_layer_names(tmp_path, small_top):
    path = tmp_path / "model.h5"
    keras_h5.write_classic_h5(path, small_top, nv.layer_names(16, True))
    with h5py.File(path, "r+") as f:
        names = f.attrs["layer_names"]
        del f.attrs["layer_names"]
        f.attrs["layer_names0"], f.attrs["layer_names1"] = names[:7], names[7:]
        f.attrs["model_config"] = "{}"
        f.create_group("model_weights")
        for key in [k for k in f.keys() if k != "model_weights"]:
            f.move(key, f"model_weights/{key}")
        for attr in ("layer_names0", "layer_names1"):
            f["model_weights"].attrs[attr] = f.attrs[attr]
            del f.attrs[attr]
    assert_holds(fastvgg.VGG16(path, **SMALL), small_top)


# Written by real Keras -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_models(small_top):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tf_keras

    models = {}
    for name, module in (("keras3", keras), ("tf_keras", tf_keras)):
        model = module.applications.VGG16(weights=None, **SMALL)
        for layer_name, arrays in small_top.items():
            model.get_layer(layer_name).set_weights(list(arrays))
        models[name] = model
    x = np.random.default_rng(3).uniform(-100, 100, (3, 32, 32, 3)).astype(np.float32)
    return models, x


# tf_keras warns that .h5 model files are legacy: that is the file this test wants.
@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file:UserWarning")
@pytest.mark.parametrize("writer, filename", [
    ("keras3", "vgg16.weights.h5"),
    ("keras3", "vgg16.keras"),
    ("tf_keras", "vgg16_weights.h5"),
    ("tf_keras", "vgg16_model.h5"),
])
def test_files_written_by_keras(tmp_path, keras_models, small_top, writer, filename):
    models, x = keras_models
    model, path = models[writer], str(tmp_path / filename)
    if filename.endswith("weights.h5"):
        model.save_weights(path)
    else:
        model.save(path)
    loaded = fastvgg.VGG16(path, **SMALL)
    assert_holds(loaded, small_top)
    expected = np.asarray(model.predict(x, verbose=0))
    np.testing.assert_allclose(loaded.predict(x), expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file:UserWarning")
@pytest.mark.parametrize("writer", ["keras3", "tf_keras"])
def test_fine_tuned_model_written_by_keras(tmp_path, base16, writer):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if writer == "keras3":
        import keras as module
    else:
        import tf_keras as module
    base = module.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    for layer_name, arrays in base16.items():
        base.get_layer(layer_name).set_weights(list(arrays))
    for layer in base.layers[:8]:  # freezing the first blocks, as fine-tuning does, puts their
        layer.trainable = False    # weights after the others in a Keras 2 file: order means nothing
    tuned = module.Sequential([base, module.layers.Flatten(), module.layers.Dense(3, name="head")])
    tuned.build((None, 32, 32, 3))
    paths = [str(tmp_path / "tuned.weights.h5"), str(tmp_path / "tuned.keras")] if writer == "keras3" else [
        str(tmp_path / "tuned.h5"), str(tmp_path / "tuned_model.h5")]
    tuned.save_weights(paths[0])
    tuned.save(paths[1])
    x = np.random.default_rng(4).uniform(-100, 100, (2, 32, 32, 3)).astype(np.float32)
    expected = np.asarray(base.predict(x, verbose=0))
    if writer == "tf_keras":
        with h5py.File(paths[0]) as f:
            names = [n.decode() if isinstance(n, bytes) else n for n in f["vgg16"].attrs["weight_names"]]
        assert names[0].startswith("block3_conv2/"), names[:3]
    for path in paths:
        features = fastvgg.VGG16(path, include_top=False, input_shape=(32, 32, 3))
        assert_holds(features, base16)
        np.testing.assert_allclose(features.predict(x), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_vgg19_written_by_keras(tmp_path):
    """VGG19 once, by Keras 3 as a .keras archive: the depth changes every auto-name after
    block3_conv3, which name-only matching must not care about."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    weights = nv.random_weights(19, True, input_hw=(32, 32), classes=10, seed=24, bias_scale=BIAS_SCALE)
    model = keras.applications.VGG19(weights=None, **SMALL)
    for layer_name, arrays in weights.items():
        model.get_layer(layer_name).set_weights(list(arrays))
    path = str(tmp_path / "vgg19.keras")
    model.save(path)
    loaded = fastvgg.VGG19(path, **SMALL)
    assert_holds(loaded, weights)
    x = np.random.default_rng(6).uniform(-100, 100, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x), np.asarray(model.predict(x, verbose=0)), atol=1e-5)
