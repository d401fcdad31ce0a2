"""VGG16 and VGG19 as Keras defines them, run by the compiled core.

The architecture is data: five blocks of 3x3 convolutions with 64, 128, 256, 512, 512
filters, each closed by a 2x2 max-pool, then either the classifier top (flatten, fc1, fc2,
predictions) or optional global pooling. Argument checks and their messages follow
``keras.applications`` so that code moving from Keras fails (or not) the same way.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._progress import progress_bar
from .layers import (
    PREACT_SUFFIX,
    Conv2D,
    _float_weights,
    Dense,
    Flatten,
    GlobalAveragePooling2D,
    GlobalMaxPooling2D,
    InputLayer,
    Layer,
    LayerOutput,
    MaxPooling2D,
)

CONVS_PER_BLOCK = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
BLOCK_FILTERS = (64, 128, 256, 512, 512)
TOP_LAYERS = ("flatten", "fc1", "fc2", "predictions")
DEFAULT_SIZE = 224
MIN_SIZE = 32  # five 2x2 pools must leave at least one pixel

# What the kernels can apply after the last dense layer; None means no activation, as in Keras.
CLASSIFIER_ACTIVATIONS = {None: "linear", "linear": "linear", "softmax": "softmax", "relu": "relu"}

WeightsArg = Union[None, str, "os.PathLike[str]"]

# The arithmetic a model runs with (see VGG16's docstring); "fast" is float32 with Winograd.
PRECISIONS = ("fast", "highest", "bf16", "bf16x3")


class Model:
    """A VGG network, or a part of one: its layers in order, the outputs it returns, ``predict``.

    :func:`VGG16` and :func:`VGG19` build whole models. As with Keras's functional API, a
    model can also be cut from another one's tensors; it shares the layers and weights::

        base = fastvgg.VGG16(None, include_top=False)
        features = fastvgg.Model(inputs=base.input,
                                 outputs=[base.get_layer("block3_conv3").output,
                                          base.get_layer("block4_pool").output])

    ``outputs`` may be one tensor, a list or tuple, or a dict (``predict`` then returns the same
    structure). A convolution's ``preact_output`` is its output before the ReLU.
    """

    def __init__(self, inputs, outputs, name: Optional[str] = None) -> None:
        input_tensor = _the_input(inputs)
        graph = input_tensor.layer._graph
        self._output_structure = outputs
        self._output_list = _output_list(outputs)
        for tensor in self._output_list:
            if tensor.layer._graph is not graph:
                raise ValueError(
                    f"Output {tensor.name!r} is not connected to the inputs: it belongs to another model. "
                    "Take inputs and outputs from the same model."
                )
            _check_computed(tensor.layer)
        self._executor = input_tensor.layer._executor
        # A loaded model whose heads split from one trunk runs on several executors, one per
        # chain; its runner (set on its input layer) knows which layers each output needs.
        self._branches = input_tensor.layer._branches
        if self._branches is not None:
            self.layers: List[Layer] = self._branches.layers_for(self._output_list)
        else:
            deepest = max(graph.index(tensor.layer) for tensor in self._output_list)
            self.layers = graph[: deepest + 1]
        self.name = name if name is not None else "functional"

    # Keras's attribute names -------------------------------------------------------------
    @property
    def input(self) -> LayerOutput:
        return self.layers[0].output

    @property
    def inputs(self) -> List[LayerOutput]:
        return [self.input]

    @property
    def outputs(self) -> List[LayerOutput]:
        return list(self._output_list)

    @property
    def output(self):
        return self._output_structure

    @property
    def input_shape(self) -> Tuple[Optional[int], ...]:
        return self.layers[0].output_shape

    @property
    def output_shape(self):
        return _map_structure(self._output_structure, lambda tensor: tensor.shape)

    def get_layer(self, name: Optional[str] = None, index: Optional[int] = None) -> Layer:
        if (name is None) == (index is None):
            raise ValueError("Provide either a layer name or a layer index, not both or neither.")
        if index is not None:
            if not -len(self.layers) <= index < len(self.layers):
                raise ValueError(f"Index {index} is out of range: the model has {len(self.layers)} layers.")
            return self.layers[index]
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ValueError(
            f"No such layer: {name!r}. Existing layers are: {[layer.name for layer in self.layers]}."
        )

    def count_params(self) -> int:
        return sum(layer.count_params() for layer in self.layers)

    def get_weights(self) -> List[np.ndarray]:
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        weighted = [layer for layer in self.layers if layer.weight_shapes()]
        expected = sum(len(layer.weight_shapes()) for layer in weighted)
        if len(weights) != expected:
            raise ValueError(f"The model expects {expected} weight arrays, got {len(weights)}.")
        # Check every array before writing any, so a bad one leaves the model as it was.
        it = iter(weights)
        checked = [
            (layer, [_float_weights(layer.name, next(it), shape) for shape in layer.weight_shapes()])
            for layer in weighted
        ]
        # Predictions on other threads wait until every layer holds its new weights.
        with self._updating():
            for layer, arrays in checked:
                layer._assign(*arrays)

    def load_weights(self, filepath: Union[str, "os.PathLike[str]"]) -> None:
        """Loads weights from a Keras HDF5 file, matched to this model's layers by name."""
        from .weights import load_weights

        # Predictions on other threads wait until every layer holds the file's weights.
        with self._updating():
            load_weights(self, filepath)

    def _updating(self):
        """Holds predictions on other threads off while weights change (on every executor)."""
        return self._executor.updating() if self._branches is None else self._branches.updating()

    # Inference ----------------------------------------------------------------------------
    def predict(self, x, batch_size: int = 32, verbose: Union[int, str] = 0):
        """Runs the model on an NHWC batch and returns float32 numpy output(s), structured as
        the model's outputs (one array, a list, or a dict).

        ``x`` may have any integer or floating dtype and any memory layout; it is never
        modified. The batch is processed ``batch_size`` images at a time, so memory stays
        bounded whatever the batch. ``verbose=1`` shows a progress bar over the batches
        ("auto" shows it when stderr is a terminal); unlike Keras, the default is quiet.
        """
        # _map_structure visits the tensors in _output_list's order: one array for each.
        results = iter(self._run(x, self._output_list, batch_size, verbose))
        return _map_structure(self._output_structure, lambda tensor: next(results))

    def extract(self, x, layers: Sequence[str], batch_size: int = 32, verbose: Union[int, str] = 0) -> Dict[str, np.ndarray]:
        """Outputs of several layers in one forward pass, as ``{name: array}``.

        The pass stops at the deepest layer asked for. A convolution's name followed by
        ``":preact"`` (e.g. ``"block5_conv4:preact"``) gives its output before the ReLU.
        """
        if isinstance(layers, str):
            layers = [layers]
        names = list(dict.fromkeys(layers))
        if not names:
            raise ValueError("`layers` is empty: name at least one layer, e.g. layers=['block4_pool'].")
        tensors = [self._named_output(name) for name in names]
        return dict(zip(names, self._run(x, tensors, batch_size, verbose)))

    def _named_output(self, name) -> LayerOutput:
        if not isinstance(name, str):
            raise TypeError(f"Layer names must be strings, got {name!r}.")
        layer_name, preact = (name[: -len(PREACT_SUFFIX)], True) if name.endswith(PREACT_SUFFIX) else (name, False)
        layer = self.get_layer(layer_name)
        _check_computed(layer)
        if not preact:
            return layer.output
        if not isinstance(layer, Conv2D):
            raise ValueError(
                f"{name!r}: only convolution layers have a pre-activation output; {layer_name!r} is a "
                f"{layer.class_name}. Use a name like 'block5_conv3{PREACT_SUFFIX}'."
            )
        return layer.preact_output

    def _run(self, x, tensors: Sequence[LayerOutput], batch_size, verbose) -> List[np.ndarray]:
        x = self._checked_input(x)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        show_progress = _progress_wanted(verbose)
        batch_size = int(batch_size)
        count, height, width = x.shape[:3]
        # The input layer's "output" is the input itself (so are those of identity layers before a
        # channel reversal); every other tensor comes from the core.
        # Each tensor once (the core writes each output once); a tensor asked for twice comes
        # back as two arrays, as Keras's does.
        unique = list(dict.fromkeys(tensors))
        echoed = [t for t in unique if isinstance(t.layer, InputLayer) or t.layer.echoes_input]
        computed = [t for t in unique if t not in echoed]
        # A model that starts with preprocess_input reverses the input's channels (RGB to BGR) first.
        reverse_channels = self.layers[0].reverses_channels
        shapes = self._core_shapes(computed, height, width)
        results = {t: np.empty((count,) + shapes[t], dtype=np.float32) for t in computed}
        results.update({t: np.empty(x.shape, dtype=np.float32) for t in echoed})
        batches = range(0, count, batch_size)
        with progress_bar(len(batches), unit="batch", desc=self.name, enabled=show_progress) as bar:
            for start in batches:
                stop = min(start + batch_size, count)
                chunk = np.ascontiguousarray(x[start:stop], dtype=np.float32)
                if computed:
                    # Slices along the batch axis of C-contiguous arrays are C-contiguous: the
                    # core writes each output straight into the array predict returns.
                    core_input = np.ascontiguousarray(chunk[..., ::-1]) if reverse_channels else chunk
                    outputs = [(t, results[t][start:stop]) for t in computed]
                    if self._branches is None:
                        self._executor.forward_into(
                            core_input, [(t.layer._index, t.before_activation, out) for t, out in outputs])
                    else:
                        self._branches.forward_into(core_input, outputs)
                for tensor in echoed:
                    results[tensor][start:stop] = chunk
                bar.update(1)
        given = set()
        arrays = []
        for t in tensors:
            arrays.append(results[t].copy() if t in given else results[t])
            given.add(t)
        return arrays

    def _core_shapes(self, tensors, height: int, width: int) -> Dict[LayerOutput, Tuple[int, ...]]:
        """Each tensor's shape (no batch axis) as the core writes it, for an input of this size."""
        if self._branches is not None:
            return self._branches.core_shapes(tensors, height, width)
        shapes = self._executor.graph.output_shapes(height, width)
        return {t: tuple(shapes[t.layer._index]) for t in tensors}

    def _checked_input(self, x) -> np.ndarray:
        if isinstance(x, dict):
            # Keras takes {input name: array} for every model (and needs it for a model built on
            # a dict of inputs); fastvgg's models have one input.
            name = self.layers[0].name
            if list(x) != [name]:
                raise ValueError(
                    f"Model {self.name!r} has one input, {name!r}; a dict input must hold that one key, got "
                    f"{sorted(map(str, x))}. Or pass the array itself."
                )
            x = x[name]
        if isinstance(x, np.ma.MaskedArray):
            # np.asarray would silently use whatever numbers sit under the mask.
            raise TypeError(
                f"Model {self.name!r} does not accept masked arrays: the masked pixels would be used as they "
                "are. Fill them first, e.g. x.filled(0)."
            )
        try:
            x = np.asarray(x)
        except ValueError as error:  # e.g. a list of images of different sizes
            raise ValueError(
                f"Input of model {self.name!r} cannot be read as one array ({error}). Pass a numpy array "
                "of shape (batch, height, width, channels); every image of a batch must have the same size."
            ) from None
        if x.dtype.kind not in "biuf":
            raise TypeError(
                f"Model {self.name!r} expects a numeric array of images, got dtype {x.dtype}. "
                "Convert the images to a float or integer numpy array first."
            )
        expected = self.input_shape
        if x.ndim != 4:
            hint = " Add a batch axis, e.g. x[np.newaxis]." if x.ndim == 3 else ""
            raise ValueError(
                f"Input of model {self.name!r} must be a 4-D batch (batch, height, width, channels) "
                f"matching {expected}; got an array of shape {x.shape}.{hint}"
            )
        if x.shape[0] == 0:
            raise ValueError(
                f"Input of model {self.name!r} is an empty batch (shape {x.shape}): pass at least one image."
            )
        for axis, (want, got) in enumerate(zip(expected[1:], x.shape[1:]), start=1):
            if want is None or want == got:
                continue
            if x.shape[1] == expected[3] != x.shape[3]:
                remedy = "The images look channels-first: transpose them with x.transpose(0, 2, 3, 1)."
            elif axis < 3:
                remedy = (
                    "Resize the images to the model's input size, or build the model with a matching "
                    "input_shape (without the top, any size of at least 32x32 goes in)."
                )
            elif (want, got) == (3, 1):
                remedy = "Repeat the gray channel to make RGB, e.g. np.repeat(x, 3, axis=-1)."
            elif (want, got) == (3, 4):
                remedy = "Drop the alpha channel, e.g. x[..., :3]."
            else:
                remedy = f"Give the images {want} channels, or build the model with input_shape=(height, width, {got})."
            raise ValueError(
                f"Input of model {self.name!r} is incompatible: expected shape {expected}, "
                f"found shape {x.shape} (axis {axis} differs). {remedy}"
            )
        minimum = getattr(self.layers[0], "min_input_size", MIN_SIZE)  # load_model's graphs check their own
        if x.shape[1] < minimum or x.shape[2] < minimum:
            raise ValueError(
                f"Images must be at least {minimum}x{minimum} pixels (five 2x2 poolings halve them); "
                f"got {x.shape[1]}x{x.shape[2]}. Resize or pad them to at least {minimum}x{minimum}."
            )
        if not x.flags.aligned:
            # A float32 array at an odd byte offset (e.g. np.frombuffer with an offset) would reach
            # the kernels as a misaligned float pointer, which C++ does not allow.
            x = x.copy()
        return x

    # Presentation -------------------------------------------------------------------------
    def summary(self, line_length: Optional[int] = None, print_fn=None) -> None:
        """Prints a Keras-style table of layers, output shapes and parameter counts."""
        print_fn = print_fn or print
        widths = (33, 26, 12)
        if line_length and line_length > sum(widths):
            widths = (widths[0] + line_length - sum(widths),) + widths[1:]
        total_width = sum(widths)

        def row(cells):
            # A cell longer than its column goes on over the next lines of that column (as
            # Keras 3 wraps), so a long layer name never runs into its output shape.
            chunks = [[text[i : i + w - 1] for i in range(0, max(len(text), 1), w - 1)]
                      for text, w in zip(map(str, cells), widths)]
            return [
                "".join((column[line] if line < len(column) else "").ljust(w) for column, w in zip(chunks, widths)).rstrip()
                for line in range(max(len(column) for column in chunks))
            ]

        total = self.count_params()
        print_fn(f'Model: "{self.name}"')
        print_fn("_" * total_width)
        for line in row(("Layer (type)", "Output Shape", "Param #")):
            print_fn(line)
        print_fn("=" * total_width)
        for i, layer in enumerate(self.layers):
            for line in row((f"{layer.name} ({layer.class_name})", layer.output_shape, f"{layer.count_params():,}")):
                print_fn(line)
            if i != len(self.layers) - 1:
                print_fn("")
        print_fn("=" * total_width)
        frozen = sum(layer.count_non_trainable_params() for layer in self.layers)
        print_fn(f"Total params: {total:,} ({_bytes_text(total * 4)})")
        print_fn(f"Trainable params: {total - frozen:,} ({_bytes_text((total - frozen) * 4)})")
        print_fn(f"Non-trainable params: {frozen:,} ({_bytes_text(frozen * 4)})")
        print_fn("_" * total_width)

    def __repr__(self) -> str:
        return f"<fastvgg.Model {self.name!r} input_shape={self.input_shape} output_shape={self.output_shape}>"


