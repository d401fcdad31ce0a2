"""``fastvgg features`` over many files: directories and globs, streamed outputs, skipped
files, resuming after a kill.

Each output is compared with the API run on the same images (``load_img`` + ``extract``);
a batch gives bit-identical results whatever its size (see test_determinism.py), so the
streamed rows must equal the API's exactly. The model is VGG16 with random weights at 32x32
or 64x64 without the top, so every run takes a second or two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import fastvgg
from fastvgg.image import img_to_array, load_img

PIL = pytest.importorskip("PIL.Image", reason="the CLI's image tests need Pillow (the test extra installs it)")

CLI_ENV = {**os.environ, "FASTVGG_NUM_THREADS": "2"}


def run_cli(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "fastvgg", "features", *map(str, args)],
        capture_output=True, text=True, timeout=300, env=CLI_ENV,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def write_image(path, seed, size):
    rng = np.random.default_rng(seed)
    h, w = size
    pixels = np.clip(np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1, 3) + rng.normal(0, 50, (h, w, 3)), 0, 255)
    PIL.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """30 images (PNG and JPEG, several sizes) in nested folders, one corrupt .jpg, one empty
    .png and a text file that a directory search must ignore."""
    root = tmp_path_factory.mktemp("images")
    (root / "b" / "deeper").mkdir(parents=True)
    (root / "a").mkdir()
    for i in range(30):
        sub = ("a", "b", "b/deeper")[i % 3]
        write_image(root / sub / f"img{i:02d}.{'png' if i % 2 else 'jpg'}", i, (40 + i, 70 - i))
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not really a JPEG" + bytes(range(200)))
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


def images_in_order(root):
    """What the CLI must process for ``root``: every file with an image extension, sorted per
    directory level (os.walk order with sorted names)."""
    found = []
    for directory, dirs, names in os.walk(root):
        dirs.sort()
        found += [os.path.join(directory, n) for n in sorted(names) if n.endswith((".png", ".jpg"))]
    return found


def api_features(paths, layers, size, pooling=None):
    model = fastvgg.VGG16(None, include_top=False, input_shape=size + (3,), seed=0)
    x = fastvgg.preprocess_input(np.stack([img_to_array(load_img(p, target_size=size)) for p in paths]))
    out = model.extract(x, layers)
    if pooling == "avg":
        out = {k: v.mean(axis=(1, 2)) for k, v in out.items()}
    elif pooling == "max":
        out = {k: v.max(axis=(1, 2)) for k, v in out.items()}
    return out


def readable(paths):
    return [p for p in paths if not p.endswith(("broken.jpg", "empty.png"))]


def test_directory_to_npy_skips_unreadable_files_and_lists_them(folder, tmp_path):
    output = tmp_path / "feats.npy"
    result = run_cli(folder, "--weights", "none", "--size", 64, 64, "--layer", "block4_pool", "--batch-size", 7,
                     "-o", output)
    every = images_in_order(folder)
    good = readable(every)
    assert len(every) == 32 and len(good) == 30

    saved = np.load(output)
    expected = api_features(good, ["block4_pool"], (64, 64))["block4_pool"]
    assert saved.shape == expected.shape == (30, 4, 4, 512)
    np.testing.assert_array_equal(saved, expected)
    assert (tmp_path / "feats.paths.txt").read_text().splitlines() == good
    skipped = dict(line.split("\t", 1) for line in (tmp_path / "feats.skipped.txt").read_text().splitlines())
    assert sorted(skipped) == sorted(set(every) - set(good))
    assert all(reason for reason in skipped.values())
    assert "skipped 2 unreadable file(s)" in result.stderr and "broken.jpg" in result.stderr
    assert "(30, 4, 4, 512)" in result.stdout
    assert not os.path.exists(str(output) + ".partial")


def test_several_layers_to_npz_with_pooling(folder, tmp_path):
    output = tmp_path / "feats.npz"
    layers = ["block2_pool", "block3_conv3:preact"]
    run_cli(folder / "a", "--weights", "none", "--size", 32, 32, "--pooling", "max",
            *[a for layer in layers for a in ("--layer", layer)], "--batch-size", 4, "-o", output)
    good = readable(images_in_order(folder / "a"))
    expected = api_features(good, layers, (32, 32), pooling="max")
    with np.load(output) as saved:
        assert sorted(saved.files) == sorted(layers + ["paths"])
        assert list(saved["paths"]) == good
        for layer in layers:
            np.testing.assert_array_equal(saved[layer], expected[layer])


def test_glob_to_parquet(folder, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet output needs pyarrow")
    output = tmp_path / "feats.parquet"
    run_cli(str(folder / "**" / "*.png"), "--weights", "none", "--size", 32, 32, "--pooling", "avg",
            "--layer", "block5_pool", "--layer", "block1_conv2", "-o", output, "--batch-size", 5)
    pngs = sorted(p for p in images_in_order(folder) if p.endswith(".png"))
    good = readable(pngs)
    table = pq.read_table(output)
    assert table.column("path").to_pylist() == good
    expected = api_features(good, ["block5_pool", "block1_conv2"], (32, 32), pooling="avg")
    for layer in ("block5_pool", "block1_conv2"):
        column = np.array(table.column(layer).to_pylist(), dtype=np.float32)
        np.testing.assert_array_equal(column, expected[layer])
    assert json.loads(table.schema.metadata[b"fastvgg.shapes"]) == {"block5_pool": [512], "block1_conv2": [64]}


def test_resumes_after_being_killed(folder, tmp_path):
    """The run blocks on a named pipe in the middle of its inputs (opening it waits for a
    writer), is killed with SIGKILL there, and the same command then finishes the job
    from the last saved batch."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs os.mkfifo")
    images = readable(images_in_order(folder))[:20]
    stall = tmp_path / "stall.png"
    os.mkfifo(stall)
    inputs = images[:12] + [str(stall)] + images[12:]
    output = tmp_path / "feats.npy"
    args = [*inputs, "--weights", "none", "--size", 32, 32, "--layer", "block3_pool",
            "--batch-size", 4, "--workers", 2, "-o", output]
    first = subprocess.Popen([sys.executable, "-m", "fastvgg", "features", *map(str, args)], env=CLI_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state_path = tmp_path / "feats.npy.partial" / "state.json"
    deadline = time.monotonic() + 120
    state = {}
    try:
        while time.monotonic() < deadline and first.poll() is None:
            if state_path.exists():
                state = json.loads(state_path.read_text())
                if state["done"] == 12:
                    break
            time.sleep(0.05)
        time.sleep(0.3)  # it must stay stuck at 12: the next batch waits on the pipe
        assert first.poll() is None, first.communicate()
        state = json.loads(state_path.read_text())
        assert (state["done"], state["rows"]) == (12, 12)
    finally:
        first.kill()
        first.communicate()
    assert not output.exists()

    os.remove(stall)
    write_image(stall, 99, (50, 50))  # the stalled file becomes a real image
    result = run_cli(*args)
    assert "resumed after 12 of 21 file(s)" in result.stdout
    expected = api_features(inputs, ["block3_pool"], (32, 32))["block3_pool"]
    np.testing.assert_array_equal(np.load(output), expected)
    assert (tmp_path / "feats.paths.txt").read_text().splitlines() == inputs


def test_interrupted_run_keeps_progress_and_refuses_other_settings(folder, tmp_path, monkeypatch, capsys):
    from fastvgg.__main__ import main

    images = readable(images_in_order(folder))[:12]
    output = tmp_path / "feats.npy"
    args = ["features", *images, "--weights", "none", "--size", 32, 32, "--layer", "block2_pool",
            "--batch-size", 4, "--quiet", "-o", output]
    original = fastvgg.Model.extract
    calls = []

    def interrupted_extract(self, x, layers, **kwargs):
        calls.append(len(x))
        if len(calls) == 3:  # the probe, one batch, then Ctrl-C in the second batch
            raise KeyboardInterrupt
        return original(self, x, layers, **kwargs)

    monkeypatch.setattr(fastvgg.Model, "extract", interrupted_extract)
    assert main([str(a) for a in args]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    state = json.loads((tmp_path / "feats.npy.partial" / "state.json").read_text())
    assert (state["done"], state["rows"]) == (4, 4)
    monkeypatch.setattr(fastvgg.Model, "extract", original)

    other = run_cli(*[a if a != "block2_pool" else "block3_pool" for a in args[1:]], check=False)
    assert other.returncode == 1 and "other settings (layers, shapes differ)" in other.stderr
    assert not output.exists()

    result = run_cli(*args[1:])
    assert "resumed after 4 of 12 file(s)" in result.stdout
    np.testing.assert_array_equal(np.load(output), api_features(images, ["block2_pool"], (32, 32))["block2_pool"])

    again = run_cli(*[a if a != "block2_pool" else "block3_pool" for a in args[1:]], "--restart")
    assert "resumed" not in again.stdout
    np.testing.assert_array_equal(np.load(output), api_features(images, ["block3_pool"], (32, 32))["block3_pool"])


@pytest.mark.parametrize(
    "inputs, extra, message",
    [
        (["{folder}/no/such/dir"], [], "no such file or directory"),
        (["{folder}/*.nothing"], [], "the pattern matches no file"),
        (["{folder}/a/broken.jpg", "{folder}/notes.txt"], [], "none of the 2 file(s) could be read"),
        (["{folder}/a"], ["--layer", "block1_pool", "--layer", "block2_pool"], "a .npy file holds one layer"),
        (["{folder}/a"], ["--layer", "predictions"], "No such layer: 'predictions'"),
    ],
    ids=["missing", "empty-glob", "all-unreadable", "npy-several-layers", "unknown-layer"],
)
def test_errors_are_one_line_and_leave_nothing(folder, tmp_path, inputs, extra, message):
    output = tmp_path / "f.npy"
    result = run_cli(*[i.format(folder=folder) for i in inputs], "--weights", "none", "--size", 32, 32,
                     *extra, "-o", output, check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr
    assert os.listdir(tmp_path) == []
