"""Reading a whole Keras model (architecture and weights) as data: ``fastvgg.load_model``.

A ``.keras`` archive keeps the architecture in ``config.json`` and the weights in
``model.weights.h5``; a whole-model ``.h5`` (Keras 2 / tf.keras ``model.save``, Keras 3's
legacy format) keeps it in the ``model_config`` attribute and the weights under
``model_weights/``. Both configs are JSON: this module reads them as plain data, never
importing a module, deserialising a class or evaluating code named in them. A layer whose
class is not one of :data:`SUPPORTED_LAYERS` (a ``Lambda``, a custom or registered class) is
refused with an error that names it.

Sequential and Functional models, nested or flat, are flattened into one chain of
:class:`LayerSpec`, the layers in the order they run. Where heads split from one trunk or a
merge (Concatenate, Add, ...) joins tensors (in the outer model), the layers come chain after
chain, each after the layers it reads: ``ModelSpec.branch_inputs`` names what a chain's first
layer reads where that is not the layer before it, ``ModelSpec.merge_inputs`` what each merge
merges. Other layers that read two tensors, several inputs, a branch or merge inside a nested
model and a layer called twice are refused. Several outputs along a chain are its layers' outputs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

# Layers that merge several tensors of one model (each its own chain's start, fed by numpy in
# saved_model.Branches): their names as Keras 3's layers and ops and tf.keras's layers give them.
MERGE_LAYERS = ("Concatenate", "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
# Model classes whose config holds other layers: flattened into the chain.
_MODEL_CLASSES = ("Sequential", "Functional", "Model")
# Layers that are the identity at inference (Keras calls them with training=False).
_IDENTITY_AT_INFERENCE = (
    "Identity",
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "RandomFlip",
    "RandomRotation",
    "RandomZoom",
    "RandomTranslation",
    "RandomContrast",
    "RandomBrightness",
    # Keras 3's newer augmentation layers: each returns its input when training is False.
    # (Equalization and AutoContrast are not here: not random by name, their inference
    # behaviour differs between them and may between Keras versions; RandomCrop resizes and
    # crops at inference in tf.keras.)
    "AugMix",
    "CutMix",
    "MixUp",
    "RandAugment",
    "RandomColorDegeneration",
    "RandomColorJitter",
    "RandomElasticTransform",
    "RandomErasing",
    "RandomGaussianBlur",
    "RandomGrayscale",
    "RandomHue",
    "RandomInvert",
    "RandomPerspective",
    "RandomPosterization",
    "RandomSaturation",
    "RandomSharpness",
    "RandomShear",
    "Solarization",
    # tf.keras's: the identity at inference too.
    "RandomHeight",
    "RandomWidth",
)
SUPPORTED_LAYERS = (
    "InputLayer",
    "Conv2D",
    "MaxPooling2D",
    "AveragePooling2D",
    "Flatten",
    "Dense",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling2D",
    "BatchNormalization",
    "Rescaling",
    "Normalization",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "PReLU",
    "ELU",
    "ThresholdedReLU",
    "UpSampling2D",
    "Softmax",
    "ZeroPadding2D",
    "Reshape",
    "UnitNormalization",
) + tuple(m for m in MERGE_LAYERS if m not in ("Add", "Subtract", "Multiply")) + _IDENTITY_AT_INFERENCE + _MODEL_CLASSES
# The ops Keras records when applications.vgg16.preprocess_input (or x[..., ::-1] and a bias)
# is called on a symbolic tensor inside a model: Keras 3's GetItem (and Stack) and Add with a
# constant, tf.keras's SlicingOpLambda and TFOpLambda. Only Keras's preprocessing forms of them
# load (a channel reversal on the model's input, a per-channel constant added); "_ReverseChannels"
# is the loader's own name for Keras 3's Stack of GetItems (see _collapse_channel_stacks).
# Keras 3's Add, Subtract, Multiply and (True)Divide ops and tf.keras's TFOpLambda math with a
# constant (x / 255.0, x - 1.0, ...) are per-channel affine maps too.
_PREPROCESSING_OPS = ("GetItem", "SlicingOpLambda", "TFOpLambda", "Add", "Subtract", "Multiply", "TrueDivide", "Divide",
                      "_ReverseChannels")
_KERAS3_ARITHMETIC = {"Add": "add", "Subtract": "subtract", "Multiply": "multiply", "TrueDivide": "divide", "Divide": "divide"}
_TF_ARITHMETIC = {"__operators__.add": "add", "math.add": "add", "math.subtract": "subtract", "math.multiply": "multiply",
                  "math.truediv": "divide", "math.divide": "divide"}
# Keras's class aliases, as stored by older versions.
_CLASS_ALIASES = {
    "Convolution2D": "Conv2D",
    "MaxPool2D": "MaxPooling2D",
    "AvgPool2D": "AveragePooling2D",
    "GlobalAvgPool2D": "GlobalAveragePooling2D",
    "GlobalMaxPool2D": "GlobalMaxPooling2D",
}
# Element-wise activations the kernels have; "silu" is Keras 3's name for swish.
ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "softmax", "elu", "selu", "gelu", "swish", "softplus", "leaky_relu",
               "relu6", "softsign", "exponential", "mish", "hard_sigmoid", "hard_silu")
# Keras 3's keras.activations.leaky_relu(x, negative_slope=0.2): the slope of activation="leaky_relu".
_LEAKY_RELU_ACTIVATION_SLOPE = 0.2
_ACTIVATION_ALIASES = {None: "linear", "silu": "swish", "hard_swish": "hard_silu"}

# Keras nests a base model a level or two deep; deeper means a hostile or broken file.
MAX_NESTING = 16
# A VGG chain has a few dozen layers; a config with more than this is not one we run.
MAX_LAYERS = 4096
# Keras's backend.epsilon(), the floor of Normalization's standard deviation.
_KERAS_EPSILON = 1e-7

Shape = Tuple[Optional[int], ...]


class UnsupportedModelError(ValueError):
    """The model uses a layer or a structure fastvgg does not run; the message says which."""


# The features axis of flat (batch, features) rows, as an int or as Keras's list of axes: the
# one axis UnitNormalization and tf.math.l2_normalize may normalize over here.
_FEATURES_AXES = (1, -1, [1], [-1])
KERAS3_L2_MAX_INVERSE_NORM = 1e12  # Keras 3's ops.normalize: min(rsqrt(sum of squares), 1 / 1e-12)
KERAS2_L2_MAX_INVERSE_NORM = 1e6  # tf.math.l2_normalize: rsqrt(max(sum of squares, 1e-12))


# The weights Keras keeps out of training (trainable=False at creation), by layer class.
_STATISTICS = {"BatchNormalization": ("moving_mean", "moving_variance"), "Normalization": ("mean", "variance", "count")}


@dataclass
class LayerSpec:
    """One Keras layer of the chain: what it computes, its shapes (no batch axis) and weights.

    ``kind`` is one of: "input", "conv", "max_pool", "avg_pool", "flatten", "global_pool",
    "dense", "affine" (per-channel scale and shift: BatchNormalization, Rescaling,
    Normalization; also preprocess_input's means and other arithmetic with constants),
    "activation", "prelu" (Keras's PReLU, its alpha in ``weights``), "upsample" (UpSampling2D,
    nearest), "identity",
    "reverse_channels" (preprocess_input's x[..., ::-1], on the model's input only),
    "zero_pad" (ZeroPadding2D; only as the border of the 'valid' 3x3 convolution after it,
    where _fold_zero_padding turns the pair into one 'same' convolution),
    "l2_normalize" (UnitNormalization, on flat rows),
    "merge" (Concatenate, Add, ...: several tensors into one, see ``merge``).
    """

    name: str
    class_name: str
    kind: str
    config: dict = field(repr=False, default_factory=dict)
    input_shape: Shape = ()
    output_shape: Shape = ()
    # conv / dense
    units: int = 0  # filters or units
    kernel_size: int = 0
    padding: str = "valid"  # conv and pooling
    use_bias: bool = True
    activation: str = "linear"  # conv / dense / activation
    negative_slope: float = 0.0  # leaky_relu's and clipped_relu's slope, a float32 value (what TensorFlow multiplies by)
    # clipped_relu's (Keras's ReLU with a cap or threshold, and "relu6"), float32 values: None is no cap.
    max_value: Optional[float] = None
    threshold: float = 0.0
    reverses_input: bool = False  # a Lambda(preprocess_input): the input's channels reversed, then this affine map
    pool_mode: str = "avg"  # global_pool
    keepdims: bool = False
    size: Tuple[int, int] = (1, 1)  # upsample: UpSampling2D's factors (rows, columns)
    pad: Tuple[int, int, int, int] = (0, 0, 0, 0)  # zero_pad: top, bottom, left, right
    # A ZeroPadding2D folded into the convolution named here: fastvgg never computes its output.
    folded_into: str = ""
    # merge: "concatenate" (last axis), "add", "subtract", "multiply", "average", "maximum" or
    # "minimum", and the shapes of the tensors it merges, in order.
    merge: str = ""
    input_shapes: List[Shape] = field(default_factory=list)
    # l2_normalize: rows times min(1 / ||row||, this). Keras 3 caps at 1 / epsilon (epsilon 1e-12),
    # tf.keras's tf.math.l2_normalize at 1 / sqrt(epsilon); _read_model sets the latter for files
    # Keras 2 wrote. Only rows of norm below 1e-6 tell the two apart.
    max_inverse_norm: float = KERAS3_L2_MAX_INVERSE_NORM
    # The arrays as Keras keeps them (what get_weights returns), in Keras's order, and their names.
    weight_names: List[str] = field(default_factory=list)
    weight_shapes: List[Tuple[int, ...]] = field(default_factory=list)
    weights: List[np.ndarray] = field(default_factory=list, repr=False)
    # affine: y = x * scale + shift per channel (float32), derived from the weights or config.
    scale: Optional[np.ndarray] = field(default=None, repr=False)
    shift: Optional[np.ndarray] = field(default=None, repr=False)

    # Keras's layer.trainable as saved (False in a frozen base, or any layer of a nested model
    # saved frozen); a frozen layer's weights count as non-trainable in summary().
    trainable: bool = True

    def count_params(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.weight_shapes))

    def count_non_trainable_params(self) -> int:
        """What Keras's summary counts as non-trainable: every weight of a frozen layer, else
        the statistics Keras never trains (BatchNormalization's moving mean and variance,
        Normalization's mean, variance and count)."""
        return int(sum(int(np.prod(shape)) for name, shape in zip(self.weight_names, self.weight_shapes)
                       if not self.trainable or name in _STATISTICS.get(self.class_name, ())))


@dataclass
class ModelSpec:
    name: str
    input_name: str
    layers: List[LayerSpec]  # layers[0] is the input
    # The layers whose outputs are the model's, in Keras's order: several where the model was
    # built with outputs along its chain (Model(x, [block3_pool, block4_pool])); empty: the last.
    output_names: List[str] = field(default_factory=list)
    # Their keys where Keras 3's model was built with a dict of outputs ({"scores": y}), so that
    # predict returns a dict as Keras's does; None: one array, or a list of several.
    output_keys: Optional[List[str]] = None
    # Heads that split from one trunk: the layers run in `layers`' order, each reading the
    # output of the layer before it, except those named here, which read the layer named by
    # their value (the first layer of each further head). Empty for a chain.
    branch_inputs: Dict[str, str] = field(default_factory=dict)
    # The layer names (input first) in Keras's model.layers order where it is not the order
    # they run in (a tree: Keras interleaves the heads), so that layers, summary() and
    # get_weights() list them as Keras does; None: `layers`' order.
    keras_order: Optional[List[str]] = None
    # Merge layers (Concatenate, Add, ...) -> the layers whose outputs they merge, in Keras's
    # order. Each merge starts a chain of its own.
    merge_inputs: Dict[str, List[str]] = field(default_factory=dict)

    def input_of(self, index: int) -> str:
        """The name of the layer whose output layers[index] reads."""
        return self.branch_inputs.get(self.layers[index].name, self.layers[index - 1].name)

    @property
    def input_shape(self) -> Shape:
        return self.layers[0].output_shape


# Reading the files --------------------------------------------------------------------------------
def read_model(filepath, *, custom_objects=None, compile=True, safe_mode=True, read_kernels=True) -> ModelSpec:
    """The architecture and weights of a Keras model file, as a checked chain of layers.

    The file's HDF5 metadata is parsed by weights.py's isolated reader (a short-lived child
    process with time and memory limits), as for a weights file; every failure is a ValueError
    (OSError for I/O) naming the file. With ``read_kernels=False`` the convolution and dense
    layers' arrays are checked against the config but not read (their ``weights`` stay empty):
    a load that maps packed weights from the cache never needs them; ``read_kernel_weights``
    reads them when it does."""
    _check_keywords(custom_objects, compile, safe_mode)
    from .weights import _with_clear_errors

    path = os.fspath(filepath)
    return _with_clear_errors(path, lambda: _read_model(path, custom_objects, read_kernels))


KERNEL_KINDS = ("conv", "dense")  # layers whose weights the executor holds (and packs)


def read_kernel_weights(spec: ModelSpec, filepath, *, custom_objects=None) -> None:
    """Reads the arrays that ``read_model(..., read_kernels=False)`` left out into ``spec``,
    from the same file, which must still hold the same model."""
    again = read_model(filepath, custom_objects=custom_objects)
    if [(l.name, l.class_name, tuple(l.output_shape)) for l in again.layers] != [
        (l.name, l.class_name, tuple(l.output_shape)) for l in spec.layers
    ]:
        raise ValueError(f"{os.fspath(filepath)!r} changed while it was being loaded; load it again.")
    for layer, read in zip(spec.layers, again.layers):
        if layer.kind in KERNEL_KINDS:
            layer.weights = read.weights


def _read_model(path: str, custom_objects, read_kernels: bool = True) -> ModelSpec:
    from .tf_saved_model import is_saved_model
    from .weights import _open_weights, _stored_layers

    if is_saved_model(path):
        return _read_saved_model(path, custom_objects, read_kernels)
    with _open_weights(path) as (source, root, archive_config):
        config = archive_config if archive_config is not None else _h5_model_config(root, path)
        if config is None:
            raise ValueError(
                f"{path!r} holds weights only, no model architecture (a save_weights file). Build the model "
                "with fastvgg.VGG16/VGG19(weights=path), or save the whole model with model.save(...)."
            )
        spec = model_from_config(config, path, custom_objects)
        if _written_by_keras_2(root, config, archive=archive_config is not None):
            _as_keras_2_computes(spec)
        stored = _stored_layers(root, config, _NoFallbackNames(), path)
        _attach_weights(spec, stored, path, source, read_kernels)
    return spec


def _as_keras_2_computes(spec: ModelSpec) -> None:
    """What a file Keras 2 (tf.keras) wrote means where Keras 3 computes another function under
    the same name: UnitNormalization's cap on 1 / ||row|| (tf.math.l2_normalize's), and the
    hard sigmoid, clip(0.2 x + 0.5, 0, 1) there and relu6(x + 3) / 6 in Keras 3."""
    for layer in spec.layers:
        if layer.class_name == "UnitNormalization":
            layer.max_inverse_norm = KERAS2_L2_MAX_INVERSE_NORM
        if layer.activation == "hard_sigmoid":
            layer.activation = "hard_sigmoid_keras2"


def _read_saved_model(path: str, custom_objects, read_kernels: bool) -> ModelSpec:
    """A SavedModel directory that tf.keras wrote (tf_saved_model.py reads it): its config
    becomes the chain as an .h5 file's does, and each layer's variables, matched by weight
    name, its weights."""
    from .tf_saved_model import read_saved_model
    from .weights import StoredLayer

    contents = read_saved_model(path)
    spec = model_from_config(contents.config, path, custom_objects)
    _as_keras_2_computes(spec)  # only tf.keras (Keras 2) writes SavedModels with a Keras config
    stored = {}
    for layer in spec.layers:
        saved = contents.layer_weights.get(layer.name)
        if not layer.weight_names or saved is None:
            continue
        by_name = dict(saved)
        if sorted(by_name) != sorted(layer.weight_names) or len(by_name) != len(saved):
            raise ValueError(
                f"{path!r}: layer {layer.name!r} ({layer.class_name}) has the variables {[n for n, _ in saved]} in the "
                f"checkpoint; its config says {layer.weight_names}: config and weights disagree."
            )
        stored[layer.name] = StoredLayer(layer.name, [by_name[n] for n in layer.weight_names], layer.name)
    _attach_weights(spec, stored, path, None, read_kernels)
    return spec


def _written_by_keras_2(root, config: dict, archive: bool) -> bool:
    """Whether Keras 2 (tf.keras, tf_keras) wrote the file, where a layer's meaning differs from
    Keras 3's (UnitNormalization's epsilon). An .h5 file says so in its keras_version attribute;
    a .keras archive's config names the classes' modules, which Keras 2 kept under "engine"."""
    if archive:
        module = str(config.get("module") or "")
        return module.startswith("tf_keras") or ".engine" in module
    version = root.attrs.get("keras_version")
    if isinstance(version, bytes):
        version = version.decode("utf8", errors="replace")
    return isinstance(version, str) and version.split(".")[0] in ("1", "2")


class _NoFallbackNames:
    """Stands in for a model in weights.py's name recovery: a whole-model file names its layers in
    its config, so recovering names from VGG's layer order must not happen."""

    name = "the saved model"
    layers: list = []


def _check_keywords(custom_objects, compile, safe_mode) -> None:
    if not isinstance(compile, bool):
        raise TypeError(f"`compile` must be True or False, got {compile!r}.")
    if not isinstance(safe_mode, bool):
        raise TypeError(f"`safe_mode` must be True or False, got {safe_mode!r}.")
    if custom_objects is not None and not isinstance(custom_objects, dict):
        raise TypeError(f"`custom_objects` must be a dict or None, got {type(custom_objects).__name__}.")


def _h5_model_config(handle, path: str) -> Optional[dict]:
    raw = handle.attrs.get("model_config")
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf8", errors="replace")
    if not isinstance(raw, str) or len(raw) > (16 << 20):
        raise ValueError(f"{path!r}: its 'model_config' attribute is not a JSON text of a sane size.")
    try:
        config = json.loads(raw)
    except ValueError as error:
        raise ValueError(f"{path!r}: its 'model_config' attribute is not valid JSON ({error}).") from None
    return config


# Flattening the config into a chain ---------------------------------------------------------------------
def model_from_config(config, path: str = "<config>", custom_objects=None) -> ModelSpec:
    """A checked chain of layer specs (no weights yet) from a Keras model config (a dict)."""
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"{path!r}: the stored model config is not a Keras model description.")
    class_name = _class_name(config)
    if class_name not in _MODEL_CLASSES:
        raise UnsupportedModelError(f"{path!r}: the stored object is a {class_name!r}, not a Keras model.")
    flattener = _Flattener(path, custom_objects)
    input_shape, input_name, leaves = flattener.model(config, 0)
    if input_shape is None:
        raise ValueError(f"{path!r}: the model config gives no input shape; build the model on an Input before saving.")
    name = str(_dict(config.get("config")).get("name") or "model")
    outputs = _dict(config.get("config")).get("output_layers")
    output_keys = [str(key) for key in outputs] if isinstance(outputs, dict) else None
    specs = _specs(leaves, input_name, input_shape, path, flattener.branch_inputs, flattener.merge_inputs)
    return ModelSpec(name, input_name, specs, flattener.output_names, output_keys, dict(flattener.branch_inputs),
                     flattener.keras_order, dict(flattener.merge_inputs))


def _class_name(layer: dict) -> str:
    name = str(layer.get("class_name", ""))
    return _CLASS_ALIASES.get(name, name)


def _layer_name(layer: dict) -> str:
    config = layer.get("config") if isinstance(layer.get("config"), dict) else {}
    return str(layer.get("name") or config.get("name") or "")


# Marks a leaf layer's config (a copy) whose enclosing nested model was saved frozen.
_FROZEN_BY_PARENT = "fastvgg_frozen_by_parent"


class _Flattener:
    def __init__(self, path: str, custom_objects) -> None:
        self.path = path
        self.custom_objects = custom_objects or {}
        self.count = 0
        # The leaf layers whose outputs are the top-level model's (functional(): depth 0).
        self.output_names: List[str] = []
        # A leaf that reads another leaf's output than the one before it in the order (the
        # first layer of a head that branches from the trunk) -> the leaf it reads.
        self.branch_inputs: Dict[str, str] = {}
        self.keras_order: Optional[List[str]] = None  # the leaves in Keras's model.layers order, where it differs
        # A merge leaf (Concatenate, Add, ...) -> the leaves whose outputs it merges, in order.
        self.merge_inputs: Dict[str, List[str]] = {}

    def fail(self, message: str):
        raise UnsupportedModelError(f"{self.path!r}: {message}")

    def model(self, config: dict, depth: int):
        """(input batch shape or None, input layer name, leaf layer configs in order)."""
        if depth > MAX_NESTING:
            self.fail(f"models nested more than {MAX_NESTING} deep; Keras never writes that, fastvgg does not read it.")
        inner = config.get("config")
        if isinstance(inner, list):  # Sequential of early tf.keras: the config is the layer list
            inner = {"layers": inner}
        if not isinstance(inner, dict) or not isinstance(inner.get("layers"), list):
            self.fail(f"model {_layer_name(config)!r} has no layer list in its config.")
        if _class_name(config) == "Sequential":
            shape, name, leaves = self.sequential(config, inner, depth)
        else:
            shape, name, leaves = self.functional(config, inner, depth)
        if depth > 0 and inner.get("trainable") is False:
            # A frozen nested model (base.trainable = False) freezes its layers, whatever
            # their own configs say (Keras writes both; an edited file may not).
            leaves = [dict(leaf, **{_FROZEN_BY_PARENT: True}) for leaf in leaves]
        return shape, name, leaves

    def checked_layer(self, layer) -> dict:
        if not isinstance(layer, dict) or not isinstance(layer.get("config", {}), dict):
            self.fail("a layer entry of the model config is not a dict.")
        self.count += 1
        if self.count > MAX_LAYERS:
            self.fail(f"more than {MAX_LAYERS} layers: not a model fastvgg runs.")
        return layer

    def sequential(self, config, inner, depth):
        input_shape, input_name, leaves = None, "", []
        for position, layer in enumerate(inner["layers"]):
            layer = self.checked_layer(layer)
            kind = _class_name(layer)
            if kind == "InputLayer":
                if position != 0:
                    self.fail(f"InputLayer {_layer_name(layer)!r} inside a Sequential model, after other layers.")
                input_shape, input_name = _input_shape(layer), _layer_name(layer)
                continue
            if kind in _MODEL_CLASSES:
                nested_shape, nested_input, nested = self.model(layer, depth + 1)
                if input_shape is None and not leaves:
                    input_shape, input_name = nested_shape, nested_input
                leaves.extend(nested)
                continue
            if input_shape is None and not leaves:
                input_shape = _declared_input_shape(layer)
            leaves.append(self.leaf(layer))
        if input_shape is None:
            input_shape = _build_input_shape(config, inner)
        return input_shape, input_name or f"{_layer_name(config) or 'sequential'}_input", leaves

    def functional(self, config, inner, depth):
        model_name = _layer_name(config)
        layers: Dict[str, dict] = {}
        for layer in inner["layers"]:
            layer = self.checked_layer(layer)
            name = _layer_name(layer)
            if name in layers:
                self.fail(f"model {model_name!r} has two layers named {name!r}.")
            layers[name] = layer
        _collapse_channel_stacks(layers)
        inputs = _tensor_refs(inner.get("input_layers"))
        outputs = _tensor_refs(inner.get("output_layers"))
        if len(inputs) != 1:
            self.fail(
                f"model {model_name!r} has {len(inputs)} inputs ({[r[0] for r in inputs]}); fastvgg runs models "
                "with one input whose layers form one chain."
            )
        if len(outputs) != 1 and depth > 0:
            self.fail(
                f"model {model_name!r}, used as a layer of another model, has {len(outputs)} outputs "
                f"({[r[0] for r in outputs]}); fastvgg runs models whose layers form one chain."
            )
        if not outputs:
            self.fail(f"model {model_name!r} has no outputs.")
        # Each layer's one call and the tensors it reads: one, or several for a merge.
        sources: Dict[str, List[str]] = {}
        consumers: Dict[str, List[str]] = {}
        for name, layer in layers.items():
            nodes = layer.get("inbound_nodes") or []
            if _class_name(layer) == "InputLayer":
                continue
            if not isinstance(nodes, list) or len(nodes) == 0:
                continue  # not called in this model: not part of its graph
            if len(nodes) > 1:
                self.fail(
                    f"layer {name!r} ({_class_name(layer)}) is called {len(nodes)} times in model {model_name!r} "
                    "(a shared layer); fastvgg runs models whose layers form one chain, each layer used once."
                )
            refs, training = _node_inputs(nodes[0])
            if training:
                self.fail(
                    f"layer {name!r} ({_class_name(layer)}) is called with training=True, so Keras keeps it random "
                    "at inference (e.g. Monte Carlo dropout); fastvgg runs deterministic inference only."
                )
            merge = _class_name(layer) in MERGE_LAYERS and len(refs) > 1
            if len(refs) != 1 and not (merge and depth == 0):
                where = (" inside a model used as a layer of another; fastvgg merges in the outer model only"
                         if merge else f"; fastvgg merges tensors only with {', '.join(MERGE_LAYERS)}")
                self.fail(f"layer {name!r} ({_class_name(layer)}) takes {len(refs)} inputs ({[r[0] for r in refs]}){where}.")
            for ref in refs:
                if ref[0] not in layers:
                    self.fail(f"layer {name!r} reads the output of {ref[0]!r}, which model {model_name!r} does not have.")
                if ref[2] != 0:
                    self.fail(f"layer {name!r} reads output {ref[2]} of {ref[0]!r}; only single-output layers are supported.")
                consumers.setdefault(ref[0], []).append(name)
            sources[name] = [ref[0] for ref in refs]
        if depth > 0:
            for producer, readers in consumers.items():
                if len(readers) > 1:
                    self.fail(
                        f"the output of layer {producer!r} feeds {len(readers)} layers ({readers}) in model "
                        f"{model_name!r}, which is used as a layer of another model: a branch inside a nested model. "
                        "fastvgg runs branches (heads that split from one trunk) in the outer model only."
                    )
        input_name = inputs[0][0]
        if input_name not in layers or _class_name(layers[input_name]) != "InputLayer":
            self.fail(f"model {model_name!r}'s input {input_name!r} is not an InputLayer of the model.")
        order = self.run_order(outputs, layers, sources, input_name, model_name)
        input_shape = _input_shape(layers[input_name])
        leaves: List[dict] = []
        last_leaf: Dict[str, str] = {}  # a layer's name -> the leaf whose output is its output
        leaves_of: Dict[str, List[str]] = {}
        for name in order:
            layer = layers[name]
            before = len(leaves)
            reads = [last_leaf.get(source, input_name) for source in sources[name]]
            if _class_name(layer) in _MODEL_CLASSES:
                _, _, nested = self.model(layer, depth + 1)
                leaves.extend(nested)
            elif _class_name(layer) == "InputLayer":
                self.fail(f"InputLayer {name!r} in the middle of model {model_name!r}.")
            else:
                leaves.append(self.leaf(layer))
            if len(reads) > 1:
                self.merge_inputs[_layer_name(leaves[before])] = reads
            elif len(leaves) > before and reads[0] != (_layer_name(leaves[before - 1]) if before else input_name):
                self.branch_inputs[_layer_name(leaves[before])] = reads[0]
            last_leaf[name] = _layer_name(leaves[-1]) if len(leaves) > before else reads[0]
            leaves_of[name] = [_layer_name(leaf) for leaf in leaves[before:]]
        if depth == 0:
            self.output_names = [last_leaf[ref[0]] for ref in outputs]
            if self.branch_inputs or self.merge_inputs:  # Keras lists the layers in its config's order
                self.keras_order = [input_name] + [leaf for name in layers if name in leaves_of for leaf in leaves_of[name]]
        return input_shape, input_name, leaves

    def run_order(self, outputs, layers, sources, input_name: str, model_name: str) -> List[str]:
        """The layers the outputs need, each after the layers it reads: depth first from each
        output in turn, a layer's inputs in Keras's order. A chain stays contiguous; a head that
        branches off, or a merge, follows the layers it reads (saved_model runs each contiguous
        stretch as one core graph)."""
        order: List[str] = []
        state: Dict[str, str] = {input_name: "done"}
        for ref in outputs:
            if ref[2] != 0:
                self.fail(f"model {model_name!r}'s output is output {ref[2]} of {ref[0]!r}; only single-output layers are supported.")
            if ref[0] not in layers:
                self.fail(f"model {model_name!r}'s output {ref[0]!r} is not one of its layers.")
            if ref[0] == input_name:
                self.fail(f"model {model_name!r}'s output {ref[0]!r} is its input.")
            stack = [(ref[0], False)]
            while stack:
                name, expanded = stack.pop()
                if expanded:
                    state[name] = "done"
                    order.append(name)
                    continue
                if state.get(name) == "done":
                    continue
                if state.get(name) == "open":  # reached again before it was done: it reads itself
                    self.fail(f"model {model_name!r} has a cycle through layer {name!r}.")
                if name not in sources:
                    self.fail(f"model {model_name!r}: layer {name!r} is not connected to the input {input_name!r}.")
                state[name] = "open"
                stack.append((name, True))
                stack.extend((source, False) for source in reversed(sources[name]) if state.get(source) != "done")
        return order

    def leaf(self, layer: dict) -> dict:
        """A layer that computes something: refused here unless its class is one fastvgg runs."""
        name, class_name = _layer_name(layer), _class_name(layer)
        registered = layer.get("registered_name")
        module = str(layer.get("module") or "keras")
        custom = (registered not in (None, class_name) and not str(registered).startswith("keras")) or not module.startswith(
            ("keras", "tf_keras", "tensorflow")
        )
        if class_name == "Lambda" and _is_vgg_preprocess_lambda(layer, self.custom_objects):
            return layer
        if class_name == "Lambda":
            self.fail(
                f"layer {name!r} is a Lambda layer: it holds Python code, and fastvgg never runs code from a file "
                "(safe_mode=False does not change that). Replace it with built-in layers (e.g. Rescaling) and save "
                "again. For Lambda(preprocess_input): a Keras 3 file loads with custom_objects={'preprocess_input': "
                "keras.applications.vgg16.preprocess_input}, as Keras itself needs; or call preprocess_input on the "
                f"tensor without a Lambda and save again. Supported layers: {', '.join(SUPPORTED_LAYERS)}."
            )
        if class_name in _PREPROCESSING_OPS and not custom and class_name not in self.custom_objects:
            return layer  # _spec accepts Keras's preprocessing forms of these ops and names the rest
        if class_name not in SUPPORTED_LAYERS or custom or class_name in self.custom_objects:
            what = f"custom class {registered or class_name!r}" if custom or class_name in self.custom_objects else f"class {class_name!r}"
            hint = (
                " custom_objects cannot help: fastvgg runs only the layers it implements, never Python classes."
                if self.custom_objects
                else ""
            )
            self.fail(
                f"layer {name!r} of {what} is not supported.{hint} Supported layers: {', '.join(SUPPORTED_LAYERS)}."
            )
        return layer


# VGG16's and VGG19's preprocess_input (Keras's "caffe" mode), wherever they are defined.
_VGG_PREPROCESS_MODULES = ("applications.vgg16", "applications.vgg19", "fastvgg.imagenet")


def _is_vgg_preprocess_lambda(layer: dict, custom_objects: dict) -> bool:
    """A Keras 3 Lambda(preprocess_input) stores only the function's name; Keras itself loads it
    through custom_objects. Where custom_objects maps that name to VGG16's or VGG19's
    preprocess_input (Keras's or fastvgg's: recognised by module and name, never called), fastvgg
    runs it natively; any other function, or tf.keras's pickled bytecode, is not known."""
    config = _dict(layer.get("config"))
    function = _dict(config.get("function"))
    name = function.get("config")
    if function.get("class_name") != "function" or not isinstance(name, str) or config.get("arguments") not in (None, {}):
        return False
    given = custom_objects.get(name)
    module = str(getattr(given, "__module__", ""))
    return callable(given) and getattr(given, "__name__", "") == "preprocess_input" and module.endswith(_VGG_PREPROCESS_MODULES)


def _keras_tensor_ref(value) -> Optional[Tuple[str, int, int]]:
    """[name, node, index] of a Keras 3 serialised tensor argument, or None."""
    if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        history = _dict(value.get("config")).get("keras_history")
        if isinstance(history, list) and len(history) == 3 and isinstance(history[0], str):
            return history[0], _int(history[1]), _int(history[2])
    return None


def _dict(value) -> dict:
    """value where it is a dict, else an empty one: config entries a damaged file may replace."""
    return value if isinstance(value, dict) else {}


def _collapse_channel_stacks(layers: Dict[str, dict]) -> None:
    """Keras 3 writes preprocess_input's x[..., ::-1] as Stack([x[..., C-1], ..., x[..., 0]],
    axis=-1) over C GetItem layers of one tensor: a branch fastvgg's chain cannot hold. Where
    exactly that appears (each GetItem read by the Stack alone), the GetItems are dropped and the
    Stack becomes one "_ReverseChannels" layer reading the tensor; anything else stays as it is
    (and is refused as a branch or an unsupported op)."""
    for name, layer in list(layers.items()):
        if _class_name(layer) != "Stack" or _dict(layer.get("config")).get("axis", 0) not in (-1, 3):
            continue
        nodes = layer.get("inbound_nodes")
        if not (isinstance(nodes, list) and len(nodes) == 1 and isinstance(nodes[0], dict)):
            continue
        args = nodes[0].get("args")
        if not (isinstance(args, list) and len(args) == 1 and isinstance(args[0], list) and args[0]):
            continue
        parts = [_keras_tensor_ref(part) for part in args[0]]
        if any(ref is None or ref[0] not in layers or ref[2] != 0 for ref in parts):
            continue
        sources, indices = set(), []
        for ref in parts:
            item = layers[ref[0]]
            item_nodes = item.get("inbound_nodes")
            if _class_name(item) != "GetItem" or not (isinstance(item_nodes, list) and len(item_nodes) == 1):
                break
            item_args = item_nodes[0].get("args") if isinstance(item_nodes[0], dict) else None
            if not (isinstance(item_args, list) and len(item_args) == 2):
                break
            source, key = _keras_tensor_ref(item_args[0]), item_args[1]
            if source is None or not (isinstance(key, list) and len(key) == 2 and _is_ellipsis(key[0])):
                break
            if not isinstance(key[1], int) or isinstance(key[1], bool):
                break
            sources.add(source)
            indices.append(key[1])
        else:
            channels, items = len(parts), {ref[0] for ref in parts}
            readers = [other for other, entry in layers.items() for ref in _all_refs(entry) if ref[0] in items]
            if len(sources) == 1 and indices == list(range(channels - 1, -1, -1)) and set(readers) == {name}:
                (source,) = sources
                for item in items:
                    layers.pop(item)
                layers[name] = {
                    "class_name": "_ReverseChannels",
                    "name": name,
                    "config": {"name": name, "channels": channels},
                    "inbound_nodes": [{"args": [{"class_name": "__keras_tensor__", "config": {"keras_history": list(source)}}]}],
                }


def _all_refs(layer: dict) -> List[Tuple[str, int, int]]:
    refs: List[Tuple[str, int, int]] = []
    nodes = layer.get("inbound_nodes")
    for node in nodes if isinstance(nodes, list) else []:
        try:
            refs.extend(_node_inputs(node)[0])
        except UnsupportedModelError:
            pass
    return refs


def _is_ellipsis(value) -> bool:
    return isinstance(value, dict) and value.get("class_name") == "__ellipsis__"


def _is_reversing_slice(value) -> bool:
    """Keras 3's {"class_name": "__slice__", "config": {...}} or tf.keras's {"start": ..., ...}
    for slice(None, None, -1)."""
    if isinstance(value, dict) and value.get("class_name") == "__slice__":
        value = value.get("config")
    return isinstance(value, dict) and value.get("start") is None and value.get("stop") is None and value.get("step") == -1


def _tensor_refs(value) -> List[Tuple[str, int, int]]:
    """Functional input_layers / output_layers: Keras 3 stores one ref as [name, node, index],
    and the refs of a model built on dicts (Model({"image": x}, {"scores": y})) as a dict."""
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, list):
        return []
    if len(value) == 3 and isinstance(value[0], str):
        value = [value]
    refs = []
    for ref in value:
        if not (isinstance(ref, list) and len(ref) >= 3 and isinstance(ref[0], str)):
            raise UnsupportedModelError(f"a model's input or output reference {ref!r} is not Keras's [name, node, index].")
        refs.append((ref[0], _int(ref[1]), _int(ref[2])))
    return refs


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnsupportedModelError(f"expected an integer in a tensor reference, got {value!r}.")
    return value


