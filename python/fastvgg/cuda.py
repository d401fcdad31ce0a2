"""The optional CUDA backend: whether it can be used here, and its executor.

``fastvgg._cuda`` exists only in builds made with ``FASTVGG_CUDA=ON`` (see cmake/cuda.cmake).
It is imported lazily, the first time something here asks for it, and every failure (module
not built, no driver, no GPU, a GPU too old) becomes the reason ``cuda_status()`` returns:
nothing here raises unless a caller insists on CUDA (``require_cuda``, ``device="cuda"``).
"""

from __future__ import annotations

import importlib
import re
import threading
from typing import List, Optional, Sequence, Tuple

import numpy as np

DEVICES = ("cpu", "cuda", "auto")

_lock = threading.Lock()
_loaded = False
_module = None
_import_problem: Optional[str] = None


def _cuda_module():
    """fastvgg._cuda, or None with the reason in _import_problem. Imported once."""
    global _loaded, _module, _import_problem
    with _lock:
        if not _loaded:
            try:
                module = importlib.import_module(__package__ + "._cuda")
            except ModuleNotFoundError:
                module = None
                _import_problem = (
                    "this fastvgg was built without CUDA; rebuild it on a machine with nvcc "
                    "(FASTVGG_CUDA=ON pip install fastvgg, or -C cmake.define.FASTVGG_CUDA=ON)"
                )
            except (ImportError, OSError) as error:
                module = None
                _import_problem = f"fastvgg._cuda is installed but cannot be loaded: {error}"
            _module, _loaded = module, True
        return _module


def cuda_built() -> bool:
    """Whether this installation includes the CUDA backend (usable or not)."""
    return _cuda_module() is not None


def cuda_status() -> Tuple[bool, str]:
    """``(True, "<GPU name, compute capability, driver>")`` when the CUDA backend can run here,
    else ``(False, "<why not>")``. Never raises."""
    module = _cuda_module()
    if module is None:
        return False, str(_import_problem)
    try:
        usable, detail = module.status()
    except Exception as error:  # the runtime itself failed; report it, never crash the caller
        return False, f"the CUDA runtime failed to answer: {error}"
    return bool(usable), str(detail)


def require_cuda() -> None:
    """Raises RuntimeError, with cuda_status()'s reason, unless a GPU can be used."""
    usable, reason = cuda_status()
    if not usable:
        raise RuntimeError(
            f"device='cuda' needs a usable NVIDIA GPU, but {reason}. Use device='cpu', or "
            "device='auto' to fall back to the CPU."
        )


def resolve_device(device: str) -> str:
    """'cpu' or 'cuda' for a model's ``device=`` argument ('auto': the GPU when usable)."""
    if device not in DEVICES:
        raise ValueError(f"`device` must be one of {DEVICES}. Received: device={device!r}")
    if device == "auto":
        return "cuda" if cuda_status()[0] else "cpu"
    if device == "cuda":
        require_cuda()
    return device


def new_executor(ops: List[dict], input_channels: int, layer_names: Optional[Sequence[str]] = None):
    """A bare fastvgg._cuda.CudaExecutor for a graph described as _core.Graph.describe() lists it.

    A graph the GPU executor cannot run raises ValueError naming the layer (``layer_names[i]``
    for op i, when given) and saying to use device="cpu"."""
    require_cuda()
    try:
        return _cuda_module().CudaExecutor(ops, input_channels)
    except ValueError as error:
        raise ValueError(_unsupported_on_gpu(str(error), layer_names)) from None


_OP_ERROR = re.compile(r"^op (\d+): (.*)$", re.DOTALL)


