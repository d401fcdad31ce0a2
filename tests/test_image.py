"""fastvgg.image against Keras 3's keras.utils.load_img / img_to_array / array_to_img.

Images are written with Pillow into tmp_path; both sides read the same files with the same
arguments, and since both end in the same Pillow calls the arrays must be equal exactly.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from fastvgg import image

PIL_Image = pytest.importorskip("PIL.Image", reason="Pillow is part of the test extra")

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# (height, width) targets: shrinking, growing, odd aspect ratios both ways, and square.
TARGET_SIZES = [None, (7, 5), (13, 29), (40, 24), (16, 16)]
IMAGE_HW = (19, 23)
IMAGE_KINDS = ["rgb", "rgba", "gray", "gray16", "palette", "jpeg"]


@pytest.fixture(scope="module")
def keras_utils():
    # As in test_keras_parity: skip only when TensorFlow itself cannot be imported.
    try:
        import tensorflow  # noqa: F401
    except ImportError as error:
        pytest.skip(f"TensorFlow cannot be imported ({error}); there is no Keras to compare with")
    import keras

    return keras.utils


def make_image(kind: str):
    """A Pillow image of the given kind with content that differs per pixel and channel."""
    rng = np.random.default_rng(IMAGE_KINDS.index(kind))
    h, w = IMAGE_HW
    if kind in ("rgb", "jpeg"):
        return PIL_Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if kind == "rgba":
        return PIL_Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
    if kind == "gray":
        return PIL_Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    if kind == "gray16":
        # 16-bit grayscale, which Keras's grayscale mode keeps at full depth.
        return PIL_Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).convert("I;16")
    if kind == "palette":
        return PIL_Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P")
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    paths = {}
    for kind in IMAGE_KINDS:
        path = directory / (f"{kind}.jpg" if kind == "jpeg" else f"{kind}.png")
        make_image(kind).save(path)
        paths[kind] = path
    return paths


@pytest.mark.parametrize("color_mode", image.COLOR_MODES)
@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_load_img_matches_keras(keras_utils, image_files, kind, color_mode):
    path = str(image_files[kind])
    for target_size in TARGET_SIZES:
        for interpolation in image.INTERPOLATIONS:
            for keep_aspect_ratio in (False, True):
                args = dict(
                    color_mode=color_mode,
                    target_size=target_size,
                    interpolation=interpolation,
                    keep_aspect_ratio=keep_aspect_ratio,
                )
                ours = image.load_img(path, **args)
                theirs = keras_utils.load_img(path, **args)
                assert ours.mode == theirs.mode, args
                assert ours.size == theirs.size, args
                got = image.img_to_array(ours)
                expected = keras_utils.img_to_array(theirs, data_format="channels_last")
                assert got.dtype == expected.dtype == np.float32
                np.testing.assert_array_equal(got, expected, err_msg=str(args))


def test_resizing_really_happens(image_files):
    # Guards the comparison above: the resized images differ by interpolation and cropping.
    # (Shrinking both sides: when enlarging, "box" and "nearest" pick the same pixels.)
    path = image_files["rgb"]
    arrays = {
        (interpolation, keep): image.img_to_array(
            image.load_img(path, target_size=(11, 9), interpolation=interpolation, keep_aspect_ratio=keep)
        )
        for interpolation in image.INTERPOLATIONS
        for keep in (False, True)
    }
    assert all(a.shape == (11, 9, 3) for a in arrays.values())
    distinct = {a.tobytes() for a in arrays.values()}
    assert len(distinct) == len(arrays)


@pytest.mark.parametrize(
    "kind, dtype",
    # 16-bit values do not fit in uint8, so that pair is left out.
    [(kind, dtype) for kind in ("rgb", "gray", "gray16") for dtype in (None, "float64", "uint8", "int32")
     if (kind, dtype) != ("gray16", "uint8")],
)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_img_to_array_matches_keras(keras_utils, image_files, kind, data_format, dtype):
    img = image.load_img(image_files[kind], color_mode="grayscale" if kind.startswith("gray") else "rgb")
    got = image.img_to_array(img, data_format=data_format, dtype=dtype)
    expected = keras_utils.img_to_array(img, data_format=data_format, dtype=dtype)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def test_grayscale_shape_and_channels_first(image_files):
    h, w = IMAGE_HW
    gray = image.load_img(image_files["rgb"], color_mode="grayscale")
    assert image.img_to_array(gray).shape == (h, w, 1)
    assert image.img_to_array(gray, data_format="channels_first").shape == (1, h, w)
    rgb = image.img_to_array(image.load_img(image_files["rgb"]))
    first = image.img_to_array(image.load_img(image_files["rgb"]), data_format="channels_first")
    assert first.shape == (3, h, w)
    np.testing.assert_array_equal(first, rgb.transpose(2, 0, 1))


def test_load_img_accepts_path_objects_bytes_and_file_objects(image_files):
    path = image_files["rgb"]
    expected = image.img_to_array(image.load_img(str(path)))
    with open(path, "rb") as f:
        data = f.read()
    for source in (path, os.fsencode(str(path)), io.BytesIO(data)):
        np.testing.assert_array_equal(image.img_to_array(image.load_img(source)), expected)


@pytest.mark.parametrize(
    "shape, data_format, scale",
    [
        ((9, 11, 3), "channels_last", True),
        ((9, 11, 4), "channels_last", True),
        ((9, 11, 1), "channels_last", True),
        ((3, 9, 11), "channels_first", True),
        ((9, 11, 3), "channels_last", False),
        ((9, 11, 1), "channels_last", False),  # values up to 1000: a 32-bit "I" image
    ],
)
def test_array_to_img_matches_keras(keras_utils, shape, data_format, scale):
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1000 if shape[-1] == 1 and not scale else 255, shape).astype(np.float32)
    original = x.copy()
    ours = image.array_to_img(x, data_format=data_format, scale=scale)
    theirs = keras_utils.array_to_img(x, data_format=data_format, scale=scale)
    assert ours.mode == theirs.mode
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    np.testing.assert_array_equal(x, original)  # the caller's array is left alone


# Errors -------------------------------------------------------------------------------------
def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "no_such_image.png"
    with pytest.raises(FileNotFoundError, match="no_such_image.png"):
        image.load_img(missing)


def test_not_an_image_names_the_path(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(PIL_Image.UnidentifiedImageError, match="notes.png"):
        image.load_img(path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(color_mode="bgr"), "color_mode"),
        (dict(interpolation="cubic"), "interpolation"),
        (dict(target_size=(224,)), "target_size"),
        (dict(target_size=(0, 10)), "target_size"),
        (dict(target_size=(10.5, 10)), "target_size"),
    ],
)
def test_bad_arguments_are_value_errors(image_files, kwargs, match):
    with pytest.raises(ValueError, match=match):
        image.load_img(image_files["rgb"], **kwargs)


def test_bad_data_format_and_shapes(image_files):
    img = image.load_img(image_files["rgb"])
    with pytest.raises(ValueError, match="data_format"):
        image.img_to_array(img, data_format="NHWC")
    with pytest.raises(ValueError, match="3 dimensions"):
        image.array_to_img(np.zeros((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        image.array_to_img(np.zeros((4, 4, 2)))
    with pytest.raises(TypeError, match="file path or a binary file object"):
        image.load_img(12345)


def test_missing_pillow_says_how_to_install(image_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` fail
    for call in (lambda: image.load_img(image_files["rgb"]), lambda: image.array_to_img(np.zeros((2, 2, 3)))):
        with pytest.raises(ImportError, match=r'pip install "fastvgg\[image\]"'):
            call()


def test_importing_fastvgg_image_does_not_import_pillow():
    code = "import sys, fastvgg, fastvgg.image; print('PIL' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "False"