def _node_inputs(node) -> Tuple[List[Tuple[str, int, int]], bool]:
    """The tensors one call of a layer reads, and whether it was called with training=True in a
    way that Keras keeps at inference.

    Only tf.keras (Keras 2) keeps a recorded training=True when the model predicts (Monte Carlo
    dropout). Keras 3 records training=True for every call of a layer whose call defaults to it
    (RandomFlip and the other augmentation layers), and its Functional call replaces the
    recorded value with predict's training=False, so those layers are the identity there.

    Keras 3: {"args": [...], "kwargs": {...}} with tensors as {"class_name": "__keras_tensor__",
    "config": {"keras_history": [name, node, index]}}; Keras 2: [[name, node, index, kwargs], ...].
    """
    refs: List[Tuple[str, int, int]] = []
    training = False
    if isinstance(node, dict):

        def collect(value, depth=0):
            if depth > 8:
                return
            if isinstance(value, dict):
                if value.get("class_name") == "__keras_tensor__":
                    ref = _keras_tensor_ref(value)
                    if ref is None:
                        history = _dict(value.get("config")).get("keras_history")
                        raise UnsupportedModelError(f"a tensor in the model config has no valid keras_history: {history!r}.")
                    refs.append(ref)
                else:
                    for item in value.values():
                        collect(item, depth + 1)
            elif isinstance(value, list):
                for item in value:
                    collect(item, depth + 1)

        collect(node.get("args"))
        kwargs = node.get("kwargs") or {}
        collect(kwargs)  # Keras 3's format: a recorded training=True does not survive predict
    elif isinstance(node, list):
        if node and isinstance(node[0], str):
            node = [node]  # tf.keras's TFOpLambda: the node is its one entry, [name, node, index, kwargs]
        for entry in node:
            if not (isinstance(entry, list) and len(entry) >= 3 and isinstance(entry[0], str)):
                raise UnsupportedModelError(f"an inbound node entry {entry!r} is not Keras's [name, node, index, kwargs].")
            refs.append((entry[0], _int(entry[1]), _int(entry[2])))
            if len(entry) > 3 and isinstance(entry[3], dict) and entry[3].get("training") is True:
                training = True
    else:
        raise UnsupportedModelError(f"an inbound node {node!r} is in no format Keras writes.")
    return refs, training