def _the_input(inputs) -> LayerOutput:
    if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
        inputs = inputs[0]
    if not isinstance(inputs, LayerOutput) or not isinstance(inputs.layer, InputLayer):
        raise ValueError(
            f"`inputs` must be a model's input tensor (e.g. `base.input`), got {inputs!r}. "
            "VGG models have one input."
        )
    return inputs


def _output_list(outputs) -> List[LayerOutput]:
    if isinstance(outputs, dict):
        tensors = list(outputs.values())
    elif isinstance(outputs, (list, tuple)):
        tensors = list(outputs)
    else:
        tensors = [outputs]
    if not tensors:
        raise ValueError("`outputs` is empty: pass at least one layer output, e.g. base.get_layer('block4_pool').output.")
    for tensor in tensors:
        if not isinstance(tensor, LayerOutput):
            raise ValueError(
                f"`outputs` must be layer outputs (e.g. base.get_layer('block4_pool').output), got {tensor!r}."
            )
    return tensors


def _map_structure(structure, function):
    """Applies ``function`` to the tensors of one tensor, a list, a tuple or a dict, keeping the
    shape; a list or tuple of one gives its single element, as Keras's predict does."""
    if isinstance(structure, dict):
        return {key: function(value) for key, value in structure.items()}
    if isinstance(structure, (list, tuple)):
        values = [function(value) for value in structure]
        return values[0] if len(values) == 1 else values
    return function(structure)


