"""Fuzzing the weights loader: valid files with bytes changed must load or raise a clear
error (ValueError, FileNotFoundError), never crash, hang or leak another exception type.

Mutations go to the bytes that describe the file (HDF5 superblock, object headers, B-trees,
attributes; the zip directory and headers of a .keras archive), not to the weight values,
where a change only changes a number. Hypothesis runs a fixed, derandomised set of examples so
CI time stays bounded and a failure reproduces.
"""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastvgg
import numpy_vgg as nv
import weight_files as wf
from helpers import assert_weights_unchanged, noise_images, snapshot

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def metadata_ranges(path) -> list:
    """Byte ranges of an HDF5 file that are not dataset storage."""
    storage = []
    with h5py.File(path) as f:
        def visit(_, node):
            if isinstance(node, h5py.Dataset) and node.id.get_offset() is not None:
                storage.append((node.id.get_offset(), node.id.get_offset() + node.id.get_storage_size()))
        f.visititems(visit)
    size = path.stat().st_size
    ranges, position = [], 0
    for start, end in sorted(storage):
        if start > position:
            ranges.append((position, start))
        position = max(position, end)
    if position < size:
        ranges.append((position, size))
    return ranges


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    weights = nv.random_weights(16, False, seed=8)
    h5 = directory / "vgg16.weights.h5"
    wf.write_keras3_weights(h5, weights, 16, False)
    archive = directory / "vgg16.keras"
    wf.write_keras_archive(archive, wf.keras3_weights_bytes(weights, 16, False), wf.keras3_config(16, False))
    model = fastvgg.VGG16(None, include_top=False, input_shape=(32, 32, 3), seed=0)
    return {"h5": (h5, metadata_ranges(h5)), "keras": (archive, None)}, model


def mutate(source, ranges, choices, target) -> None:
    data = bytearray(source.read_bytes())
    for pick, offset_fraction, value in choices:
        if ranges:
            start, end = ranges[pick % len(ranges)]
        else:  # a zip: its local headers at the front and its directory at the back
            start, end = (0, 4096) if pick % 2 else (max(0, len(data) - 4096), len(data))
        position = start + int(offset_fraction * (end - start - 1))
        data[position] = value
    target.write_bytes(bytes(data))


# A failed load must leave the model as it was. Comparing every weight (get_weights, about a
# second for VGG16) after each of ~90 examples costs minutes, so each example compares the
# model's output on fixed probe images, bit for bit (outputs are deterministic), and
# test_a_failed_load_leaves_every_weight_unchanged compares every weight on a few files.
PROBE = noise_images(2, (32, 32), seed=123)


def load_or_clear_error(model, path) -> None:
    """Loads, or raises a clear error and leaves the model computing what it computed before."""
    before = model.predict(PROBE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN weights from a changed byte: a warning, not a failure
        try:
            model.load_weights(path)
        except (ValueError, FileNotFoundError) as error:
            assert str(error), "an error without a message"
            assert np.array_equal(model.predict(PROBE), before, equal_nan=True), f"a failed load of {path} changed the model"


mutations = st.lists(
    st.tuples(st.integers(0, 10_000), st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=12
)


@pytest.mark.parametrize("kind", ["h5", "keras"])
@FUZZ
@given(choices=mutations)
def test_mutated_files(valid_files, tmp_path, kind, choices):
    files, model = valid_files
    source, ranges = files[kind]  # ranges is None for the archive: its zip headers are mutated instead
    target = tmp_path / ("mutated" + "".join(source.suffixes))
    mutate(source, ranges, choices, target)
    load_or_clear_error(model, target)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_files(valid_files, tmp_path, cut):
    files, model = valid_files
    for source, _ in files.values():
        data = source.read_bytes()
        target = tmp_path / ("cut" + source.suffix)
        target.write_bytes(data[: int(cut * len(data))])
        load_or_clear_error(model, target)


def test_mutations_reach_the_loader(valid_files, tmp_path):
    """The fuzz tests are only worth something if mutated files are not all refused at open:
    a single changed attribute byte must still open and reach the layer matching."""
    files, model = valid_files
    source, _ = files["h5"]
    target = tmp_path / "renamed.weights.h5"
    target.write_bytes(source.read_bytes())
    with h5py.File(target, "r+") as f:
        f["layers/conv2d/vars"].attrs["name"] = "block1_conw1"  # one letter changed
    with pytest.raises(ValueError, match=r"no weights for layer\(s\) \['block1_conv1'\]"):
        model.load_weights(target)
    assert np.isfinite(model.predict(np.zeros((1, 32, 32, 3), np.float32))).all()


def test_a_failed_load_leaves_every_weight_unchanged(valid_files, tmp_path):
    """Every weight, bit for bit, after loads that fail early, late and in the middle."""
    files, model = valid_files
    before = snapshot(model)
    for source, _ in files.values():
        data = source.read_bytes()
        for cut in (0.3, 0.97):
            target = tmp_path / f"cut{int(cut * 100)}{''.join(source.suffixes)}"
            target.write_bytes(data[: int(cut * len(data))])
            with pytest.raises(ValueError):
                model.load_weights(target)
    renamed = tmp_path / "renamed.weights.h5"
    renamed.write_bytes(files["h5"][0].read_bytes())
    with h5py.File(renamed, "r+") as f:
        f["layers/conv2d/vars"].attrs["name"] = "block1_conw1"  # every other layer matches
    with pytest.raises(ValueError, match="block1_conv1"):
        model.load_weights(renamed)
    assert_weights_unchanged(model, before)
