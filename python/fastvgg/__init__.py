"""fastvgg: Keras VGG16 and VGG19 inference on the CPU, without TensorFlow.

    import fastvgg
    model = fastvgg.VGG16("imagenet")
    probs = model.predict(x)          # x: NHWC batch

Numbers are computed by a C++ core (OpenMP; AVX-512, AVX2+FMA or plain C++, chosen at run
time) with the GIL released; this package holds the graph, the layer names and the weights.
"""

import os as _os

# Threads waiting at a barrier sleep instead of spinning (libgomp spins for a while by
# default). On a machine shared with other busy processes (Ray actors, Spark or Dask workers,
# two fastvgg processes, image decoding) spinning threads take the cores the others need:
# measured on 2 cores, two concurrent VGG16 processes of 2 threads ran 5x slower each with
# spinning and 2x (the fair share) without; alone, not spinning costs 1-2%. A user's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins. libgomp reads them once, when it loads (with _core,
# just below), so this applies when fastvgg is the first library of the process to load it;
# the variable is removed again afterwards, so that other libraries (OpenVINO, a PyTorch with
# its own OpenMP) and child processes see the user's environment unchanged.
_WAIT_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ
if _WAIT_POLICY_SET_HERE:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
try:
    from . import _core  # noqa: E402 (loads libgomp, which reads the policy above)
finally:
    if _WAIT_POLICY_SET_HERE:
        del _os.environ["OMP_WAIT_POLICY"]

from . import image  # noqa: E402
from .cuda import cuda_status  # noqa: E402
from ._core import __version__  # noqa: E402
from .download import WeightsDownloadError  # noqa: E402
from .imagenet import decode_predictions, preprocess_input  # noqa: E402
from .models import VGG16, VGG19, Model  # noqa: E402
from .saved_model import load_model  # noqa: E402

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