def _unsupported_on_gpu(message: str, layer_names: Optional[Sequence[str]]) -> str:
    """The compiled module's "op <i>: <reason>" as the model's words: which layer, and what to do."""
    match = _OP_ERROR.match(message)
    if match is None:
        what, reason = "this model", message
    else:
        index, reason = int(match.group(1)), match.group(2)
        names = list(layer_names or [])
        what = f"layer {names[index]}" if index < len(names) else f"layer {index} of the graph"
    return (
        f"{what} cannot run on the GPU: {reason}. Use device='cpu' for this model (the CPU executor runs every "
        "layer fastvgg supports)."
    )


class CudaExecutor:
    """The CUDA executor behind the CPU executor's interface, for a model's ``_executor``:
    built from a ``_core.Graph`` (kept as ``.graph``, as the CPU executor has it), every
    other attribute (set_conv3x3_weights, set_conv_weights, set_affine, set_prelu, set_dense_kernel_rows,
    set_dense_bias, get_weights, weights_loaded, updating, forward, forward_into,
    weights_nbytes, device) is the compiled executor's. Both precisions run the same fp32
    kernels (no Winograd on the GPU).

    ``layer_names`` (one per graph op, e.g. "'dense_1' (Dense)") name the layer in the error
    raised for a graph the GPU cannot run."""

    PRECISIONS = ("fast", "highest")

    def __init__(self, graph, precision: str = "fast", layer_names: Optional[Sequence[str]] = None) -> None:
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision {precision!r} is not available on the GPU; use one of {self.PRECISIONS}")
        self.graph = graph
        self.precision = precision
        self._impl = new_executor(graph.describe(), graph.input_channels, layer_names)

    def __getattr__(self, name):
        return getattr(self._impl, name)


def layer_labels(layers) -> List[str]:
    """How errors name a model's computed layers (the input layer left out): "'name' (Class)"."""
    return [f"{layer.name!r} ({layer.class_name})" for layer in layers]


# Models ------------------------------------------------------------------------------------
def describe_model(model) -> Tuple[List[dict], int]:
    """(ops, input_channels) of a fastvgg Model, in _core.Graph.describe()'s form: the ops its
    layers run in the model's graph (a sub-model built by Model(inputs, outputs) describes its
    own layers, a prefix of the graph). Every model's layers, VGG16/VGG19's and load_model's,
    were built from that graph, one op each."""
    if getattr(model, "_branches", None) is not None:
        raise ValueError(
            f"Model {model.name!r} has heads that split from one trunk: it runs on one executor per chain, not one "
            "graph. Load it with device='cuda' (fastvgg.load_model(path, device='cuda')) to run it on the GPU."
        )
    described = model._executor.graph.describe()
    ops = [dict(described[layer._index]) for layer in _computed_layers(model)]
    return ops, int(model.input_shape[-1])


def _computed_layers(model):
    from . import layers as L

    return [layer for layer in model.layers if not isinstance(layer, L.InputLayer)]


def executor_for_model(model):
    """A CudaExecutor holding a copy of a fastvgg Model's weights (uploaded once, here).
    Its op i is the model's i-th layer after the input layer."""
    ops, channels = describe_model(model)
    layers = _computed_layers(model)
    executor = new_executor(ops, channels, layer_labels(layers))
    source = model._executor
    for index, layer in enumerate(layers):
        kind = ops[index]["kind"]
        if kind not in ("conv3x3", "conv", "dense", "affine", "prelu"):
            continue
        # The executor's own arrays: a convolution's kernel and bias (a zero bias where Keras has
        # none), an affine map's scale and shift (what BatchNormalization and friends reduce to),
        # a prelu's alpha (and its zero bias).
        kernel, bias = (np.ascontiguousarray(w, dtype=np.float32) for w in source.get_weights(layer._index))
        if kind in ("conv3x3", "conv"):
            executor.set_conv_weights(index, kernel, bias)
        elif kind == "affine":
            executor.set_affine(index, kernel, bias)
        elif kind == "prelu":
            executor.set_prelu(index, kernel)
        else:
            executor.set_dense_kernel_rows(index, 0, kernel)
            executor.set_dense_bias(index, bias)
    return executor