def _progress_wanted(verbose) -> bool:
    if verbose == "auto":
        return sys.stderr.isatty()
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(f"`verbose` must be 0, 1, 2 or 'auto', got {verbose!r}.")
    return verbose != 0


def _bytes_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.2f} {unit}"
        n /= 1024.0
    raise AssertionError("unreachable")


# Argument checks, in Keras's order and words ------------------------------------------------
def _check_weights_arg(weights: WeightsArg) -> WeightsArg:
    if weights is None or (isinstance(weights, str) and weights == "imagenet"):
        return weights
    if isinstance(weights, (str, os.PathLike)) and os.path.exists(weights):
        return weights
    raise ValueError(
        "The `weights` argument should be either `None` (random initialization), 'imagenet' "
        "(pre-training on ImageNet), or the path to the weights file to be loaded. "
        f"Received: weights={weights!r}"
        + (" (no file exists at that path)" if isinstance(weights, (str, os.PathLike)) else "")
    )


def _resolve_input_shape(input_shape, include_top: bool, weights: WeightsArg) -> Tuple[Optional[int], ...]:
    default_shape = (DEFAULT_SIZE, DEFAULT_SIZE, 3)
    if input_shape is not None:
        try:
            dims = tuple(input_shape)
        except TypeError:
            raise ValueError(f"`input_shape` must be a tuple of three integers. Received: {input_shape!r}") from None
        if not all(d is None or (isinstance(d, (int, np.integer)) and not isinstance(d, bool)) for d in dims):
            raise ValueError(f"`input_shape` must be a tuple of three integers. Received: {input_shape!r}")
        input_shape = tuple(None if d is None else int(d) for d in dims)
    if weights == "imagenet" and include_top:
        if input_shape is not None and input_shape != default_shape:
            raise ValueError(
                "When setting `include_top=True` and loading `imagenet` weights, "
                f"`input_shape` should be {default_shape}.  Received: input_shape={input_shape}"
            )
        return default_shape
    if input_shape is None:
        return default_shape if include_top else (None, None, 3)
    if len(input_shape) != 3:
        raise ValueError(f"`input_shape` must be a tuple of three integers. Received: {input_shape}")
    if input_shape[-1] is None or input_shape[-1] < 1:
        raise ValueError(f"`input_shape` must give a positive channel count. Received: input_shape={input_shape}")
    if input_shape[-1] != 3 and weights == "imagenet":
        raise ValueError(f"The input must have 3 channels; Received `input_shape={input_shape}`")
    if any(d is not None and d < MIN_SIZE for d in input_shape[:2]):
        raise ValueError(f"Input size must be at least {MIN_SIZE}x{MIN_SIZE}; Received: input_shape={input_shape}")
    if include_top and None in input_shape:
        raise ValueError(
            f"If `include_top` is True, you should specify a static `input_shape`. Received: input_shape={input_shape}"
        )
    return input_shape


