"""fastvgg: Keras VGG16 and VGG19 inference on the CPU, without TensorFlow.

    import fastvgg
    model = fastvgg.VGG16("imagenet")
    probs = model.predict(x)          # x: NHWC batch

Numbers are computed by a C++ core (OpenMP; AVX-512, AVX2+FMA or plain C++, chosen at run
time) with the GIL released; this package holds the graph, the layer names and the weights.
"""

import os as _os

from . import _core, image
from .cuda import cuda_status
from ._core import __version__
from .download import WeightsDownloadError
from .imagenet import decode_predictions, preprocess_input
from .models import VGG16, VGG19, Model
from .saved_model import load_model

__all__ = [
    "VGG16",
    "VGG19",
    "Model",
    "load_model",
    "image",
    "WeightsDownloadError",
    "preprocess_input",
    "decode_predictions",
    "cuda_status",
    "set_num_threads",
    "get_num_threads",
    "__version__",
]


def set_num_threads(n: int) -> None:
    """Sets how many threads every later computation uses."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads expects an int, got {type(n).__name__}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    return _core.get_num_threads()


def _default_threads() -> int:
    configured = _os.environ.get("FASTVGG_NUM_THREADS")
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:
            raise ValueError(f"FASTVGG_NUM_THREADS must be a positive integer, got {configured!r}") from None
    try:
        return len(_os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return _os.cpu_count() or 1


_core.set_num_threads(_default_threads())


def __getattr__(name: str):
    # fastvgg.ray (and fastvgg.stream) load on first use, so `import fastvgg` never imports Ray.
    if name in ("ray", "stream"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastvgg' has no attribute {name!r}")
