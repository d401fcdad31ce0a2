"""The command line, run as a subprocess (``python -m fastvgg``), against the Python API.

The API path is tested elsewhere against the numpy reference and Keras; here the CLI's output
must equal what the API gives for the same images and weights, and its errors must be one line
that names the problem, with exit status 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastvgg
import keras_h5
import numpy_vgg as nv
from fastvgg.image import img_to_array, load_img

PIL = pytest.importorskip("PIL.Image", reason="the CLI's image tests need Pillow (the test extra installs it)")


def run_cli(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "fastvgg", *map(str, args)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "FASTVGG_NUM_THREADS": "2"},
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three RGB images of different sizes and content (the CLI resizes them)."""
    directory = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(4)
    paths = []
    for i, (h, w) in enumerate([(240, 320), (224, 224), (300, 200)]):
        smooth = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * rng.uniform(0.3, 1, 3)
        pixels = np.clip(smooth + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        path = directory / f"photo{i}.png"
        PIL.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def parse_table(stdout: str):
    """{image path: [(label, wnid, score), ...]} from ``fastvgg predict``'s output."""
    tables, current = {}, None
    for line in stdout.splitlines():
        if not line.startswith("  "):
            current = tables.setdefault(line, [])
        elif not line.split()[0] == "rank":
            parts = line.split()
            current.append((" ".join(parts[1:-2]), parts[-2], float(parts[-1])))
    return tables


def test_predict_prints_the_api_s_top_classes(photos):
    result = run_cli("predict", *photos, "--weights", "none", "--top", "3")
    tables = parse_table(result.stdout)
    assert list(tables) == photos

    model = fastvgg.VGG16(None, seed=0)  # what --weights none builds
    x = fastvgg.preprocess_input(np.stack([img_to_array(load_img(p, target_size=(224, 224))) for p in photos]))
    expected = fastvgg.decode_predictions(model.predict(x), top=3)
    for path, rows in zip(photos, expected):
        assert [(name, wnid) for wnid, name, _ in rows] == [(label, wnid) for label, wnid, _ in tables[path]]
        np.testing.assert_allclose([s for _, _, s in tables[path]], [s for _, _, s in rows], atol=1e-4)


@pytest.fixture(scope="module")
def notop_file(tmp_path_factory):
    weights = nv.random_weights(16, include_top=False, seed=5, bias_scale=0.05)
    path = tmp_path_factory.mktemp("weights") / "vgg16_notop.h5"
    keras_h5.write_classic_h5(path, weights, nv.layer_names(16, include_top=False))
    return str(path)


@pytest.mark.parametrize("layer, pooling", [("block5_pool", "avg"), ("block3_conv3:preact", None)])
def test_features_saves_what_extract_gives(photos, notop_file, tmp_path, layer, pooling):
    output = tmp_path / "features.npy"
    options = ["--pooling", pooling] if pooling else []
    result = run_cli("features", *photos, "--weights", notop_file, "--layer", layer, "--size", 64, 96, "-o", output, *options)
    saved = np.load(output)
    assert str(saved.shape) in result.stdout

    model = fastvgg.VGG16(notop_file, include_top=False, input_shape=(64, 96, 3))
    x = fastvgg.preprocess_input(np.stack([img_to_array(load_img(p, target_size=(64, 96))) for p in photos]))
    expected = model.extract(x, [layer])[layer]
    if pooling:
        expected = expected.mean(axis=(1, 2))
    assert saved.shape == expected.shape
    np.testing.assert_allclose(saved, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_info_names_version_kernels_and_threads():
    out = run_cli("info").stdout
    assert f"fastvgg {fastvgg.__version__}" in out
    assert f"kernels: {fastvgg._core.active_isa()}" in out
    assert "threads: 2" in out
    assert "cuda: not built" in out
    # Every precision, with the kernel set it runs here or why it cannot.
    isa = fastvgg._core.active_isa()
    assert f"precision fast: {isa}" in out and f"precision highest: {isa}" in out
    from bf16_checks import AMX_UNAVAILABLE, BF16_UNAVAILABLE

    bf16 = "precision bf16: unavailable (" if BF16_UNAVAILABLE else "precision bf16: " + fastvgg._core.testing.bf16_kernel_sets()[0]
    assert bf16 in out
    assert (f"precision bf16x3: unavailable (precision='bf16x3' is not available here: {AMX_UNAVAILABLE}"
            if AMX_UNAVAILABLE else "precision bf16x3: amx_bf16x3") in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "no/such/image.jpg", "--weights", "none"], "no/such/image.jpg"),
        (["predict", "{photo}", "--weights", "no/such/weights.h5"], "no/such/weights.h5"),
        (["features", "{photo}", "--weights", "none", "--layer", "block9_pool", "-o", "{out}"], "No such layer: 'block9_pool'"),
        (["features", "{photo}", "--weights", "none", "--size", 16, 16, "-o", "{out}"], "at least 32x32"),
    ],
    ids=["missing-image", "missing-weights", "unknown-layer", "too-small"],
)
def test_errors_are_one_line_and_exit_1(photos, tmp_path, args, message):
    args = [str(a).format(photo=photos[0], out=tmp_path / "f.npy") for a in args]
    result = run_cli(*args, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "f.npy").exists()


def test_console_script_is_installed_with_the_package():
    script = shutil.which("fastvgg")
    if script is None:
        pytest.skip("fastvgg is not installed (tests run from the source tree); `pip install .` adds the script")
    result = subprocess.run([script, "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and f"fastvgg {fastvgg.__version__}" in result.stdout


def test_precision_choices_are_the_api_s():
    # The CLI writes the choices out (its --help imports no extension); they must not drift.
    from fastvgg.__main__ import _parser
    from fastvgg.models import PRECISIONS

    subparsers = next(a for a in _parser()._actions if a.choices and "features" in a.choices)
    for command in ("predict", "features"):
        option = next(a for a in subparsers.choices[command]._actions if "--precision" in a.option_strings)
        assert tuple(option.choices) == PRECISIONS
