"""Layer objects: names, shapes and weights of a model, as Keras users know them.

A layer holds no numbers of its own. Its weights live, packed for the kernels, in the
model's executor; ``get_weights`` and ``set_weights`` convert on the way out and in.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ._core import CpuExecutor

Shape = Tuple[Optional[int], ...]


class Layer:
    """One layer of a VGG model. ``output_shape`` includes the batch dimension as ``None``."""

    class_name = "Layer"
    # A loaded model that starts with preprocess_input: its InputLayer reverses the channels of
    # each batch before the core runs it, and identity layers before that reversal give the
    # input as it came (saved_model._reverse_channels_on_input, Model._run).
    reverses_channels = False
    echoes_input = False
    # A loaded ZeroPadding2D that runs inside the convolution named here: its padded image is
    # never computed, so it cannot be a model's output (keras_model._fold_zero_padding).
    folded_into = ""
    # Keras's layer.trainable as the model file saved it (informational: fastvgg never trains).
    trainable = True

    def __init__(self, name: str, input_shape: Shape, output_shape: Shape) -> None:
        self.name = name
        self.input_shape = input_shape
        self.output_shape = output_shape
        # Set by the model: the executor that runs this layer, the layer's index in its graph,
        # and the list of layers it was built in (what a Model(inputs, outputs) is cut from).
        self._executor: Optional["CpuExecutor"] = None
        self._index: Optional[int] = None
        self._graph: Optional[List["Layer"]] = None
        # On the input layer of a loaded model with heads on several branches: what runs them
        # (saved_model.Branches); None for a chain.
        self._branches = None

    @property
    def output(self) -> "LayerOutput":
        """This layer's output as a symbolic tensor, for ``fastvgg.Model(inputs, outputs)``."""
        return LayerOutput(self)

    def weight_shapes(self) -> List[Tuple[int, ...]]:
        """Shapes of the arrays ``get_weights`` returns, in Keras's order (kernel, bias)."""
        return []

    def count_params(self) -> int:
        return int(sum(np.prod(s) for s in self.weight_shapes()))

    def count_non_trainable_params(self) -> int:
        """The parameters Keras's summary calls non-trainable (a built-in VGG's are all trainable)."""
        return 0

    def get_weights(self) -> List[np.ndarray]:
        if not self.weight_shapes():
            return []
        kernel, bias = self._executor.get_weights(self._index)
        return [kernel, bias]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        expected = self.weight_shapes()
        if len(weights) != len(expected):
            raise ValueError(
                f"Layer {self.name!r} expects {len(expected)} weight arrays "
                f"(kernel and bias), got {len(weights)}."
            )
        arrays = [_float_weights(self.name, w, shape) for w, shape in zip(weights, expected)]
        if arrays:
            with self._executor.updating():
                self._assign(*arrays)

    def _assign(self, kernel, bias) -> None:  # pragma: no cover
        """Packs already checked weights into the executor. ``kernel`` may be a numpy array or
        an h5py dataset of the right shape; it is read slice by slice where that saves memory."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.class_name} name={self.name!r} output_shape={self.output_shape}>"


class LayerOutput:
    """A layer's output in a model's graph: what ``layer.output`` and ``model.input`` give, as
    Keras's symbolic tensors do. It holds no numbers; ``fastvgg.Model`` takes it to choose
    which outputs ``predict`` returns."""

    def __init__(self, layer: Layer, before_activation: bool = False) -> None:
        self.layer = layer
        self.before_activation = before_activation

    @property
    def shape(self) -> Shape:
        return self.layer.output_shape

    @property
    def dtype(self) -> str:
        return "float32"

    @property
    def name(self) -> str:
        return self.layer.name + (PREACT_SUFFIX if self.before_activation else "")

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, LayerOutput)
            and other.layer is self.layer
            and other.before_activation == self.before_activation
        )

    def __hash__(self) -> int:
        return hash((id(self.layer), self.before_activation))

    def __repr__(self) -> str:
        return f"<LayerOutput name={self.name!r} shape={self.shape} dtype=float32>"


# Appended to a convolution's name, it asks for the layer's sums before its ReLU.
PREACT_SUFFIX = ":preact"


def _float_weights(layer: str, array, shape: Tuple[int, ...]) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind != "f":
        raise TypeError(
            f"Layer {layer!r}: weights must be floating point, got dtype {array.dtype}."
        )
    if tuple(array.shape) != tuple(shape):
        raise ValueError(
            f"Layer {layer!r}: expected a weight of shape {tuple(shape)}, "
            f"found shape {tuple(array.shape)}."
        )
    return array


def _float32(array, layer_name: str) -> np.ndarray:
    """Contiguous float32 weights; warns when they hold NaN or Inf, which every output they
    reach would then carry."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    # A float32 sum is finite whenever the values are (but for overflow, which the exact
    # check then clears), and costs a fraction of np.isfinite's temporary array.
    with np.errstate(invalid="ignore", over="ignore"):
        suspicious = not np.isfinite(array.sum())
    if suspicious and not np.isfinite(array).all():
        warnings.warn(
            f"Layer {layer_name!r}: its weights contain NaN or infinite values; every output they reach "
            "will be NaN or infinite. Check the file or arrays they came from.",
            RuntimeWarning,
            stacklevel=4,
        )
    return array