def _shape_list(value) -> Optional[Shape]:
    if not isinstance(value, (list, tuple)):
        return None
    dims = []
    for d in value:
        if d is None:
            dims.append(None)
        elif isinstance(d, int) and not isinstance(d, bool) and 0 < d <= (1 << 20):
            dims.append(int(d))
        else:
            raise UnsupportedModelError(f"shape {value!r} in the model config has a dimension that is not a positive integer.")
    return tuple(dims)


def _input_shape(layer: dict) -> Optional[Shape]:
    config = layer.get("config") or {}
    for key in ("batch_shape", "batch_input_shape"):
        shape = _shape_list(config.get(key))
        if shape is not None:
            return shape
    shape = _shape_list(config.get("input_shape") or config.get("shape"))
    return (None,) + shape if shape is not None else None


def _declared_input_shape(layer: dict) -> Optional[Shape]:
    config = layer.get("config") or {}
    for key in ("batch_shape", "batch_input_shape"):
        shape = _shape_list(config.get(key))
        if shape is not None:
            return shape
    build = layer.get("build_config") or {}
    return _shape_list(build.get("input_shape")) if isinstance(build, dict) else None


def _build_input_shape(config: dict, inner: dict) -> Optional[Shape]:
    shape = _shape_list(inner.get("build_input_shape"))
    if shape is None and isinstance(config.get("build_config"), dict):
        shape = _shape_list(config["build_config"].get("input_shape"))
    return shape