def _build(
    architecture: str,
    weights: WeightsArg,
    include_top: bool,
    input_shape,
    pooling: Optional[str],
    classes: int,
    classifier_activation: Optional[str],
    name: str,
    seed: Optional[int],
    precision: str,
    device: str = "cpu",
    packed_cache=None,
) -> Model:
    weights = _check_weights_arg(weights)
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {', '.join(map(repr, PRECISIONS))}. Received: precision={precision!r}")
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 1:
        raise ValueError(f"`classes` must be a positive integer. Received: classes={classes!r}")
    if weights == "imagenet" and include_top and classes != 1000:
        raise ValueError(
            "If using `weights='imagenet'` with `include_top=True`, `classes` should be 1000.  "
            f"Received classes={classes}"
        )
    shape = _resolve_input_shape(input_shape, include_top, weights)
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"`pooling` must be None, 'avg' or 'max'. Received: pooling={pooling!r}")
    if include_top and pooling is not None:
        raise ValueError(
            f"`pooling={pooling!r}` applies only to the convolutional base: pass include_top=False "
            "to get pooled features, or pooling=None to keep the classifier top."
        )
    if include_top:
        if classifier_activation not in CLASSIFIER_ACTIVATIONS:
            raise ValueError(
                f"Unsupported `classifier_activation={classifier_activation!r}`; fastvgg supports "
                "'softmax', None (logits), 'linear' and 'relu'."
            )
        if weights is not None and classifier_activation not in (None, "softmax"):
            raise ValueError(
                "Only `None` and `softmax` activations are allowed for the `classifier_activation` "
                "argument when using pretrained weights, with `include_top=True`; Received: "
                f"classifier_activation={classifier_activation}"
            )

    graph = _core.Graph(shape[-1])
    layers: List[Layer] = [InputLayer("input_layer", (None,) + shape, (None,) + shape)]

    def add(layer: Layer, index: int) -> None:
        layer._index = index
        layers.append(layer)

    current = layers[0].output_shape
    for block, (convs, filters) in enumerate(zip(CONVS_PER_BLOCK[architecture], BLOCK_FILTERS), start=1):
        for i in range(1, convs + 1):
            layer = Conv2D(f"block{block}_conv{i}", current, filters)
            add(layer, graph.add_conv3x3(filters, "relu"))
            current = layer.output_shape
        layer = MaxPooling2D(f"block{block}_pool", current)
        add(layer, graph.add_max_pool2x2())
        current = layer.output_shape
    if include_top:
        flatten = Flatten("flatten", current)
        add(flatten, graph.add_flatten())
        features = flatten.output_shape[-1]
        for layer_name, units, activation in (
            ("fc1", 4096, "relu"),
            ("fc2", 4096, "relu"),
            ("predictions", int(classes), CLASSIFIER_ACTIVATIONS[classifier_activation]),
        ):
            layer = Dense(layer_name, (None, features), units, activation)
            add(layer, graph.add_dense(features, units, activation))
            features = units
    elif pooling is not None:
        pool_class = GlobalAveragePooling2D if pooling == "avg" else GlobalMaxPooling2D
        layer = pool_class("global_average_pooling2d" if pooling == "avg" else "global_max_pooling2d", current)
        add(layer, graph.add_global_pool(pooling))

    # The executor packs the weights for its kernels; layers reach them through it.
    executor = new_executor(graph, precision, device, layers[1:])
    for layer in layers:
        layer._graph = layers
        layer._executor = executor
    model = Model(layers[0].output, layers[-1].output, name=name)
    if weights is None:
        _initialize(model, seed)
    else:
        from .download import IMAGENET_FILES, imagenet_weights_path
        from .packed_cache import load_model_weights
        from .weights import load_weights

        trusted = weights == "imagenet"
        path = imagenet_weights_path(architecture, include_top) if trusted else weights

        def load() -> None:
            with executor.updating():
                # Keras's own ImageNet file, md5-checked when it was downloaded, is parsed
                # in-process, which saves starting the isolated HDF5 reader (weights.load_weights).
                load_weights(model, path, trusted=trusted)

        # Keras's md5 names the ImageNet files' content (they are checked when downloaded);
        # any other file is keyed by a hash of its bytes.
        known_md5 = IMAGENET_FILES[(architecture, include_top)][1] if trusted else None
        model._packed_cache_status = load_model_weights(executor, path, load, packed_cache, known_md5)
    _return_freed_heap()
    return model