class InputLayer(Layer):
    class_name = "InputLayer"


class Conv2D(Layer):
    """3x3 convolution, stride 1, 'same' padding, ReLU: the only convolution VGG has."""

    class_name = "Conv2D"

    def __init__(self, name: str, input_shape: Shape, filters: int) -> None:
        super().__init__(name, input_shape, input_shape[:-1] + (filters,))
        self.filters = filters
        self.kernel_size = (3, 3)
        self.strides = (1, 1)
        self.padding = "same"
        self.activation = "relu"

    def weight_shapes(self):
        return [(3, 3, self.input_shape[-1], self.filters), (self.filters,)]

    @property
    def preact_output(self) -> LayerOutput:
        """The convolution's output before its ReLU (bias added), which Keras cannot return:
        perceptual and style losses often use it."""
        return LayerOutput(self, before_activation=True)

    def _assign(self, kernel, bias):
        self._executor.set_conv3x3_weights(self._index, _float32(kernel[()], self.name), _float32(bias[()], self.name))


class MaxPooling2D(Layer):
    class_name = "MaxPooling2D"

    def __init__(self, name: str, input_shape: Shape) -> None:
        n, h, w, c = input_shape
        half = lambda d: None if d is None else d // 2  # noqa: E731
        super().__init__(name, input_shape, (n, half(h), half(w), c))
        self.pool_size = (2, 2)
        self.strides = (2, 2)
        self.padding = "valid"


class Flatten(Layer):
    class_name = "Flatten"

    def __init__(self, name: str, input_shape: Shape) -> None:
        n, h, w, c = input_shape
        super().__init__(name, input_shape, (n, h * w * c))


class GlobalAveragePooling2D(Layer):
    class_name = "GlobalAveragePooling2D"
    mode = "avg"

    def __init__(self, name: str, input_shape: Shape) -> None:
        super().__init__(name, input_shape, (input_shape[0], input_shape[-1]))


class GlobalMaxPooling2D(GlobalAveragePooling2D):
    class_name = "GlobalMaxPooling2D"
    mode = "max"


class Dense(Layer):
    class_name = "Dense"

    # Dense kernels are written in slices of this many rows: fc1 is 411 MB in float32 and
    # the loader should never hold a second copy of it.
    rows_per_slice = 512

    def __init__(self, name: str, input_shape: Shape, units: int, activation: Optional[str]) -> None:
        super().__init__(name, input_shape, (input_shape[0], units))
        self.units = units
        self.activation = activation or "linear"

    def weight_shapes(self):
        return [(self.input_shape[-1], self.units), (self.units,)]

    def _assign(self, kernel, bias):
        for first in range(0, kernel.shape[0], self.rows_per_slice):
            rows = _float32(kernel[first : first + self.rows_per_slice], self.name)
            self._executor.set_dense_kernel_rows(self._index, first, rows)
        self._executor.set_dense_bias(self._index, _float32(bias[()], self.name))