# Layer specs and their shapes ------------------------------------------------------------------------------
def _activation(name, value, path: str) -> str:
    if isinstance(value, dict):  # Keras 3 may store {"class_name": "function", "config": "relu", ...}
        value = value.get("config") if isinstance(value.get("config"), str) else value.get("class_name")
    if value is not None and not isinstance(value, str):
        raise UnsupportedModelError(f"{path!r}: layer {name!r} has activation {value!r}, which names no activation.")
    value = _ACTIVATION_ALIASES.get(value, value)
    if value not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"{path!r}: layer {name!r} uses activation {value!r}, which fastvgg does not have. "
            f"Supported activations: {', '.join(ACTIVATIONS)}."
        )
    return value


def _set_activation(spec: LayerSpec, activation: str, negative_slope: Optional[float] = None) -> None:
    """Sets spec's activation and, for leaky_relu, its slope rounded to float32 (TensorFlow
    multiplies by a float32 slope; the kernels and the numpy yardstick use that value).
    Keras 3's "relu6" is min(max(x, 0), 6): the core runs it as clipped_relu with a cap of 6."""
    spec.activation = activation
    spec.max_value, spec.threshold = None, 0.0
    if activation == "relu6":
        spec.max_value, spec.negative_slope = 6.0, 0.0
        return
    if activation != "leaky_relu":
        spec.negative_slope = 0.0
        return
    slope = _LEAKY_RELU_ACTIVATION_SLOPE if negative_slope is None else negative_slope
    spec.negative_slope = _float32(spec, "negative slope", slope)


