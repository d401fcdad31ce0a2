"""Plain-numpy float64 reference of the Keras VGG16/VGG19 forward pass.

This module is deliberately independent of fastvgg and of TensorFlow: it is
the oracle the C++ core is checked against, so it favours obviously-correct
code over speed. Everything is computed in float64 so that, compared with a
float32 implementation, nearly all of the observed difference belongs to the
implementation under test.

Conventions follow Keras exactly: NHWC activations, HWIO conv kernels,
(in, out) dense kernels, and a channels-last flatten before ``fc1``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

# Number of 3x3 convolutions in each of the five blocks.
VGG_BLOCKS = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
BLOCK_FILTERS = (64, 128, 256, 512, 512)
FC_UNITS = 4096
# Five 2x2/2 max-pools shrink each spatial dim by this factor (with flooring).
TOTAL_STRIDE = 32

GLOBAL_POOL_LAYERS = {
    "avg": "global_average_pooling2d",
    "max": "global_max_pooling2d",
}

Weights = Dict[str, Tuple[np.ndarray, np.ndarray]]


def _check_depth(depth: int) -> Tuple[int, ...]:
    try:
        return VGG_BLOCKS[depth]
    except KeyError:
        raise ValueError(f"depth must be one of {sorted(VGG_BLOCKS)}, got {depth!r}") from None


def _check_pooling(include_top: bool, pooling: Optional[str]) -> Optional[str]:
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
    # Keras ignores `pooling` when the classifier head is present.
    return None if include_top else pooling


def conv_layer_specs(depth: int) -> List[Tuple[str, int]]:
    """(name, filters) of every conv layer, in order."""
    specs = []
    for block, (n_convs, filters) in enumerate(zip(_check_depth(depth), BLOCK_FILTERS), 1):
        specs.extend((f"block{block}_conv{i}", filters) for i in range(1, n_convs + 1))
    return specs


def layer_names(depth: int, include_top: bool = True, pooling: Optional[str] = None) -> List[str]:
    """Names of the Keras model's layers in order, without the input layer."""
    pooling = _check_pooling(include_top, pooling)
    names = []
    for block, n_convs in enumerate(_check_depth(depth), 1):
        names.extend(f"block{block}_conv{i}" for i in range(1, n_convs + 1))
        names.append(f"block{block}_pool")
    if include_top:
        names.extend(["flatten", "fc1", "fc2", "predictions"])
    elif pooling is not None:
        names.append(GLOBAL_POOL_LAYERS[pooling])
    return names


def _glorot_uniform(rng: np.random.Generator, shape: Tuple[int, ...], fan_in: int, fan_out: int) -> np.ndarray:
    limit = np.float32(np.sqrt(6.0 / (fan_in + fan_out)))
    # Drawn directly in float32 and scaled in place: fc1 alone is ~100M
    # values at 224x224, and a float64 detour would double the peak memory.
    kernel = rng.random(shape, dtype=np.float32)
    kernel *= 2 * limit
    kernel -= limit
    return kernel


def _bias(rng: np.random.Generator, units: int, bias_scale: float) -> np.ndarray:
    if bias_scale == 0.0:
        return np.zeros(units, dtype=np.float32)
    return rng.uniform(-bias_scale, bias_scale, units).astype(np.float32)


