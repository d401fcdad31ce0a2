"""Loading images as Keras does: ``load_img``, ``img_to_array`` and ``array_to_img``.

They follow ``keras.utils.load_img``/``img_to_array``/``array_to_img`` (Keras 3) call for
call, so an image gives the same array here as in Keras. They need Pillow, an optional
dependency: ``pip install "fastvgg[image]"``.

    img = fastvgg.image.load_img("cat.jpg", target_size=(224, 224))
    x = fastvgg.image.img_to_array(img)[None]          # (1, 224, 224, 3) float32, RGB 0..255
    probs = model.predict(fastvgg.preprocess_input(x))
"""

from __future__ import annotations

import io
import os
from typing import Optional, Tuple

import numpy as np

__all__ = ["load_img", "img_to_array", "array_to_img"]

COLOR_MODES = ("grayscale", "rgb", "rgba")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "hamming", "box", "lanczos")
DATA_FORMATS = ("channels_last", "channels_first")
# Keras's backend.floatx() unless the user changed it.
DEFAULT_DTYPE = "float32"


def _pil_image():
    # Imported here, not at module import, so fastvgg works without Pillow until an image
    # is actually loaded.
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            'fastvgg.image needs Pillow, an optional dependency: pip install "fastvgg[image]" '
            "(or pip install Pillow)."
        ) from error
    return Image


def _resample_filter(image_module, interpolation: str):
    # Pillow 9.1 moved the filters into Image.Resampling; older versions have them on Image.
    filters = getattr(image_module, "Resampling", image_module)
    return getattr(filters, interpolation.upper())


def _check_data_format(data_format: Optional[str]) -> str:
    data_format = data_format or "channels_last"
    if data_format not in DATA_FORMATS:
        raise ValueError(f"`data_format` must be 'channels_last' or 'channels_first', got {data_format!r}.")
    return data_format


def _check_target_size(target_size) -> Optional[Tuple[int, int]]:
    if target_size is None:
        return None
    try:
        height, width = target_size
    except (TypeError, ValueError):
        raise ValueError(f"`target_size` must be None or (height, width), got {target_size!r}.") from None
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`target_size` must be two positive integers (height, width), got {target_size!r}.")
    return int(height), int(width)


def load_img(
    path,
    color_mode: str = "rgb",
    target_size: Optional[Tuple[int, int]] = None,
    interpolation: str = "nearest",
    keep_aspect_ratio: bool = False,
):
    """Loads an image file into a PIL image, as ``keras.utils.load_img``.

    path: a file path (str, bytes or os.PathLike) or a binary file object (e.g. io.BytesIO).
    color_mode: "rgb" (default), "rgba" or "grayscale" (8-bit, except that 16- and 32-bit
        grayscale images keep their depth).
    target_size: None (the image's own size) or (height, width) to resize to.
    interpolation: the resampling filter used when resizing: "nearest" (default),
        "bilinear", "bicubic", "hamming", "box" or "lanczos".
    keep_aspect_ratio: when resizing, first crop the centre of the image to the target's
        aspect ratio, so nothing is stretched.
    """
    if color_mode not in COLOR_MODES:
        raise ValueError(f"`color_mode` must be one of {', '.join(map(repr, COLOR_MODES))}, got {color_mode!r}.")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"`interpolation` must be one of {', '.join(map(repr, INTERPOLATIONS))}, got {interpolation!r}."
        )
    target_size = _check_target_size(target_size)
    Image = _pil_image()

    if isinstance(path, (str, bytes, os.PathLike)):
        # Read whole, as Keras does, so no file handle stays open inside the lazy PIL image.
        with open(path, "rb") as f:
            data = io.BytesIO(f.read())
        source = os.fsdecode(path)
    elif hasattr(path, "read"):
        data, source = path, repr(path)
    else:
        raise TypeError(f"`path` must be a file path or a binary file object, not {type(path).__name__}.")
    try:
        img = Image.open(data)
    except Image.UnidentifiedImageError as error:
        raise Image.UnidentifiedImageError(f"{source} is not an image file that Pillow can read.") from error

    if color_mode == "grayscale":
        if img.mode not in ("L", "I;16", "I"):
            img = img.convert("L")
    elif color_mode == "rgba":
        if img.mode != "RGBA":
            img = img.convert("RGBA")
    elif img.mode != "RGB":
        img = img.convert("RGB")

    if target_size is not None:
        height, width = target_size
        if img.size != (width, height):
            resample = _resample_filter(Image, interpolation)
            if keep_aspect_ratio:
                img = img.resize((width, height), resample, box=_centre_crop_box(img.size, width, height))
            else:
                img = img.resize((width, height), resample)
    return img


def _centre_crop_box(size: Tuple[int, int], target_width: int, target_height: int) -> Tuple[int, int, int, int]:
    """The largest centred box of the target's aspect ratio, rounded down as Keras does."""
    width, height = size
    crop_width = min(width, (height * target_width) // target_height)
    crop_height = min(height, (width * target_height) // target_width)
    left = (width - crop_width) // 2
    top = (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


def img_to_array(img, data_format: Optional[str] = None, dtype=None) -> np.ndarray:
    """A PIL image as a 3D numpy array, as ``keras.utils.img_to_array``.

    data_format: "channels_last" (default: (height, width, channels)) or "channels_first".
    dtype: default float32. Grayscale images get a channel axis of size 1.
    """
    data_format = _check_data_format(data_format)
    x = np.asarray(img, dtype=dtype or DEFAULT_DTYPE)
    if x.ndim == 2:
        return x.reshape((1,) + x.shape if data_format == "channels_first" else x.shape + (1,))
    if x.ndim == 3:
        return x.transpose(2, 0, 1) if data_format == "channels_first" else x
    raise ValueError(f"img_to_array expects an image of 2 or 3 dimensions, got an array of shape {x.shape}.")


def array_to_img(x, data_format: Optional[str] = None, scale: bool = True, dtype=None):
    """A 3D array as a PIL image, as ``keras.utils.array_to_img``.

    scale=True stretches the values to 0..255 (minimum to 0, maximum to 255) first. 1, 3 or 4
    channels give a grayscale ("L", or 32-bit "I" above 255), RGB or RGBA image. The caller's
    array is never modified.
    """
    data_format = _check_data_format(data_format)
    Image = _pil_image()
    x = np.asarray(x, dtype=dtype or DEFAULT_DTYPE)
    if x.ndim != 3:
        raise ValueError(f"array_to_img expects one image, an array of 3 dimensions; got shape {x.shape}.")
    if data_format == "channels_first":
        x = x.transpose(1, 2, 0)
    if scale:
        x = x - np.min(x)  # a new array from here on, so the in-place steps are safe
        x_max = np.max(x)
        if x_max != 0:
            x /= x_max
        x *= 255
    channels = x.shape[2]
    if channels in (3, 4):
        return Image.fromarray(np.ascontiguousarray(x.astype(np.uint8)))
    if channels == 1:
        if np.max(x) > 255:
            return Image.fromarray(np.ascontiguousarray(x[:, :, 0].astype(np.int32)))
        return Image.fromarray(np.ascontiguousarray(x[:, :, 0].astype(np.uint8)))
    raise ValueError(f"array_to_img makes images of 1, 3 or 4 channels, got {channels} (shape {x.shape}).")