def _float32(spec: LayerSpec, what: str, value) -> float:
    """A number of the config as the float32 TensorFlow computes with; refused beyond its range."""
    with np.errstate(over="ignore"):
        rounded = float(np.float32(value))
    if not math.isfinite(rounded):
        raise UnsupportedModelError(f"layer {spec.name!r} has a {what} {value!r} beyond float32's range.")
    return rounded


def _set_relu(spec: LayerSpec, negative_slope: float, max_value: Optional[float], threshold: float, refuse) -> None:
    """Keras's ReLU layer (and activations.relu): without a cap or threshold it is relu, or
    tf.nn.leaky_relu(x, negative_slope) as Keras calls it then; else the core's clipped_relu,
    which follows Keras's steps (x above the threshold, clipped to [0, max_value]; below it
    -(negative_slope * (threshold - x))). Keras itself refuses negative numbers here."""
    if negative_slope < 0 or (max_value is not None and max_value < 0):
        refuse(f"has negative_slope {negative_slope!r} or max_value {max_value!r} below 0, which Keras refuses.")
    spec.kind = "activation"
    if max_value is None and not threshold:
        _set_activation(spec, "leaky_relu", negative_slope)
        if spec.negative_slope == 0.0:
            spec.activation = "relu"
        return
    spec.activation = "clipped_relu"
    spec.negative_slope = _float32(spec, "negative slope", negative_slope)
    spec.max_value = None if max_value is None else _float32(spec, "max_value", max_value)
    spec.threshold = _float32(spec, "threshold", threshold)


def _scalar(value, refuse) -> Optional[float]:
    """A number from a config: a float, a one-element list or Keras's serialised numpy scalar;
    None stays None."""
    if isinstance(value, dict):  # {"class_name": "__numpy__", "config": {"value": ..., "dtype": ...}}
        value = _dict(value.get("config")).get("value")
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        refuse(f"has a setting {value!r} where a finite number belongs.")
    return float(value)


