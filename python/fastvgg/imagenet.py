"""ImageNet input preprocessing and output decoding, as ``keras.applications.vgg16`` does it.

The class index shipped beside this file is byte-identical to Keras's
``imagenet_class_index.json`` (md5 c2c37ea517e94d9795004a39431a14cb); the same table ships
with keras-hub under the Apache-2.0 licence.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import _core

# Per-channel means of the ImageNet training set in BGR order: Keras's "caffe" mode.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
CLASS_INDEX_FILE = os.path.join(os.path.dirname(__file__), "imagenet_class_index.json")


def preprocess_input(x, data_format: Optional[str] = None) -> np.ndarray:
    """Converts RGB images (0..255) to what VGG expects: BGR, minus the ImageNet means.

    Like Keras's ``vgg16.preprocess_input`` ("caffe" mode, no scaling), with one difference:
    the caller's array is never changed in place; a new array is always returned. Float
    input keeps its dtype; integer input becomes float32.

    Args:
        x: images with 3 channels, channels last (``(..., H, W, 3)``) unless ``data_format``
            is ``"channels_first"`` (``(3, H, W)`` or ``(N, 3, H, W)``).
        data_format: ``"channels_last"`` (the default) or ``"channels_first"``.
    """
    data_format = data_format or "channels_last"
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError(
            f"`data_format` must be 'channels_last' or 'channels_first', got {data_format!r}."
        )
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"preprocess_input expects a numeric array, got dtype {x.dtype}.")
    dtype = x.dtype if x.dtype.kind == "f" else np.float32
    if data_format == "channels_last":
        axis = x.ndim - 1
    else:
        if x.ndim not in (3, 4):
            raise ValueError(f"channels_first input must be (3, H, W) or (N, 3, H, W); got shape {x.shape}.")
        axis = 0 if x.ndim == 3 else 1
    if x.ndim < 1 or x.shape[axis] != 3:
        raise ValueError(
            f"preprocess_input expects 3 colour channels on axis {axis} ({data_format}); got shape {x.shape}."
        )
    if axis == x.ndim - 1 and x.dtype in (np.uint8, np.float32) and x.flags.c_contiguous:
        # The usual case (decoded images, or float32 pixels): one multi-threaded pass in C++ with
        # the same float32 subtraction of the same means, so the same bits as the numpy line below.
        return _core.caffe_preprocess(x, np.asarray(CAFFE_BGR_MEAN, dtype=np.float32))
    mean_shape = [1] * x.ndim
    mean_shape[axis] = 3
    mean = np.asarray(CAFFE_BGR_MEAN, dtype=dtype).reshape(mean_shape)
    return np.flip(x, axis=axis).astype(dtype) - mean


@lru_cache(maxsize=1)
def _class_index() -> Dict[str, List[str]]:
    with open(CLASS_INDEX_FILE, "rb") as f:
        return json.load(f)


def decode_predictions(preds, top: int = 5) -> List[List[Tuple[str, str, float]]]:
    """Turns a (batch, 1000) array of ImageNet scores into, per image, the ``top`` classes as
    ``(wnid, class_name, score)``, best first, as Keras's ``decode_predictions`` does."""
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] != 1000:
        raise ValueError(
            "`decode_predictions` expects a batch of predictions (i.e. a 2D array of shape "
            f"(samples, 1000)). Received array with shape: {preds.shape}"
        )
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ValueError(f"`top` must be a positive integer, got {top!r}.")
    index = _class_index()
    results = []
    for pred in preds:
        best = np.argsort(pred, kind="stable")[::-1][:top]
        results.append([(index[str(i)][0], index[str(i)][1], pred[i]) for i in best])
    return results
