"""ImageNet weights: Keras's official files, found in Keras's cache or fastvgg's.

The file names and md5 hashes are Keras's own (``keras.applications.vgg16``/``vgg19``), so a
file Keras downloaded once is used as it is.
"""

from __future__ import annotations

import os
from typing import List

IMAGENET_FILES = {
    ("vgg16", True): ("vgg16_weights_tf_dim_ordering_tf_kernels.h5", "64373286793e3c8b2b4e3219cbf3544b"),
    ("vgg16", False): ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "6d6bbae143d832006294945121d1f1fc"),
    ("vgg19", True): ("vgg19_weights_tf_dim_ordering_tf_kernels.h5", "cbe5617147190e668d6c5d5026f83318"),
    ("vgg19", False): ("vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "253f8cb515780f3b799900260a226db6"),
}
IMAGENET_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications"


def weights_cache_dirs() -> List[str]:
    """Where ImageNet weights are looked for: Keras's cache first (a Keras user already has
    them there), then fastvgg's own."""
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    fastvgg_home = os.environ.get("FASTVGG_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "fastvgg")
    return [os.path.join(keras_home, "models"), fastvgg_home]


def imagenet_weights_path(architecture: str, include_top: bool) -> str:
    filename, _ = IMAGENET_FILES[(architecture, include_top)]
    candidates = [os.path.join(d, filename) for d in weights_cache_dirs()]
    for path in candidates:
        if os.path.isfile(path):
            return path
    url = f"{IMAGENET_BASE_URL}/{architecture}/{filename}"
    raise FileNotFoundError(
        f"The ImageNet weights for {architecture.upper()} ({filename}) are not on this machine, and "
        f"this version of fastvgg does not download them. Download {url} and put it at one of: "
        + ", ".join(candidates)
        + " (or pass its path as `weights`)."
    )