def _pair(value, name: str, what: str, path: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise UnsupportedModelError(f"{path!r}: layer {name!r} has {what} {value!r}; expected two integers.")


def _zero_padding(value, refuse) -> Tuple[int, int, int, int]:
    """ZeroPadding2D's padding, (top, bottom, left, right), from Keras's three forms: n,
    (rows, columns), or ((top, bottom), (left, right))."""
    def count(v):
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65536:
            return v
        refuse(f"has padding {value!r}; expected an int, two ints, or two pairs of ints.")

    if isinstance(value, (list, tuple)) and len(value) == 2:
        if all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
            return count(value[0][0]), count(value[0][1]), count(value[1][0]), count(value[1][1])
        rows, columns = count(value[0]), count(value[1])
        return rows, rows, columns, columns
    n = count(value)
    return n, n, n, n


def _pooled(size: Optional[int], padding: str) -> Optional[int]:
    if size is None:
        return None
    return (size + 1) // 2 if padding == "same" else size // 2


def _specs(leaves: List[dict], input_name: str, input_shape: Shape, path: str,
           branch_inputs: Optional[Dict[str, str]] = None, merge_inputs: Optional[Dict[str, List[str]]] = None) -> List[LayerSpec]:
    if len(input_shape) != 4:
        raise UnsupportedModelError(
            f"{path!r}: the model's input has shape {input_shape}; fastvgg runs image models, input (batch, height, width, channels)."
        )
    if input_shape[3] is None:
        raise UnsupportedModelError(f"{path!r}: the model's input has no fixed channel count ({input_shape}).")
    shape: Shape = tuple(input_shape[1:])
    specs = [LayerSpec(input_name or "input_layer", "InputLayer", "input", {}, shape, shape)]
    shapes = {specs[0].name: shape}
    branch_inputs = branch_inputs or {}
    for layer in leaves:
        name = _layer_name(layer)
        if name in branch_inputs:
            shape = shapes[branch_inputs[name]]
        if merge_inputs and name in merge_inputs:
            spec = _merge_spec(layer, [shapes[source] for source in merge_inputs[name]], path)
        else:
            spec = _spec(layer, shape, path)
        if spec.name in shapes:
            raise UnsupportedModelError(
                f"{path!r}: two layers are named {spec.name!r} once the nested models are flattened; fastvgg needs "
                "unique layer names. Rename one in Keras (layer.name) and save again."
            )
        specs.append(spec)
        shape = shapes[spec.name] = spec.output_shape
    _fold_zero_padding(specs, path, branch_inputs, merge_inputs)
    return specs


def _fold_zero_padding(specs: List[LayerSpec], path: str, branch_inputs: Optional[Dict[str, str]] = None,
                       merge_inputs: Optional[Dict[str, List[str]]] = None) -> None:
    """ZeroPadding2D(1) followed by a 'valid' 3x3 Conv2D (how VGG ported from Caffe, and VGG
    written out by hand in early Keras, pad) is exactly a 'same' 3x3 convolution of the
    unpadded image: fastvgg runs the pair as that, with its fast kernels. The padded image
    itself is never computed, so nothing else may read it. Padding anywhere else is refused."""
    branch_inputs, merge_inputs = branch_inputs or {}, merge_inputs or {}
    # Layers read by another than the layer after them in the order.
    read_elsewhere = set(branch_inputs.values()) | {name for names in merge_inputs.values() for name in names}
    for position, spec in enumerate(specs):
        if spec.kind != "zero_pad":
            continue
        after = specs[position + 1] if position + 1 < len(specs) else None
        if after is not None and (after.name in branch_inputs or after.name in merge_inputs):
            after = None  # the next layer in the order starts another chain: nothing reads the padding after it
        if spec.name in read_elsewhere:
            raise UnsupportedModelError(
                f"{path!r}: layer {spec.name!r} (ZeroPadding2D) feeds several layers; fastvgg runs ZeroPadding2D only "
                "as the border of the one 'valid' 3x3 Conv2D that reads it. Use Conv2D(padding='same') instead."
            )
        if spec.pad != (1, 1, 1, 1) or after is None or not (
            after.kind == "conv" and after.kernel_size == 3 and after.padding == "valid"
        ):
            what = f"then layer {after.name!r} ({after.class_name})" if after is not None else "at the end of the model"
            raise UnsupportedModelError(
                f"{path!r}: layer {spec.name!r} (ZeroPadding2D) pads by (top, bottom, left, right) = {spec.pad}, "
                f"{what}. fastvgg runs ZeroPadding2D only as a 1-pixel border read by a 'valid' 3x3 Conv2D right "
                "after it (the pair is a 'same' convolution); use Conv2D(padding='same') instead and save again."
            )
        after.padding, after.input_shape = "same", spec.input_shape
        spec.kind, spec.folded_into = "identity", after.name


# Dtype policies whose weights are float32. Under a mixed policy Keras keeps float32 variables and
# computes in float16 or bfloat16 only to train fast on a GPU; fastvgg runs the same weights in
# float32, which is what the model computes without float16's rounding (the README says how far
# that is from Keras's float16 run). A pure "float16" or "bfloat16" model is refused: its weights
# and every activation are 16-bit in Keras, where VGG's activations can overflow float16.
_FLOAT32_VARIABLE_POLICIES = (None, "float32", "mixed_float16", "mixed_bfloat16")


def _dtype_policy_name(dtype):
    """The policy's name from a layer config's "dtype": a string, Keras 3's DTypePolicy dict or
    tf.keras's Policy dict ({"class_name": ..., "config": {"name": "mixed_float16", ...}})."""
    return _dict(dtype.get("config")).get("name") if isinstance(dtype, dict) else dtype


def _checked_spec(layer: dict, shape: Shape, path: str):
    """A layer's spec as the identity (the callers set what it computes), its config, and the
    function that refuses it with a reason; refused here: what no layer of fastvgg's computes
    (channels first, 16-bit computation)."""
    name, class_name = _layer_name(layer), _class_name(layer)
    config = layer.get("config") or {}
    spec = LayerSpec(name, class_name, "identity", config, shape, shape)
    spec.trainable = config.get("trainable", True) is not False and not layer.get(_FROZEN_BY_PARENT, False)

    def refuse(reason: str):
        raise UnsupportedModelError(f"{path!r}: layer {name!r} ({class_name}) {reason}")

    if config.get("data_format") not in (None, "channels_last"):
        refuse(f"uses data_format={config.get('data_format')!r}; only channels_last is supported.")
    policy = _dtype_policy_name(config.get("dtype"))
    if policy not in _FLOAT32_VARIABLE_POLICIES:
        refuse(
            f"computes in dtype {policy!r}; fastvgg runs float32 models, and models trained under a mixed "
            "precision policy ('mixed_float16', 'mixed_bfloat16'), whose weights are float32."
        )
    return spec, config, refuse


def _merge_spec(layer: dict, shapes: List[Shape], path: str) -> LayerSpec:
    """A merge of several tensors (kind "merge"): Concatenate along the last axis, or the
    elementwise Add, Subtract, Multiply, Average, Maximum, Minimum of tensors of one shape."""
    spec, config, refuse = _checked_spec(layer, shapes[0], path)
    rank = len(shapes[0])
    if spec.class_name == "Concatenate":
        axis = config.get("axis", -1)
        if any(len(s) != rank for s in shapes) or axis not in (-1, rank):
            refuse(f"concatenates inputs of shapes {shapes} along axis {axis!r}; fastvgg concatenates along the last "
                   "axis (channels, or features) only.")
        if any(tuple(s[:-1]) != tuple(shapes[0][:-1]) or s[-1] is None for s in shapes):
            refuse(f"concatenates inputs of shapes {shapes}, which differ before the last axis.")
        spec.merge = "concatenate"
        spec.output_shape = tuple(shapes[0][:-1]) + (sum(s[-1] for s in shapes),)
    else:
        if any(tuple(s) != tuple(shapes[0]) for s in shapes):
            refuse(f"merges inputs of shapes {shapes}; fastvgg merges tensors of one shape (no broadcasting).")
        if spec.class_name == "Subtract" and len(shapes) != 2:
            refuse(f"subtracts {len(shapes)} inputs; Subtract takes exactly two.")
        spec.merge = spec.class_name.lower()
    spec.kind = "merge"
    spec.input_shapes = [tuple(s) for s in shapes]
    return spec


def _spec(layer: dict, shape: Shape, path: str) -> LayerSpec:
    spec, config, refuse = _checked_spec(layer, shape, path)
    name, class_name = spec.name, spec.class_name
    spatial = len(shape) == 3

    def need_spatial():
        if not spatial:
            refuse(f"needs an image input (height, width, channels), but its input has shape {shape}.")

    if class_name in _IDENTITY_AT_INFERENCE:
        return spec
    if class_name in MERGE_LAYERS and class_name not in _PREPROCESSING_OPS:
        refuse("merges a single tensor; Keras merges two or more.")
    if class_name == "ZeroPadding2D":
        need_spatial()
        spec.kind, spec.pad = "zero_pad", _zero_padding(config.get("padding", 1), refuse)
        h, w, c = shape
        top, bottom, left, right = spec.pad
        spec.output_shape = (None if h is None else h + top + bottom, None if w is None else w + left + right, c)
        return spec
    if class_name in _PREPROCESSING_OPS:
        return _preprocessing_spec(spec, layer, refuse)
    if class_name == "Lambda":  # accepted by the flattener only as VGG's preprocess_input
        if len(shape) != 3 or shape[-1] != 3:
            refuse(f"is preprocess_input applied to an input of shape {shape}; it takes RGB images.")
        from .imagenet import CAFFE_BGR_MEAN

        spec.kind, spec.reverses_input = "affine", True
        spec.scale = _per_channel(1.0, 3, refuse, "scale")
        spec.shift = -np.asarray(CAFFE_BGR_MEAN, dtype=np.float64)
        return spec
    if class_name == "Conv2D":
        need_spatial()
        kh, kw = _pair(config.get("kernel_size"), name, "kernel_size", path)
        if (kh, kw) not in ((1, 1), (3, 3)):
            refuse(f"has kernel_size {(kh, kw)}; supported are (3, 3) and (1, 1).")
        if _pair(config.get("strides", 1), name, "strides", path) != (1, 1):
            refuse(f"has strides {config.get('strides')}; only stride 1 is supported.")
        if _pair(config.get("dilation_rate", 1), name, "dilation_rate", path) != (1, 1):
            refuse(f"has dilation_rate {config.get('dilation_rate')}; only 1 is supported.")
        if config.get("groups", 1) != 1:
            refuse(f"has groups={config.get('groups')}; only 1 is supported.")
        padding = config.get("padding", "valid")
        if padding not in ("same", "valid"):
            refuse(f"has padding {padding!r}; supported are 'same' and 'valid'.")
        filters = config.get("filters")
        if not isinstance(filters, int) or isinstance(filters, bool) or not 0 < filters <= 65536:
            refuse(f"has filters={filters!r}.")
        spec.kind, spec.units, spec.kernel_size = "conv", filters, kh
        spec.padding = "same" if kh == 1 else padding
        spec.use_bias = bool(config.get("use_bias", True))
        _set_activation(spec, _activation(name, config.get("activation"), path))
        h, w, c = shape
        if spec.padding == "valid" and kh == 3:
            h, w = (None if h is None else h - 2), (None if w is None else w - 2)
            if (h is not None and h < 1) or (w is not None and w < 1):
                refuse(f"is a 'valid' 3x3 convolution of a {shape[0]}x{shape[1]} input, which leaves nothing.")
        spec.output_shape = (h, w, filters)
        spec.weight_names = ["kernel"] + (["bias"] if spec.use_bias else [])
        spec.weight_shapes = [(kh, kw, c, filters)] + ([(filters,)] if spec.use_bias else [])
        return spec
    if class_name in ("MaxPooling2D", "AveragePooling2D"):
        need_spatial()
        pool = _pair(config.get("pool_size", 2), name, "pool_size", path)
        strides = config.get("strides")
        strides = pool if strides is None else _pair(strides, name, "strides", path)
        if pool != (2, 2) or strides != (2, 2):
            refuse(f"has pool_size {pool} and strides {strides}; only 2x2 pooling with stride 2 is supported.")
        padding = config.get("padding", "valid")
        if padding not in ("same", "valid"):
            refuse(f"has padding {padding!r}; supported are 'same' and 'valid'.")
        spec.kind = "max_pool" if class_name == "MaxPooling2D" else "avg_pool"
        spec.padding = padding
        h, w, c = shape
        spec.output_shape = (_pooled(h, padding), _pooled(w, padding), c)
        if 0 in spec.output_shape[:2]:
            refuse(f"pools a {h}x{w} input to nothing.")
        return spec
    if class_name == "UpSampling2D":
        need_spatial()
        size = _pair(config.get("size", 2), name, "size", path)
        if not all(1 <= factor <= 4096 for factor in size):
            refuse(f"has size {size}; expected factors from 1 to 4096.")
        interpolation = config.get("interpolation", "nearest")
        if interpolation != "nearest":
            refuse(f"interpolates {interpolation!r}; fastvgg upsamples with interpolation='nearest' only.")
        spec.kind, spec.size = "upsample", size
        h, w, c = shape
        spec.output_shape = (None if h is None else h * size[0], None if w is None else w * size[1], c)
        return spec
    if class_name == "UnitNormalization":
        axis = config.get("axis", -1)
        if len(shape) != 1:
            refuse(f"normalizes an input of shape {shape}; fastvgg applies UnitNormalization to flat (batch, features) "
                   "rows only: put a Flatten or global pooling before it.")
        if axis not in _FEATURES_AXES:
            refuse(f"normalizes over axis {axis!r}; on flat rows only the features axis (-1) is supported.")
        spec.kind = "l2_normalize"
        return spec
    if class_name == "Reshape":
        # To one axis (Reshape((-1,)) or Reshape((n,))) it is Flatten: both keep the NHWC order.
        target = config.get("target_shape")
        if not (isinstance(target, (list, tuple)) and len(target) == 1 and isinstance(target[0], int)
                and not isinstance(target[0], bool)):
            refuse(f"reshapes to {target!r}; fastvgg supports Reshape only to one axis ((-1,) or (n,)), as Flatten does.")
        size = None if None in shape else int(np.prod(shape))
        if target[0] != -1 and target[0] != size:
            refuse(f"reshapes an input of shape {shape} to {tuple(target)}" +
                   ("; save the model with a fixed input size." if size is None else "."))
        class_name = "Flatten"  # below; spec.class_name stays Keras's
    if class_name == "Flatten":
        spec.kind = "flatten"
        if len(shape) == 1:
            return spec
        if None in shape:
            refuse(f"flattens an input of unknown size {shape}; save the model with a fixed input size.")
        spec.output_shape = (int(np.prod(shape)),)
        return spec
    if class_name in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        need_spatial()
        spec.kind = "global_pool"
        spec.pool_mode = "avg" if class_name == "GlobalAveragePooling2D" else "max"
        spec.keepdims = bool(config.get("keepdims", False))
        spec.output_shape = (1, 1, shape[2]) if spec.keepdims else (shape[2],)
        return spec
    if class_name == "Dense":
        # On an image Keras applies the same matrix to every pixel's channels: fastvgg runs that
        # as the 1x1 convolution it is (saved_model._add_op), softmax excepted.
        if len(shape) not in (1, 3):
            refuse(f"is applied to an input of shape {shape}; fastvgg applies Dense to flat rows or to images.")
        units = config.get("units")
        if not isinstance(units, int) or isinstance(units, bool) or not 0 < units <= (1 << 20):
            refuse(f"has units={units!r}.")
        spec.kind, spec.units = "dense", units
        spec.use_bias = bool(config.get("use_bias", True))
        _set_activation(spec, _activation(name, config.get("activation"), path))
        spec.output_shape = shape[:-1] + (units,)
        spec.weight_names = ["kernel"] + (["bias"] if spec.use_bias else [])
        spec.weight_shapes = [(shape[-1], units)] + ([(units,)] if spec.use_bias else [])
        return spec
    if class_name == "BatchNormalization":
        axis = config.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if axis not in (-1, len(shape)):
            refuse(f"normalises axis {config.get('axis')!r}; only the channel (last) axis is supported.")
        if config.get("renorm") or config.get("virtual_batch_size") or config.get("adjustment"):
            refuse("uses batch renormalisation or virtual batches, which fastvgg does not run.")
        epsilon = config.get("epsilon", 1e-3)
        if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not epsilon >= 0:
            refuse(f"has epsilon={epsilon!r}.")
        spec.kind = "affine"
        channels = shape[-1]
        spec.weight_names = (["gamma"] if config.get("scale", True) else []) + (["beta"] if config.get("center", True) else []) + [
            "moving_mean",
            "moving_variance",
        ]
        spec.weight_shapes = [(channels,)] * len(spec.weight_names)
        return spec
    if class_name == "Rescaling":
        spec.kind = "affine"
        channels = shape[-1]
        spec.scale = _per_channel(config.get("scale", 1.0), channels, refuse, "scale")
        spec.shift = _per_channel(config.get("offset", 0.0), channels, refuse, "offset")
        return spec
    if class_name == "Normalization":
        axis = config.get("axis", -1)
        axis = tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)
        if axis not in ((-1,), (len(shape),)):
            refuse(f"normalises axis {config.get('axis')!r}; only the channel (last) axis is supported.")
        spec.kind = "affine"
        channels = shape[-1]
        if config.get("mean") is not None or config.get("variance") is not None:
            mean = _per_channel(config.get("mean"), channels, refuse, "mean")
            variance = _per_channel(config.get("variance"), channels, refuse, "variance")
            _set_normalization(spec, mean, variance, bool(config.get("invert", False)))
        else:
            spec.weight_names = ["mean", "variance", "count"]
            spec.weight_shapes = [(channels,), (channels,), ()]
        return spec
    if class_name == "PReLU":
        # alpha has the input's shape with each of shared_axes (1-based, as Keras counts them
        # after the batch axis) set to 1.
        shared = config.get("shared_axes")
        shared = [] if shared is None else list(shared) if isinstance(shared, (list, tuple)) else [shared]
        if any(not isinstance(a, int) or isinstance(a, bool) or not 1 <= a <= len(shape) for a in shared):
            refuse(f"shares alpha along axes {config.get('shared_axes')!r}; they must be among 1..{len(shape)}.")
        alpha_shape = tuple(1 if axis in shared else size for axis, size in enumerate(shape, start=1))
        if None in alpha_shape:
            refuse("has an alpha along an axis of unknown size; give the model a fixed input size or share alpha "
                   "along that axis (shared_axes).")
        spec.kind = "prelu"
        spec.weight_names, spec.weight_shapes = ["alpha"], [alpha_shape]
        return spec
    if class_name == "Activation":
        spec.kind = "activation"
        _set_activation(spec, _activation(name, config.get("activation"), path))
    elif class_name == "ReLU":
        max_value, threshold = _scalar(config.get("max_value"), refuse), _scalar(config.get("threshold", 0.0), refuse)
        _set_relu(spec, _scalar(config.get("negative_slope", 0.0), refuse) or 0.0, max_value, threshold or 0.0, refuse)
    elif class_name == "ELU":
        # Keras computes alpha * elu(x) below 0 when alpha is not 1: another rounding the
        # kernels do not make.
        if _scalar(config.get("alpha", 1.0), refuse) != 1.0:
            refuse(f"has alpha={config.get('alpha')!r}; fastvgg runs the ELU layer with Keras's default alpha of 1.")
        spec.kind = "activation"
        _set_activation(spec, "elu")
    elif class_name == "ThresholdedReLU":
        # tf.keras's x * (x > theta): x above theta, else 0 (a ReLU with a threshold and no slope).
        theta = _scalar(config.get("theta", 1.0), refuse)
        _set_relu(spec, 0.0, None, 1.0 if theta is None else theta, refuse)
    elif class_name == "LeakyReLU":
        # Keras 3 names the slope negative_slope, tf.keras alpha; both default to 0.3.
        slope = config.get("negative_slope", config.get("alpha", 0.3))
        spec.kind = "activation"
        _set_activation(spec, "leaky_relu", _scalar(slope, refuse))
    elif class_name == "Softmax":
        axis = config.get("axis", -1)
        if axis not in (-1, [-1], len(shape)):
            refuse(f"applies softmax over axis {axis!r}; only the last axis is supported.")
        spec.kind, spec.activation = "activation", "softmax"
    else:  # pragma: no cover - every supported class is handled above
        refuse("is not supported.")
    if spec.activation == "softmax" and len(shape) not in (1, 3):
        refuse(f"applies softmax to an input of shape {shape}; fastvgg applies it to images and flat rows.")
    return spec


