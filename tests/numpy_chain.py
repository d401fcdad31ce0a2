"""A plain numpy float64 executor for the layer chains fastvgg.keras_model reads: the yardstick
for the compiled chain. It shares nothing with the C++ kernels and computes every layer from
Keras's definitions: its own convolution and pooling loops, Keras's activation formulas, and
BatchNormalization / Normalization / Rescaling from the stored weights and config (not from the
scale and shift fastvgg derives)."""

import math

import numpy as np


def _erfc(x):
    """math.erfc element-wise, in float64 (the yardstick needs no scipy)."""
    x = np.asarray(x, dtype=np.float64)
    return np.asarray(np.frompyfunc(math.erfc, 1, 1)(x), dtype=np.float64).reshape(x.shape)


SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def activation(x, name, negative_slope=0.0, max_value=None, threshold=0.0):
    # exp overflows to inf for very negative inputs of sigmoid and swish; the result (0) is right.
    with np.errstate(over="ignore"):
        return _activation(np.asarray(x, dtype=np.float64), name, negative_slope, max_value, threshold)


def layer_activation(x, layer):
    """A LayerSpec's activation with its numbers."""
    return activation(x, layer.activation, layer.negative_slope, layer.max_value, layer.threshold)


def _activation(x, name, negative_slope, max_value, threshold):
    if name == "linear":
        return x
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if name == "tanh":
        return np.tanh(x)
    if name == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if name == "elu":
        return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))
    if name == "selu":
        return SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0.0)))
    if name == "gelu":
        return 0.5 * x * _erfc(-x / np.sqrt(2.0))  # 1 + erf(x / sqrt 2) without its cancellation
    if name in ("swish", "silu"):
        return x / (1.0 + np.exp(-x))
    if name == "softplus":
        return np.logaddexp(0.0, x)
    if name == "leaky_relu":  # tf.nn.leaky_relu: x > 0 ? x : slope * x
        return np.where(x > 0, x, negative_slope * x)
    if name == "softsign":
        return x / (1.0 + np.abs(x))
    if name == "exponential":
        return np.exp(x)
    if name == "mish":
        return x * np.tanh(np.logaddexp(0.0, x))
    if name == "hard_sigmoid":  # Keras 3's relu6(x + 3) / 6
        return np.clip((x + 3.0) / 6.0, 0.0, 1.0)
    if name == "hard_sigmoid_keras2":  # tf.keras's, with its float32 constant 0.2
        return np.clip(np.float64(np.float32(0.2)) * x + 0.5, 0.0, 1.0)
    if name == "hard_silu":
        return x * np.clip((x + 3.0) / 6.0, 0.0, 1.0)
    if name == "relu6":
        return np.clip(x, 0.0, 6.0)
    if name == "clipped_relu":  # Keras's ReLU(negative_slope, max_value, threshold), as its docs state it
        passed = np.where(x > threshold, x, 0.0)
        if max_value is not None:
            passed = np.clip(passed, 0.0, max_value)
        return passed - negative_slope * np.maximum(threshold - x, 0.0) if negative_slope else passed
    raise ValueError(f"no numpy activation {name!r}")


def conv(x, kernel, bias, same):
    """Cross-correlation, stride 1, 'same' (zero padding) or 'valid'; kernel HWIO."""
    k = kernel.shape[0]
    pad = k // 2 if same else 0
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, h, w, _ = x.shape
    out_h, out_w = h - k + 1, w - k + 1
    out = np.zeros((n, out_h, out_w, kernel.shape[3]))
    for dy in range(k):
        for dx in range(k):
            out += x[:, dy : dy + out_h, dx : dx + out_w, :] @ kernel[dy, dx].astype(np.float64)
    return out + (0.0 if bias is None else bias.astype(np.float64))


