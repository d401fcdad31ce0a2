"""``fastvgg predict --model FILE`` and ``fastvgg info FILE`` as subprocesses, against the API.

The model files are written by Keras 3 (small fine-tuned models from tests/keras_finetuned.py);
the CLI's scores must equal what ``fastvgg.load_model(...).predict`` gives for the same images
and preprocessing, and its errors must be one line naming the problem, with exit status 1.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import fastvgg
import keras_finetuned as kf
from fastvgg.image import img_to_array, load_img
from test_cli import photos, run_cli  # noqa: F401  (photos is a fixture)

pytest.importorskip("PIL.Image", reason="the CLI's image tests need Pillow (the test extra installs it)")


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    try:
        import keras
    except Exception as error:  # pragma: no cover - only without TensorFlow/Keras
        pytest.skip(f"Keras cannot be imported ({error})")
    directory = tmp_path_factory.mktemp("cli_models")
    files = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("normalization_front", "gap_head"):
            model = kf.BUILDERS[name](keras)
            low, high = kf.input_range(name)
            kf.perturb_and_train(keras, model, seed=3, low=low, high=high)
            files[name] = str(directory / f"{name}.keras")
            model.save(files[name])
    labels = directory / "class_indices.json"
    labels.write_text(json.dumps({"cat": 0, "dog": 1, "fox": 2}))
    files["labels"] = str(labels)
    return files


def parse_table(stdout: str):
    """{image path: [(label, score), ...]} from ``fastvgg predict``'s output for a model file
    (no WordNet ids: a label may have spaces, the score is the last column)."""
    tables, current = {}, None
    for line in stdout.splitlines():
        if not line.startswith("  "):
            current = tables.setdefault(line, [])
        elif line.split()[0] != "rank":
            parts = line.split()
            current.append((" ".join(parts[1:-1]), float(parts[-1])))
    return tables


def api_scores(path, photos, preprocessing):
    model = fastvgg.load_model(path)
    size = tuple(model.input_shape[1:3])
    x = np.stack([img_to_array(load_img(p, target_size=size)) for p in photos])
    if preprocessing == "caffe":
        x = fastvgg.preprocess_input(x)
    elif preprocessing == "scale":
        x = x / np.float32(255)
    return model.predict(x)


def test_predict_with_labels_and_auto_preprocessing(photos, model_files):  # noqa: F811
    # normalization_front starts with a Normalization layer: "auto" feeds it pixels as they are.
    result = run_cli("predict", *photos, "--model", model_files["normalization_front"], "--labels", model_files["labels"])
    tables = parse_table(result.stdout)
    assert list(tables) == photos
    expected = api_scores(model_files["normalization_front"], photos, "none")
    names = ["cat", "dog", "fox"]
    for path, scores in zip(photos, expected):
        order = np.argsort(scores)[::-1]
        assert [label for label, _ in tables[path]] == [names[i] for i in order]
        np.testing.assert_allclose([s for _, s in tables[path]], scores[order], atol=1e-4)


@pytest.mark.parametrize("preprocessing", ["caffe", "scale"])
def test_predict_with_chosen_preprocessing(photos, model_files, preprocessing):  # noqa: F811
    result = run_cli("predict", *photos, "--model", model_files["gap_head"], "--preprocess", preprocessing, "--top", "2")
    tables = parse_table(result.stdout)
    expected = api_scores(model_files["gap_head"], photos, preprocessing)
    for path, scores in zip(photos, expected):
        order = np.argsort(scores)[::-1][:2]
        assert [label for label, _ in tables[path]] == [f"class {i}" for i in order]
        np.testing.assert_allclose([s for _, s in tables[path]], scores[order], atol=1e-4)


def test_predict_with_a_model_whose_output_is_a_dict(photos, tmp_path):  # noqa: F811
    """A Keras 3 model built with outputs={"name": ...}: the CLI shows its scores (before, it
    stopped on the dict predict returns)."""
    import keras

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inputs = keras.Input((32, 32, 3))
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, padding="same")(inputs))
        model = keras.Model(inputs, {"scores": keras.layers.Dense(3, activation="softmax")(x)})
        path = str(tmp_path / "dict_output.keras")
        model.save(path)
    result = run_cli("predict", *photos, "--model", path, "--preprocess", "scale", "--top", "3")
    tables = parse_table(result.stdout)
    expected = api_scores(path, photos, "scale")["scores"]
    for image, scores in zip(photos, expected):
        order = np.argsort(scores)[::-1]
        assert [label for label, _ in tables[image]] == [f"class {i}" for i in order]
        np.testing.assert_allclose([s for _, s in tables[image]], scores[order], atol=1e-4)
    # Two outputs (along the chain): predict says what to use instead, in one line.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = model.get_layer(index=1).output
        two = keras.Model(model.input, [conv, model.output["scores"]])
        two_path = str(tmp_path / "two_outputs.keras")
        two.save(two_path)
    failed = run_cli("predict", *photos, "--model", two_path, check=False)
    assert failed.returncode == 1
    assert "2 outputs" in failed.stderr and "fastvgg features" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1


def test_info_prints_the_layers(model_files):
    out = run_cli("info", model_files["gap_head"]).stdout
    model = fastvgg.load_model(model_files["gap_head"])
    for layer in model.layers:
        assert layer.name in out
    assert f"Total params: {model.count_params():,}" in out


def test_model_file_errors_are_one_line(photos, model_files, tmp_path):  # noqa: F811
    bad_labels = tmp_path / "labels.json"
    bad_labels.write_text(json.dumps(["only", "two"]))
    lambda_model = tmp_path / "not_a_model.keras"
    lambda_model.write_bytes(b"PK\x03\x04 not really a zip")
    cases = [
        (["predict", photos[0], "--model", str(tmp_path / "absent.keras")], "absent.keras"),
        (["predict", photos[0], "--model", model_files["normalization_front"], "--labels", str(bad_labels)], "3 classes"),
        (["info", str(lambda_model)], "not_a_model.keras"),
    ]
    for args, message in cases:
        result = run_cli(*args, check=False)
        assert result.returncode == 1, args
        assert "Traceback" not in result.stderr
        assert message in result.stderr, result.stderr