def _preprocessing_spec(spec: LayerSpec, layer: dict, refuse) -> LayerSpec:
    """Keras's preprocessing ops inside a model (see _PREPROCESSING_OPS): a channel reversal
    (kind "reverse_channels"; saved_model runs it on the model's input) or arithmetic with a
    constant per channel (an "affine" map)."""
    shape, class_name = spec.input_shape, spec.class_name
    config = layer.get("config") or {}
    nodes = layer.get("inbound_nodes")
    node = nodes[0] if isinstance(nodes, list) and len(nodes) == 1 else None
    if isinstance(node, dict):  # Keras 3: {"args": [tensor, ...], "kwargs": {...}}
        args = node.get("args") if isinstance(node.get("args"), list) else []
        kwargs = node.get("kwargs") if isinstance(node.get("kwargs"), dict) else {}
    elif isinstance(node, list) and node and isinstance(node[0], (str, list)):
        # tf.keras: [[name, node, index, kwargs]], or for TFOpLambda the entry itself
        entry = node if isinstance(node[0], str) else node[0]
        args, kwargs = [], entry[3] if len(entry) > 3 and isinstance(entry[3], dict) else {}
    else:
        refuse("is an op recorded without its call; fastvgg cannot tell what it computes.")
    channels = shape[-1]
    reversal = "reverses the channel order (x[..., ::-1], as preprocess_input does)"

    def reverse_channels() -> LayerSpec:
        if len(shape) != 3:
            refuse(f"{reversal} of an input of shape {shape}; fastvgg does that to images only.")
        spec.kind = "reverse_channels"
        return spec

    def arithmetic(operation: str, value, tensor_first: bool = True) -> LayerSpec:
        """x op c (or c op x) with a constant c, one value or one per channel: an affine map.
        Multiplying by 1/c for x / c may differ from TensorFlow's division in the last bit."""
        if isinstance(value, dict) and value.get("class_name") in ("__tensor__", "__numpy__"):
            value = _dict(value.get("config")).get("value")
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            refuse(f"computes {operation} with a constant that is not a number or a list of numbers.")
        if array.dtype != np.float64 or (array.ndim > 1 and any(d != 1 for d in array.shape[:-1])):
            refuse(f"computes {operation} with a constant of shape {array.shape}; fastvgg takes one value per channel.")
        c = _per_channel(array.reshape(-1), channels, refuse, "constant")
        one, zero = np.ones(channels), np.zeros(channels)
        if operation == "divide" and (not tensor_first or not np.all(c != 0)):
            refuse("divides by its input or by zero; fastvgg divides its input by nonzero constants only.")
        spec.kind = "affine"
        if operation == "add":
            spec.scale, spec.shift = one, c
        elif operation == "subtract":
            spec.scale, spec.shift = (one, -c) if tensor_first else (-one, c)
        elif operation == "multiply":
            spec.scale, spec.shift = c, zero
        else:
            spec.scale, spec.shift = 1.0 / c, zero
        return spec

    def l2_normalize(axis, epsilon) -> LayerSpec:
        """tf.math.l2_normalize: x * rsqrt(max(sum of squares, epsilon)) over `axis`."""
        if len(shape) != 1 or axis not in _FEATURES_AXES:
            refuse(f"calls tf.math.l2_normalize over axis {axis!r} of an input of shape {shape}; fastvgg normalizes "
                   "the features (axis 1 or -1) of flat (batch, features) rows only.")
        cap = 1.0 / math.sqrt(epsilon) if isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and epsilon > 0 else 0.0
        if not 0 < np.float32(cap) < np.inf:  # the core keeps the cap in float32
            refuse(f"calls tf.math.l2_normalize with epsilon={epsilon!r}; expected a positive number within float32's range.")
        spec.kind, spec.max_inverse_norm = "l2_normalize", cap
        return spec

    if class_name == "_ReverseChannels":
        spec.class_name = "Stack"  # what Keras calls the layer (its GetItems are folded into it)
        if config.get("channels") != channels:
            refuse(f"stacks {config.get('channels')} of the {channels} channels of its input in reverse; only a full reversal is supported.")
        return reverse_channels()
    if class_name == "GetItem":  # Keras 3, x[..., ::-1]
        key = args[1] if len(args) == 2 else None
        if isinstance(key, list) and len(key) == 2 and _is_ellipsis(key[0]) and _is_reversing_slice(key[1]):
            return reverse_channels()
        refuse(f"indexes its input with {key!r}; fastvgg supports indexing only as x[..., ::-1], which {reversal}.")
    if class_name == "SlicingOpLambda":  # tf.keras, x[..., ::-1]
        key = kwargs.get("slice_spec")
        if config.get("function") == "__operators__.getitem" and isinstance(key, list) and len(key) == 2 and (
            _is_ellipsis(key[0]) and _is_reversing_slice(key[1])
        ):
            return reverse_channels()
        refuse(f"slices its input with {key!r}; fastvgg supports slicing only as x[..., ::-1], which {reversal}.")
    if class_name == "TFOpLambda":
        function = config.get("function")
        if function == "nn.bias_add" and kwargs.get("data_format") in (None, "NHWC", "N...C"):
            return arithmetic("add", kwargs.get("bias"))
        if isinstance(function, str) and function in _TF_ARITHMETIC and "y" in kwargs:
            y = kwargs.get("y")
            if isinstance(y, list) and len(y) >= 3 and isinstance(y[0], str):  # [layer name, node, index]: a tensor
                refuse(f"computes {_TF_ARITHMETIC[function]} of two tensors with a TensorFlow op (tf.{function}); fastvgg "
                       "merges tensors with Keras's merge layers: use keras.layers.Add()([x, y]) (or Subtract, "
                       "Multiply) and save again.")
            return arithmetic(_TF_ARITHMETIC[function], y)
        if function == "math.l2_normalize":  # tf.math.l2_normalize and tf.nn.l2_normalize
            return l2_normalize(kwargs.get("axis"), kwargs.get("epsilon", 1e-12))
        refuse(
            f"calls tf.{function}; of TensorFlow functions recorded in a model fastvgg runs only tf.nn.bias_add "
            "(as preprocess_input records it), +, -, *, / with a constant, and tf.math.l2_normalize over the "
            "features of flat rows. Use Keras layers (e.g. Rescaling, UnitNormalization) and save again."
        )
    # Keras 3's ops with one tensor and one constant (x / 255.0, preprocess_input's Add). The merge
    # layers of the same names read two tensors and were refused as merges before this.
    constants = [a for a in args if _keras_tensor_ref(a) is None]
    if len(args) == 2 and len(constants) == 1:
        return arithmetic(_KERAS3_ARITHMETIC[class_name], constants[0], tensor_first=constants[0] is args[1])
    refuse(f"computes {_KERAS3_ARITHMETIC[class_name]} of tensors; fastvgg supports it only with a constant and its one input.")