def new_executor(graph, precision: str, device: str, layers: Optional[Sequence[Layer]] = None):
    """The executor that runs `graph`: the CPU's, or the GPU's for device="cuda" (and for
    "auto" when fastvgg.cuda_status() says a GPU is usable). `layers`, the model's layers
    after its input layer (one per graph op), name the layer in the GPU's refusal of an op."""
    from . import cuda

    if cuda.resolve_device(device) == "cuda":
        return cuda.CudaExecutor(graph, precision, cuda.layer_labels(layers or []))
    return _core.CpuExecutor(graph, precision)


def _return_freed_heap() -> None:
    """Hands the read buffers freed during loading back to the OS (glibc keeps ~20 MB of them
    otherwise), so the loaded model's resident memory is its packed weights."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def _initialize(model: Model, seed: Optional[int]) -> None:
    """Keras's default initialisation: Glorot-uniform kernels, zero biases."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        shapes = layer.weight_shapes()
        if not shapes:
            continue
        kernel_shape, bias_shape = shapes
        receptive = int(np.prod(kernel_shape[:-2])) if len(kernel_shape) > 2 else 1
        fan_in, fan_out = receptive * kernel_shape[-2], receptive * kernel_shape[-1]
        limit = np.float32(np.sqrt(6.0 / (fan_in + fan_out)))
        kernel = rng.random(kernel_shape, dtype=np.float32)
        kernel *= 2 * limit
        kernel -= limit
        layer.set_weights([kernel, np.zeros(bias_shape, dtype=np.float32)])