def pool2x2(x, mode, same):
    """Keras's 2x2 stride-2 pooling; 'same' pads only at the far edge, and the padding counts
    neither for the maximum nor for the average's divisor."""
    n, h, w, c = x.shape
    out_h, out_w = ((h + 1) // 2, (w + 1) // 2) if same else (h // 2, w // 2)
    fill = -np.inf if mode == "max" else 0.0
    padded = np.full((n, 2 * out_h, 2 * out_w, c), fill)
    used_h, used_w = min(h, 2 * out_h), min(w, 2 * out_w)
    padded[:, :used_h, :used_w] = x[:, :used_h, :used_w]
    windows = padded.reshape(n, out_h, 2, out_w, 2, c)
    if mode == "max":
        return windows.max(axis=(2, 4))
    counts = np.zeros((2 * out_h, 2 * out_w))
    counts[:used_h, :used_w] = 1.0
    divisor = counts.reshape(out_h, 2, out_w, 2).sum(axis=(1, 3))
    return windows.sum(axis=(2, 4)) / divisor[None, :, :, None]


def run_layer(layer, x):
    """One LayerSpec applied to a float64 batch; returns (output, output before activation)."""
    kind = layer.kind
    if kind in ("input", "identity", "merge"):  # a merge: its inputs were merged by run_chain
        return x, x
    if kind == "conv":
        kernel = layer.weights[0]
        bias = layer.weights[1] if layer.use_bias else None
        pre = conv(x, kernel, bias, layer.padding == "same")
        return layer_activation(pre, layer), pre
    if kind in ("max_pool", "avg_pool"):
        y = pool2x2(x, "max" if kind == "max_pool" else "avg", layer.padding == "same")
        return y, y
    if kind == "flatten":
        y = x.reshape(len(x), -1)
        return y, y
    if kind == "global_pool":
        y = x.mean(axis=(1, 2)) if layer.pool_mode == "avg" else x.max(axis=(1, 2))
        if layer.keepdims:
            y = y[:, None, None, :]
        return y, y
    if kind == "dense":
        pre = x @ layer.weights[0].astype(np.float64)
        if layer.use_bias:
            pre = pre + layer.weights[1].astype(np.float64)
        return layer_activation(pre, layer), pre
    if kind == "activation":
        return layer_activation(x, layer), x
    if kind == "upsample":  # nearest: each pixel repeated
        y = np.repeat(np.repeat(x, layer.size[0], axis=1), layer.size[1], axis=2)
        return y, y
    if kind == "prelu":  # Keras's relu(x) - alpha * relu(-x), alpha broadcast as Keras stores it
        alpha = layer.weights[0].astype(np.float64)
        y = np.maximum(x, 0.0) - alpha * np.maximum(-x, 0.0)
        return y, y
    if kind == "l2_normalize":  # Keras's UnitNormalization, with the file's Keras's epsilon
        inverse = np.minimum(1.0 / np.sqrt((x * x).sum(axis=1, keepdims=True)), layer.max_inverse_norm)
        return x * inverse, x
    if kind == "reverse_channels":
        return x[..., ::-1], x[..., ::-1]
    if kind == "affine":
        y = affine(layer, x)
        return y, y
    raise ValueError(f"no numpy op for {kind!r}")


def affine(layer, x):
    config = layer.config
    if layer.class_name == "BatchNormalization":
        values = dict(zip(layer.weight_names, (w.astype(np.float64) for w in layer.weights)))
        channels = x.shape[-1]
        gamma = values.get("gamma", np.ones(channels))
        beta = values.get("beta", np.zeros(channels))
        return (x - values["moving_mean"]) / np.sqrt(values["moving_variance"] + config.get("epsilon", 1e-3)) * gamma + beta
    if layer.class_name == "Rescaling":
        return x * np.asarray(config.get("scale", 1.0), dtype=np.float64) + np.asarray(config.get("offset", 0.0), dtype=np.float64)
    if layer.class_name == "Normalization":
        if layer.weights:
            values = dict(zip(layer.weight_names, (w.astype(np.float64) for w in layer.weights)))
            mean, variance = values["mean"].reshape(-1), values["variance"].reshape(-1)
        else:
            mean = np.asarray(config["mean"], dtype=np.float64).reshape(-1)
            variance = np.asarray(config["variance"], dtype=np.float64).reshape(-1)
        std = np.maximum(np.sqrt(variance), 1e-7)
        return mean + x * std if config.get("invert") else (x - mean) / std
    if layer.class_name == "Lambda":  # VGG's preprocess_input, Keras's caffe mode, written out
        return x[..., ::-1] - np.asarray([103.939, 116.779, 123.68], dtype=np.float32).astype(np.float64)
    if layer.class_name in ("Add", "Subtract", "Multiply", "TrueDivide", "Divide", "TFOpLambda"):
        # Arithmetic with a constant that lives in the layer's call, not its config: the parser's
        # reading of it is held to Keras by the tests that compare with Keras itself.
        return x * np.asarray(layer.scale, dtype=np.float64) + np.asarray(layer.shift, dtype=np.float64)
    raise ValueError(f"no numpy affine for {layer.class_name!r}")


def merge(arrays, how):
    """Keras's merge layers, in float64 (tensors of Keras's shapes)."""
    if how == "concatenate":
        return np.concatenate(arrays, axis=-1)
    if how == "subtract":
        return arrays[0] - arrays[1]
    if how == "add":
        return np.sum(arrays, axis=0)
    if how == "average":
        return np.mean(arrays, axis=0)
    if how == "multiply":
        return np.prod(arrays, axis=0)
    return (np.max if how == "maximum" else np.min)(arrays, axis=0)


def run_chain(spec, x, outputs=None):
    """Runs a ModelSpec's chain (or tree of chains) on a batch in float64; returns the last
    output, or a dict of the named outputs (``name`` or ``name:preact``)."""
    y = np.asarray(x, dtype=np.float64)
    found = {}
    for index, layer in enumerate(spec.layers):
        if layer.name in spec.merge_inputs:
            y = merge([found[name] for name in spec.merge_inputs[layer.name]], layer.merge)
        elif index > 0 and spec.branch_inputs:  # a tree: this layer may read another than the one before
            y = found[spec.input_of(index)]
        y, pre = run_layer(layer, y)
        found[layer.name] = y
        found[layer.name + ":preact"] = pre
    if outputs is None:
        return y
    return {name: found[name] for name in outputs}