def _per_channel(value, channels: int, refuse, what: str) -> np.ndarray:
    if isinstance(value, dict):  # Keras 3 may serialise arrays as {"class_name": "__numpy__", "config": {"value": ...}}
        value = _dict(value.get("config")).get("value")
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        refuse(f"has a {what} that is not a number or a list of numbers: {value!r}.")
    if array.dtype != np.float64 or array.size not in (1, channels):
        refuse(f"has a {what} of {array.size} values for {channels} channels.")
    if not np.all(np.isfinite(array)):
        refuse(f"has a {what} that is not finite.")
    return np.broadcast_to(array.reshape(-1), (channels,)).astype(np.float64)


def _set_normalization(spec: LayerSpec, mean: np.ndarray, variance: np.ndarray, invert: bool) -> None:
    # Keras: (x - mean) / max(sqrt(variance), epsilon); inverted: mean + x * max(sqrt(variance), epsilon).
    std = np.maximum(np.sqrt(np.maximum(variance, 0.0)), _KERAS_EPSILON)
    if invert:
        spec.scale, spec.shift = std, mean
    else:
        spec.scale, spec.shift = 1.0 / std, -mean / std


# Weights ---------------------------------------------------------------------------------------------------------
def _attach_weights(spec: ModelSpec, stored, path: str, source, read_kernels: bool = True) -> None:
    """Checks every stored array against the config before reading any, then reads them (all
    but the convolution and dense layers' without ``read_kernels``)."""
    plan = []
    for layer in spec.layers:
        if not layer.weight_names:
            continue
        entry = stored.get(layer.name)
        if entry is None or not entry.arrays:
            raise ValueError(
                f"{path!r} has no weights for layer {layer.name!r} ({layer.class_name}); the file is incomplete "
                "or its config and weights do not belong together."
            )
        arrays = list(entry.arrays)
        if len(arrays) != len(layer.weight_names):
            raise ValueError(
                f"{path!r}: layer {layer.name!r} ({layer.class_name}) has {len(arrays)} weight arrays in the file; "
                f"its config says {len(layer.weight_names)} ({', '.join(layer.weight_names)})."
            )
        for array, name, shape in zip(arrays, layer.weight_names, layer.weight_shapes):
            # Normalization's sample count is an integer that inference does not use.
            if array.dtype.kind != "f" and not (name == "count" and array.dtype.kind in "iu"):
                raise ValueError(f"{path!r}: layer {layer.name!r}'s {name} has dtype {array.dtype}; weights must be floating point.")
            if tuple(array.shape) != tuple(shape) and not (layer.class_name == "Normalization" and int(np.prod(array.shape)) == int(np.prod(shape))):
                raise ValueError(
                    f"{path!r}: layer {layer.name!r} ({layer.class_name}) has {name} of shape {tuple(array.shape)} in the "
                    f"file, but its config makes it {tuple(shape)}: config and weights disagree."
                )
        if read_kernels or layer.kind not in KERNEL_KINDS:
            plan.append((layer, arrays))
    from ._hdf5_reader import HDF5ReadError, read_arrays
    from .tf_saved_model import CheckpointTensor
    from .weights import _StoredArray

    # Data libhdf5 must decode (chunked, compressed) is read by one isolated child; the rest
    # straight from its checked offsets. A SavedModel's tensors read themselves.
    indirect = [array for _, arrays in plan for array in arrays
                if not isinstance(array, CheckpointTensor) and not array.readable_in_place]
    try:
        preloaded = dict(zip((id(a) for a in indirect), read_arrays(source, indirect, isolated=True)))
    except HDF5ReadError as error:
        raise ValueError(str(error)) from None

    def read(array):
        if isinstance(array, CheckpointTensor):
            return array.read()
        return _StoredArray(source, array, preloaded.get(id(array)))[()]

    for layer, arrays in plan:
        try:
            values = [np.asarray(read(a), dtype=np.float32).reshape(shape) for a, shape in zip(arrays, layer.weight_shapes)]
        except HDF5ReadError as error:
            raise ValueError(f"{path!r} is damaged: reading layer {layer.name!r} failed ({error}).") from None
        except ValueError as error:  # a SavedModel tensor's checksum or size
            raise ValueError(f"{path!r} is damaged: reading layer {layer.name!r} failed ({error}).") from None
        layer.weights = values
        if layer.class_name == "BatchNormalization":
            _set_batch_norm(layer)
        elif layer.class_name == "Normalization":
            by_name = dict(zip(layer.weight_names, values))
            _set_normalization(layer, by_name["mean"].astype(np.float64), by_name["variance"].astype(np.float64), bool(layer.config.get("invert", False)))
    for layer in spec.layers:
        if layer.kind == "affine":
            layer.scale = np.asarray(layer.scale, dtype=np.float32)
            layer.shift = np.asarray(layer.shift, dtype=np.float32)


def prelu_alpha(layer: LayerSpec) -> np.ndarray:
    """A PReLU's alpha as the core takes it, (alpha_height, alpha_width, channels) float32: a
    shared channel axis repeated, a flat layer's (features,) as (1, 1, features)."""
    alpha = np.asarray(layer.weights[0], dtype=np.float32)
    channels = int(layer.output_shape[-1])
    if len(layer.output_shape) != 3:
        return np.ascontiguousarray(np.broadcast_to(alpha.reshape(1, 1, -1), (1, 1, channels)))
    return np.ascontiguousarray(np.broadcast_to(alpha, alpha.shape[:2] + (channels,)))


def prelu_alpha_extent(layer: LayerSpec) -> Tuple[int, int]:
    """(alpha_height, alpha_width) of a PReLU, from its config: 1 where alpha is shared."""
    shape = layer.weight_shapes[0]
    return (int(shape[0]), int(shape[1])) if len(layer.output_shape) == 3 else (1, 1)


def _set_batch_norm(layer: LayerSpec) -> None:
    """Keras's inference BatchNormalization, y = (x - mean) * gamma / sqrt(var + eps) + beta, as
    one scale and shift per channel (computed in float64, rounded once)."""
    by_name = {n: w.astype(np.float64) for n, w in zip(layer.weight_names, layer.weights)}
    channels = layer.output_shape[-1]
    gamma = by_name.get("gamma", np.ones(channels))
    beta = by_name.get("beta", np.zeros(channels))
    epsilon = float(layer.config.get("epsilon", 1e-3))
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = 1.0 / np.sqrt(by_name["moving_variance"] + epsilon)
    layer.scale = inverse * gamma
    layer.shift = beta - by_name["moving_mean"] * layer.scale


def describe(spec: ModelSpec) -> List[Tuple[str, str, Shape, int]]:
    """(name, class, output shape with batch axis, parameter count) per layer, for `fastvgg info`."""
    return [(l.name, l.class_name, (None,) + tuple(l.output_shape), l.count_params()) for l in spec.layers]