def random_weights(
    depth: int,
    include_top: bool = True,
    input_hw: Tuple[int, int] = (224, 224),
    classes: int = 1000,
    in_channels: int = 3,
    seed: int = 0,
    bias_scale: float = 0.0,
) -> Weights:
    """Random float32 weights shaped like the Keras model's.

    Kernels use Keras's default Glorot-uniform init, which keeps activations
    in a realistic range through all 16/19 layers. Keras initialises biases
    to zero, which would leave bias handling untested, so ``bias_scale > 0``
    draws them from uniform(-bias_scale, bias_scale) instead.
    """
    rng = np.random.default_rng(seed)
    weights: Weights = {}
    cin = in_channels
    for name, cout in conv_layer_specs(depth):
        kernel = _glorot_uniform(rng, (3, 3, cin, cout), fan_in=9 * cin, fan_out=9 * cout)
        weights[name] = (kernel, _bias(rng, cout, bias_scale))
        cin = cout
    if include_top:
        height, width = input_hw
        flat = (height // TOTAL_STRIDE) * (width // TOTAL_STRIDE) * BLOCK_FILTERS[-1]
        if flat == 0:
            raise ValueError(f"input {input_hw} is too small for the classifier head")
        for name, rows, cols in (
            ("fc1", flat, FC_UNITS),
            ("fc2", FC_UNITS, FC_UNITS),
            ("predictions", FC_UNITS, classes),
        ):
            kernel = _glorot_uniform(rng, (rows, cols), fan_in=rows, fan_out=cols)
            weights[name] = (kernel, _bias(rng, cols, bias_scale))
    return weights


# --------------------------------------------------------------------------
# Layer primitives (float64, NHWC)
# --------------------------------------------------------------------------


def conv3x3_same_relu(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """3x3 stride-1 'same' convolution (zero padding) + bias + ReLU.

    Written as a sum of nine shifted matmuls rather than im2col: the result
    is the same cross-correlation Keras computes, but peak memory stays at a
    few activation-sized buffers instead of a 9x-wide patch matrix.
    """
    n, h, w, cin = x.shape
    if kernel.shape[:3] != (3, 3, cin):
        raise ValueError(f"kernel {kernel.shape} does not fit input with {cin} channels")
    k = np.asarray(kernel, dtype=np.float64)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.empty((n, h, w, k.shape[3]), dtype=np.float64)
    out[...] = np.asarray(bias, dtype=np.float64)
    flat_out = out.reshape(-1, k.shape[3])
    for dy in range(3):
        for dx in range(3):
            # One big 2-D matmul per tap; a 4-D strided view would make numpy
            # loop over tiny per-row matmuls instead.
            tap = np.ascontiguousarray(padded[:, dy : dy + h, dx : dx + w, :])
            flat_out += tap.reshape(-1, cin) @ k[dy, dx]
    return np.maximum(out, 0.0, out=out)


def max_pool_2x2(x: np.ndarray) -> np.ndarray:
    """2x2 stride-2 'valid' max-pool: odd trailing rows/cols are dropped."""
    n, h, w, c = x.shape
    ho, wo = h // 2, w // 2
    windows = x[:, : 2 * ho, : 2 * wo, :].reshape(n, ho, 2, wo, 2, c)
    return windows.max(axis=(2, 4))


def dense(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, rows_per_chunk: int = 4096) -> np.ndarray:
    """x @ kernel + bias in float64 without materialising a float64 kernel.

    fc1's kernel is ~400 MB in float32; converting it whole would add ~800 MB
    more, so it is promoted a slab of rows at a time.
    """
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"dense input has {x.shape[-1]} features, kernel expects {kernel.shape[0]}")
    out = np.zeros((x.shape[0], kernel.shape[1]), dtype=np.float64)
    for start in range(0, kernel.shape[0], rows_per_chunk):
        stop = start + rows_per_chunk
        out += x[:, start:stop] @ np.asarray(kernel[start:stop], dtype=np.float64)
    out += np.asarray(bias, dtype=np.float64)
    return out


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    # Subtracting the row max keeps exp() from overflowing on large logits.
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def _classifier(activation: Union[str, None]):
    if activation == "softmax":
        return softmax
    if activation in (None, "linear"):
        return lambda z: z
    raise ValueError(f"classifier_activation must be 'softmax', 'linear' or None, got {activation!r}")


# --------------------------------------------------------------------------
# Whole network
# --------------------------------------------------------------------------


def forward(
    x: np.ndarray,
    weights: Weights,
    depth: int,
    include_top: bool = True,
    pooling: Optional[str] = None,
    classifier_activation: Union[str, None] = "softmax",
    outputs: Optional[Iterable[str]] = None,
) -> Union[np.ndarray, Dict[str, np.ndarray]]:
    """Run the VGG network on NHWC input ``x`` in float64.

    With ``outputs=None`` the final layer's output is returned. Given layer
    names, a dict of those layers' outputs is returned instead, and the
    network is only evaluated up to the deepest one requested.
    """
    pooling = _check_pooling(include_top, pooling)
    activate = _classifier(classifier_activation)
    names = layer_names(depth, include_top, pooling)

    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"expected NHWC input, got shape {x.shape}")

    if outputs is None:
        wanted: Sequence[str] = ()
        last = len(names) - 1
    else:
        wanted = list(outputs)
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; this model has {names}")
        last = max((names.index(name) for name in wanted), default=-1)

    results: Dict[str, np.ndarray] = {}
    for name in names[: last + 1]:
        if "_conv" in name:
            x = conv3x3_same_relu(x, *weights[name])
        elif name.endswith("_pool"):
            x = max_pool_2x2(x)
        elif name == "flatten":
            # NHWC is already (h, w, c)-major, which is Keras's flatten order.
            x = x.reshape(x.shape[0], -1)
        elif name in ("fc1", "fc2"):
            x = relu(dense(x, *weights[name]))
        elif name == "predictions":
            x = activate(dense(x, *weights[name]))
        elif name == GLOBAL_POOL_LAYERS["avg"]:
            x = x.mean(axis=(1, 2))
        elif name == GLOBAL_POOL_LAYERS["max"]:
            x = x.max(axis=(1, 2))
        else:  # pragma: no cover - layer_names() and this loop disagree
            raise AssertionError(f"no implementation for layer {name!r}")
        if name in wanted:
            results[name] = x

    return x if outputs is None else results