def VGG16(
    weights: WeightsArg = "imagenet",
    *,
    include_top: bool = True,
    input_shape=None,
    pooling: Optional[str] = None,
    classes: int = 1000,
    classifier_activation: Optional[str] = "softmax",
    name: str = "vgg16",
    seed: Optional[int] = None,
    precision: str = "fast",
    device: str = "cpu",
    packed_cache=None,
) -> Model:
    """Builds VGG16 as ``keras.applications.VGG16`` does, with weights first.

    Args:
        weights: None (Glorot-uniform initialisation, seeded by ``seed``), "imagenet", or the
            path to a Keras HDF5 weights file.
        include_top: whether to include flatten, fc1, fc2 and predictions.
        input_shape: (height, width, channels); defaults to (224, 224, 3) with the top and
            (None, None, 3) without. Height and width must be at least 32.
        pooling: None, "avg" or "max": global pooling after block5_pool, only without the top.
        classes: number of classes of the top (1000 for the ImageNet weights).
        classifier_activation: "softmax" or None (logits); with random weights also "relu".
        name: the model's name.
        seed: seed of the random initialisation when ``weights`` is None.
        precision: "fast" runs the 3x3 convolutions by Winograd F(4x4, 3x3) where that pays
            (about 3e-6 relative error per layer, well inside parity with Keras); "highest"
            runs plain direct convolution everywhere; "bf16" (CPUs with AVX512_BF16 and
            AVX512_VNNI) halves the weights and its get_weights returns the rounded weights the
            kernels use: with AMX, every convolution on AMX tiles with bf16 weights and
            activations carried as two bf16 values (about 5-7e-3 relative error on
            block5_pool); without, bf16 products and Winograd with 14-bit integer products
            (about 2e-3). ``FASTVGG_BF16_KERNELS=avx512_bf16`` (or ``amx_bf16``) picks one.
            "bf16x3" (CPUs with AMX-BF16) runs the 3x3 convolutions on AMX tiles with activations
            and weights each as two bf16 values, three products a multiply-add: about 1.2e-5
            relative error on block5_pool (fast: 3e-6), convolutions ~1.5x faster than fast's;
            get_weights gives the weights as loaded.
        device: "cpu" (default), "cuda" (an NVIDIA GPU; a clear error with the reason when none
            is usable, see fastvgg.cuda_status()) or "auto" (the GPU when usable, else the CPU).
        packed_cache: where the weights packed for the kernels are cached, to be mapped
            (and shared between processes) by later loads of the same file: None (the
            default: ``$FASTVGG_PACKED_CACHE``, else ``packed/`` in fastvgg's cache), a
            directory, or False (off). See ``fastvgg.packed_cache``.
    """
    return _build(
        "vgg16", weights, include_top, input_shape, pooling, classes, classifier_activation, name, seed, precision,
        device, packed_cache,
    )


def VGG19(
    weights: WeightsArg = "imagenet",
    *,
    include_top: bool = True,
    input_shape=None,
    pooling: Optional[str] = None,
    classes: int = 1000,
    classifier_activation: Optional[str] = "softmax",
    name: str = "vgg19",
    seed: Optional[int] = None,
    precision: str = "fast",
    device: str = "cpu",
    packed_cache=None,
) -> Model:
    """Builds VGG19 as ``keras.applications.VGG19`` does, with weights first (see :func:`VGG16`)."""
    return _build(
        "vgg19", weights, include_top, input_shape, pooling, classes, classifier_activation, name, seed, precision,
        device, packed_cache,
    )


def _check_computed(layer: Layer) -> None:
    if layer.folded_into:
        raise ValueError(
            f"Layer {layer.name!r} (ZeroPadding2D) runs inside convolution {layer.folded_into!r}, which fastvgg computes "
            "as one 'same' convolution of the unpadded image: the padded image itself is never computed. Take the "
            "output of the layer before it and pad it with np.pad."
        )
