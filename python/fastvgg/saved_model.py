"""``fastvgg.load_model``: a whole Keras model file, run by the compiled core.

keras_model.py reads the file into a chain of layer specs; this module turns the chain into
the core's graph (one op per layer, a convolution or dense layer's activation fused into it)
and into ``fastvgg.Model`` layers whose names, shapes and weights are the Keras model's. The
whole chain then runs in C++ in one call per batch. A tree (heads that split from one trunk)
becomes one graph and executor per chain, run one after another by :class:`Branches`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from .keras_model import LayerSpec, ModelSpec, read_kernel_weights, read_model
from .layers import Conv2D, Dense, InputLayer, Layer, _float32
from .models import PRECISIONS, Model


def load_model(
    filepath: Union[str, "os.PathLike[str]"],
    *,
    precision: str = "fast",
    device: str = "cpu",
    compile: bool = True,
    safe_mode: bool = True,
    custom_objects: Optional[dict] = None,
    packed_cache=None,
) -> Model:
    """Loads a Keras model saved with ``model.save`` (``.keras``, a whole-model ``.h5`` from
    Keras 3, Keras 2 or tf.keras, or tf.keras's TensorFlow SavedModel directory) and returns a
    :class:`fastvgg.Model` that predicts what Keras predicts.

    The architecture is read from the file as data; nothing in it is executed. Models whose
    layers form one chain (Sequential, or Functional, nested VGG bases included), or a tree of
    chains where heads split from one trunk, of the layers in
    ``fastvgg.keras_model.SUPPORTED_LAYERS`` load; anything else raises ``ValueError`` naming
    the layer or structure that is not supported.

    Args:
        filepath: the ``.keras`` or ``.h5`` file, or the SavedModel directory (read through its
            ``keras_metadata.pb``; see fastvgg.tf_saved_model).
        precision: "fast" (Winograd 3x3 convolutions where they pay), "highest", "bf16" or "bf16x3" (see
            ``fastvgg.VGG16``).
        device: "cpu" (default), "cuda" or "auto", as for ``fastvgg.VGG16``. The GPU executor
            runs every layer listed above (tested through its CPU emulator; see the README's
            "GPU (CUDA)"); a graph it cannot run raises ValueError naming the layer.
        compile: accepted for Keras compatibility; fastvgg only predicts, so there is nothing
            to compile (the optimizer and losses in the file are ignored).
        safe_mode: accepted for Keras compatibility; fastvgg never deserialises code, so it is
            always safe, and ``safe_mode=False`` does not make a ``Lambda`` layer loadable.
        custom_objects: accepted for Keras compatibility; a model that needs a custom class
            is refused whatever this holds, since fastvgg runs only the layers it implements.
        packed_cache: where the weights packed for the kernels are cached, as for
            ``fastvgg.VGG16``: None (the default location, or ``$FASTVGG_PACKED_CACHE``), a
            directory, or False (off). A load that finds the file's packed weights maps them
            and never reads the convolution and dense arrays from the model file.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {', '.join(map(repr, PRECISIONS))}. Received: precision={precision!r}")
    from .cuda import resolve_device

    resolved = resolve_device(device)  # an unknown device or an unusable GPU fails before the file is read
    from .packed_cache import cache_directory

    path = os.fspath(filepath)
    # With a cache, the kernels' arrays are read only if the packed file is missing.
    cached = cache_directory(packed_cache) is not None and resolved == "cpu"
    spec = read_model(path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode,
                      read_kernels=not cached)
    if not cached:
        return build_model(spec, precision, device)

    def read_kernels() -> None:
        read_kernel_weights(spec, path, custom_objects=custom_objects)

    return build_model(spec, precision, device, source=(path, read_kernels, packed_cache))


def build_model(spec: ModelSpec, precision: str = "fast", device: str = "cpu", source=None) -> "LoadedModel":
    """The core graphs, the executors with the weights, and the layers of a checked chain, or
    of a tree of chains where heads split from one trunk (one core graph and executor each).

    ``source``: (path, read_kernels, packed_cache) to load through the packed cache, where
    ``read_kernels()`` fills the spec's convolution and dense weights when the cache misses."""
    input_spec = spec.layers[0]
    input_layer = InputLayer(input_spec.name, (None,) + input_spec.output_shape, (None,) + input_spec.output_shape)
    # The graph itself checks that an input is large enough for its poolings and 'valid'
    # convolutions; a model without VGG's five poolings takes images smaller than 32x32.
    input_layer.min_input_size = 1
    layers: List[Layer] = [input_layer]
    by_name = {input_layer.name: input_layer}
    chains: List[_Chain] = []
    statuses = []
    split = _split_into_chains(spec)
    for reads, chain_specs in split:
        part = ",".join(s.name for s in chain_specs) if len(split) > 1 else None
        chain, status = _build_chain(chain_specs, [by_name[name] for name in reads], input_layer, precision, device,
                                     source, part)
        chains.append(chain)
        statuses.append(status)
        layers.extend(chain.layers)
        by_name.update((layer.name, layer) for layer in chain.layers)
    input_layer._executor = chains[0].executor
    if spec.keras_order:
        position = {name: i for i, name in enumerate(spec.keras_order)}
        layers.sort(key=lambda layer: position[layer.name])
    for layer in layers:
        layer._graph = layers
    if len(chains) > 1:
        input_layer._branches = Branches(layers, chains)
    model = LoadedModel(input_layer.output, _output_structure(spec, layers), name=spec.name)
    model._packed_cache_status = statuses[0] if len(set(statuses)) == 1 else ",".join(statuses)
    return model


def _split_into_chains(spec: ModelSpec) -> List[Tuple[List[str], List[LayerSpec]]]:
    """(the layers the chain's first layer reads: none for the model's input, one where a head
    branches off, several for a merge; the chain's layers), in spec order. A new chain starts
    at each layer that reads another than the one before it, and at each merge."""
    chains: List[Tuple[List[str], List[LayerSpec]]] = [([], [])]
    for layer_spec in spec.layers[1:]:
        if layer_spec.name in spec.branch_inputs:
            chains.append(([spec.branch_inputs[layer_spec.name]], []))
        elif layer_spec.name in spec.merge_inputs:
            chains.append((list(spec.merge_inputs[layer_spec.name]), []))
        chains[-1][1].append(layer_spec)
    return chains


@dataclass
class _Chain:
    reads: List[Layer]  # what the chain's first layer reads: [] the model's input, one layer, or a merge's
    layers: List[Layer]
    executor: object
    merge: str = ""  # the merge its first layer computes (numpy, before the core runs the chain), if any


def _build_chain(specs: List[LayerSpec], reads: List[Layer], input_layer: InputLayer, precision: str, device: str,
                 source, part: Optional[str]) -> Tuple[_Chain, str]:
    from .keras_model import UnsupportedModelError

    merge = specs[0].merge if specs[0].kind == "merge" else ""
    if merge:
        shape = tuple(specs[0].output_shape)  # the merged tensor goes in; the merge layer's op passes it on
    else:
        shape = tuple((reads[0] if reads else input_layer).output_shape[1:])
    graph = _core.Graph(int(shape[-1]))
    flat = len(shape) == 1
    if flat:
        graph.add_flatten()  # a (1, 1, features) image to the rows it is
    layers: List[Layer] = []
    for layer_spec in specs:
        if layer_spec.kind == "reverse_channels" or layer_spec.reverses_input:
            if reads:
                raise UnsupportedModelError(
                    f"layer {layer_spec.name!r} ({layer_spec.class_name}) reverses the channel order in a branch of the "
                    "model; fastvgg reverses channels only on the model's input, as preprocess_input called first does."
                )
            _reverse_channels_on_input([input_layer] + layers, layer_spec)
        index = _add_op(graph, layer_spec, flat)
        layer = _layer_for(layer_spec)
        if isinstance(layer, LoadedDense):
            layer._per_pixel = not flat
        flat = flat or layer_spec.kind in ("flatten", "global_pool")
        layer._index = index
        layer.folded_into = layer_spec.folded_into
        layers.append(layer)
    for read in reads:
        if read.echoes_input or (read is input_layer and input_layer.reverses_channels):
            raise UnsupportedModelError(
                f"layer {specs[0].name!r} reads {read.name!r}, the model's input before preprocess_input reverses its "
                "channels; fastvgg runs branches and merges only after that reversal."
            )
    from .models import new_executor

    executor = new_executor(graph, precision, device, layers)
    for layer in layers:
        layer._executor = executor

    def load() -> None:
        with executor.updating():
            for layer in layers:
                layer._load_from_spec()

    status = "off"
    if source is None:
        load()
    else:
        from .packed_cache import load_model_weights

        path, read_kernels, packed_cache = source

        def read_and_load() -> None:
            read_kernels()
            load()

        status = load_model_weights(executor, path, read_and_load, packed_cache, part=part)
    return _Chain(reads, layers, executor, merge), status


class _PassesOrUpdate:
    """Forward passes run side by side; a weight update waits for them and runs alone. Each
    executor orders its own calls; this orders a whole pass over several executors against an
    update of all of them. Turns alternate: passes that arrive while an update waits start after
    it, and the passes that waited all start before the next update, so neither a stream of
    predictions nor a stream of updates starves the other. An update may nest in one by the same
    thread (set_weights inside load_weights)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._passes = 0  # running
        self._waiting_passes = 0
        self._waiting_updates = 0
        self._updater: Optional[int] = None  # the thread updating, if any
        self._depth = 0
        self._passes_turn = False  # an update just ended while passes waited: they go first

    @contextlib.contextmanager
    def forward(self):
        with self._condition:
            self._waiting_passes += 1
            while self._updater is not None or (self._waiting_updates and not self._passes_turn):
                self._condition.wait()
            self._waiting_passes -= 1
            self._passes += 1
            if not self._waiting_passes:
                self._passes_turn = False
                self._condition.notify_all()
        try:
            yield
        finally:
            with self._condition:
                self._passes -= 1
                if not self._passes:
                    self._condition.notify_all()

    @contextlib.contextmanager
    def update(self):
        me = threading.get_ident()
        with self._condition:
            if self._updater != me:
                self._waiting_updates += 1
                while self._updater is not None or self._passes or self._passes_turn:
                    self._condition.wait()
                self._waiting_updates -= 1
                self._updater = me
            self._depth += 1
        try:
            yield
        finally:
            with self._condition:
                self._depth -= 1
                if not self._depth:
                    self._updater = None
                    self._passes_turn = self._waiting_passes > 0
                    self._condition.notify_all()


def _check_mergeable(layer: Layer, merge: str, arrays: List[np.ndarray]) -> None:
    """Sizes a saved model leaves open (None) may differ at run time between the tensors a
    merge reads (e.g. two poolings of different depth on an image of any size)."""
    keep = slice(None, -1) if merge == "concatenate" else slice(None)
    shapes = [array.shape[1:] for array in arrays]
    if any(shape[keep] != shapes[0][keep] for shape in shapes):
        raise ValueError(
            f"Layer {layer.name!r} ({layer.class_name}) cannot merge tensors of shapes {[tuple(s) for s in shapes]} "
            "(without the batch axis) that this input size gives; Keras cannot either. Use an input size for which "
            "its inputs agree, e.g. the size the model was trained on."
        )


def _merged(merge: str, arrays: List[np.ndarray]) -> np.ndarray:
    """Keras's merge of float32 tensors of one shape (Concatenate: along the last axis), in its
    order of operations: sums and products from the first input on, Average as that sum over
    the count, so the float32 results are Keras's bits."""
    if merge == "concatenate":
        return np.concatenate(arrays, axis=-1)
    if merge == "subtract":
        return np.subtract(arrays[0], arrays[1])
    combine = {"add": np.add, "average": np.add, "multiply": np.multiply, "maximum": np.maximum, "minimum": np.minimum}[merge]
    result = arrays[0]
    for array in arrays[1:]:
        result = combine(result, array)
    if merge == "average":
        result = result / np.float32(len(arrays))
    return np.ascontiguousarray(result, dtype=np.float32)


class Branches:
    """Runs a loaded model that is not one chain: heads that split from one trunk, and merges
    (Concatenate, Add, ...). Each chain has its own core graph and executor; a chain's input is
    the output of the layer it branches from, or the merge (numpy, in Keras's order of
    operations) of the outputs it merges; flat rows go in as a (1, 1, features) image. Only
    the chains the requested outputs need run."""

    def __init__(self, layers: List[Layer], chains: List[_Chain]) -> None:
        self.layers = layers
        self.chains = chains
        self.chain_of = {id(layer): i for i, chain in enumerate(chains) for layer in chain.layers}
        self._passes = _PassesOrUpdate()

    def _parents(self, i: int) -> List[int]:
        return [self.chain_of[id(read)] for read in self.chains[i].reads if id(read) in self.chain_of]

    def _needed(self, layers) -> List[int]:
        needed = set()
        stack = [self.chain_of[id(layer)] for layer in layers if id(layer) in self.chain_of]
        while stack:
            i = stack.pop()
            if i not in needed:
                needed.add(i)
                stack.extend(self._parents(i))
        return sorted(needed)

    def layers_for(self, tensors) -> List[Layer]:
        """The layers the outputs `tensors` need (their ancestors), in the model's order."""
        keep = {id(self.layers[0])}
        stack = [tensor.layer for tensor in tensors]
        while stack:
            layer = stack.pop()
            if id(layer) not in self.chain_of or id(layer) in keep:
                continue
            chain = self.chains[self.chain_of[id(layer)]]
            keep.update(id(l) for l in chain.layers[: chain.layers.index(layer) + 1])
            stack.extend(chain.reads)
        return [layer for layer in self.layers if id(layer) in keep]

    def updating(self):
        """Holds every chain's executor for a weight update, after the passes under way: no
        pass sees some chains' old weights and others' new ones."""
        stack = contextlib.ExitStack()
        stack.enter_context(self._passes.update())
        for chain in self.chains:
            stack.enter_context(chain.executor.updating())
        return stack

    def _chain_shapes(self, height: int, width: int) -> Dict[int, list]:
        shapes: Dict[int, list] = {}
        for i, chain in enumerate(self.chains):
            if not chain.reads:
                size = (height, width)
            else:
                read = chain.reads[0]  # a merge's inputs share their size
                out = tuple(shapes[self.chain_of[id(read)]][read._index]) if id(read) in self.chain_of else (height, width)
                size = (1, 1) if len(out) == 1 else out[:2]
            shapes[i] = chain.executor.graph.output_shapes(*size)
        return shapes

    def core_shapes(self, tensors, height: int, width: int):
        shapes = self._chain_shapes(height, width)
        return {t: tuple(shapes[self.chain_of[id(t.layer)]][t.layer._index]) for t in tensors}

    def forward_into(self, core_input: np.ndarray, outputs) -> None:
        """Runs the chains the tensors in `outputs` ((tensor, array) pairs) need, each writing its
        tensors into their arrays."""
        with self._passes.forward():
            self._forward_into(core_input, outputs)

    def _forward_into(self, core_input: np.ndarray, outputs) -> None:
        count, height, width = core_input.shape[:3]
        shapes = self._chain_shapes(height, width)
        needed = self._needed(t.layer for t, _ in outputs)
        # What later chains read: each such layer's output, computed once.
        read_later = {id(read): read for i in needed for read in self.chains[i].reads}
        available = {id(self.layers[0]): core_input}
        for i in needed:
            chain = self.chains[i]
            if not chain.reads:
                chain_input = core_input
            else:
                arrays = [self._as_keras_shape(available[id(read)], read) for read in chain.reads]
                if chain.merge:
                    _check_mergeable(chain.layers[0], chain.merge, arrays)
                chain_input = _merged(chain.merge, arrays) if chain.merge else arrays[0]
                if chain_input.ndim == 2:  # flat rows: the graph takes them as a 1x1 image
                    chain_input = chain_input.reshape((count, 1, 1, chain_input.shape[1]))
            requests = [(t.layer._index, t.before_activation, out) for t, out in outputs
                        if self.chain_of[id(t.layer)] == i]
            for layer in chain.layers:
                if id(layer) not in read_later:
                    continue
                given = [out for t, out in outputs if t.layer is layer and not t.before_activation]
                if given:
                    available[id(layer)] = given[0]
                else:
                    available[id(layer)] = np.empty((count,) + tuple(shapes[i][layer._index]), np.float32)
                    requests.append((layer._index, False, available[id(layer)]))
            chain.executor.forward_into(np.ascontiguousarray(chain_input), requests)

    @staticmethod
    def _as_keras_shape(array: np.ndarray, layer: Layer) -> np.ndarray:
        """The core keeps a global pooling with keepdims flat; Keras's (1, 1, C) restored, so
        that a merge combines tensors of Keras's shapes."""
        if array.ndim == 2 and len(layer.output_shape) == 4:
            return array.reshape((array.shape[0], 1, 1, array.shape[1]))
        return array


def _output_structure(spec: ModelSpec, layers: List[Layer]):
    """The model's outputs as Keras's predict returns them: one tensor, a list of several, or a
    dict where Keras 3's model was built with one."""
    by_name = {layer.name: layer for layer in layers}
    tensors = [by_name[name].output for name in spec.output_names] or [layers[-1].output]
    if spec.output_keys is not None:
        return dict(zip(spec.output_keys, tensors))
    return tensors[0] if len(tensors) == 1 else tensors


def preprocesses_its_input(model: Model) -> bool:
    """Whether a loaded model scales its own input (its first layer that computes anything is a
    Rescaling or Normalization) or starts with preprocess_input (a channel reversal on its
    input): the command line and fastvgg.ray then pass images to it as they are."""
    if model.layers[0].reverses_channels:
        return True
    for layer in model.layers[1:]:
        spec = getattr(layer, "_spec", None)
        if spec is None or spec.kind != "identity":
            return layer.class_name in ("Rescaling", "Normalization")
    return False


def _reverse_channels_on_input(layers: List[Layer], spec: LayerSpec) -> None:
    """preprocess_input inside a model reverses the channels (RGB to BGR) of the model's input.
    fastvgg does that to each batch before the core runs it (Model._run), so it must come before
    anything that computes: only layers that are the identity at inference (e.g. RandomFlip)
    may stand before it, and their outputs are the input as it was."""
    from .keras_model import UnsupportedModelError

    computing = [layer.name for layer in layers[1:] if layer._spec.kind != "identity"]
    if computing or layers[0].reverses_channels:
        raise UnsupportedModelError(
            f"layer {spec.name!r} ({spec.class_name}) reverses the channel order after "
            f"{'another reversal' if not computing else 'layer ' + repr(computing[-1])}; fastvgg reverses channels "
            "only on the model's input, as preprocess_input called first in a model does."
        )
    layers[0].reverses_channels = True
    for layer in layers[1:]:
        layer.echoes_input = True


def _core_activation(spec: LayerSpec) -> dict:
    """A spec's activation as the core's add_* functions take it: its name and numbers (Keras
    3's "relu6" is the core's clipped_relu with a cap of 6)."""
    if spec.activation in ("clipped_relu", "relu6"):
        return dict(activation="clipped_relu", negative_slope=spec.negative_slope, max_value=spec.max_value,
                    threshold=spec.threshold)
    return dict(activation=spec.activation, negative_slope=spec.negative_slope)


def _add_op(graph, spec: LayerSpec, flat: bool) -> int:
    kind = spec.kind
    if kind == "conv":
        if spec.kernel_size == 3 and spec.padding == "same":
            return graph.add_conv3x3(spec.units, **_core_activation(spec))
        return graph.add_conv(spec.kernel_size, spec.units, spec.padding, **_core_activation(spec))
    if kind == "max_pool" and spec.padding == "valid":
        return graph.add_max_pool2x2()
    if kind in ("max_pool", "avg_pool"):
        return graph.add_pool2x2("max" if kind == "max_pool" else "avg", spec.padding)
    if kind == "flatten":
        # Flattening what is already flat (a global pooling with keepdims, in the core's flat
        # layout already) changes nothing.
        return graph.add_activation("linear") if flat else graph.add_flatten()
    if kind == "global_pool":
        return graph.add_global_pool(spec.pool_mode)
    if kind == "dense":
        if flat:
            return graph.add_dense(int(spec.input_shape[-1]), spec.units, **_core_activation(spec))
        # Keras's Dense on an image (no Flatten or global pooling before it): the same matrix on
        # every pixel, which is a 1x1 convolution; its kernel is stored as (1, 1, in, units).
        return graph.add_conv(1, spec.units, "same", **_core_activation(spec))
    if kind == "affine":
        return graph.add_affine(int(spec.output_shape[-1]))
    if kind == "upsample":
        return graph.add_upsample(*spec.size)
    if kind == "prelu":
        from .keras_model import prelu_alpha_extent

        return graph.add_prelu(int(spec.output_shape[-1]), *prelu_alpha_extent(spec))
    if kind == "activation":
        return graph.add_activation(**_core_activation(spec))
    if kind == "l2_normalize":
        return graph.add_l2_normalize(spec.max_inverse_norm)
    if kind == "reverse_channels":  # done to the input before the core runs (_reverse_channels_on_input)
        return graph.add_activation("linear")
    if kind == "identity":  # Dropout and friends: nothing happens at inference
        return graph.add_activation("linear")
    if kind == "merge":  # merged before the chain runs (Branches); the layer's output is its input
        return graph.add_activation("linear")
    raise ValueError(f"layer {spec.name!r}: no core op for kind {kind!r}")  # pragma: no cover


class LoadedModel(Model):
    """A model read from a Keras file: a :class:`fastvgg.Model` like any other."""

    def _run(self, x, tensors, batch_size, verbose):
        # The core keeps a global pooling with keepdims (and a Dense after it) flat; Keras's
        # shape for them is (1, 1, channels): same numbers, its shape restored here.
        results = super()._run(x, tensors, batch_size, verbose)
        shaped = []
        for result, tensor in zip(results, tensors):
            shape = tuple(tensor.shape[1:])
            if None not in shape and result.shape[1:] != shape and result[0].size == int(np.prod(shape)):
                result = result.reshape((len(result),) + shape)
            shaped.append(result)
        return shaped


# Layers ---------------------------------------------------------------------------------------------------
def _layer_for(spec: LayerSpec) -> Layer:
    if spec.kind == "conv":
        return LoadedConv2D(spec)
    if spec.kind == "dense":
        return LoadedDense(spec)
    return LoadedLayer(spec)


class _SpecLayer:
    """What every loaded layer shares: Keras's class name, shapes and weights from the spec."""

    def _init_from_spec(self, spec: LayerSpec) -> None:
        Layer.__init__(self, spec.name, (None,) + tuple(spec.input_shape), (None,) + tuple(spec.output_shape))
        if spec.input_shapes:  # a merge: Keras gives the shapes of what it merges, as a list
            self.input_shape = [(None,) + tuple(shape) for shape in spec.input_shapes]
        self.class_name = spec.class_name
        self.trainable = spec.trainable
        self._spec = spec

    def weight_shapes(self):
        return [tuple(s) for s in self._spec.weight_shapes]

    def count_non_trainable_params(self) -> int:
        return self._spec.count_non_trainable_params()


class LoadedLayer(_SpecLayer, Layer):
    """A layer without kernel: pooling, flatten, activation, identity, a per-channel affine map
    (BatchNormalization, Rescaling, Normalization) or a PReLU, whose Keras weights it keeps."""

    def __init__(self, spec: LayerSpec) -> None:
        self._init_from_spec(spec)
        if spec.kind == "activation":
            self.activation = spec.activation
            if spec.activation == "leaky_relu":
                self.negative_slope = spec.negative_slope  # Keras 3's name (tf.keras: alpha)
            if spec.activation == "clipped_relu":  # a ReLU layer's numbers, by Keras's names
                self.negative_slope, self.max_value, self.threshold = spec.negative_slope, spec.max_value, spec.threshold
        if spec.kind == "upsample":  # UpSampling2D's, by Keras's names
            self.size, self.interpolation = tuple(spec.size), "nearest"

    def get_weights(self) -> List[np.ndarray]:
        return [np.array(w, dtype=np.float32) for w in self._spec.weights]

    def _load_from_spec(self) -> None:
        if self._spec.kind == "affine":
            self._set_affine()
        elif self._spec.kind == "prelu":
            self._set_prelu()

    def _set_affine(self) -> None:
        self._executor.set_affine(self._index, self._spec.scale, self._spec.shift)

    def _set_prelu(self) -> None:
        from .keras_model import prelu_alpha

        self._executor.set_prelu(self._index, prelu_alpha(self._spec))

    def _assign(self, *arrays) -> None:
        from .keras_model import _set_batch_norm, _set_normalization

        spec = self._spec
        spec.weights = [_float32(a[()], self.name).reshape(s) for a, s in zip(arrays, spec.weight_shapes)]
        if spec.kind == "prelu":
            self._set_prelu()
            return
        if spec.class_name == "BatchNormalization":
            _set_batch_norm(spec)
        elif spec.class_name == "Normalization":
            values = dict(zip(spec.weight_names, spec.weights))
            _set_normalization(spec, values["mean"].astype(np.float64), values["variance"].astype(np.float64),
                               bool(spec.config.get("invert", False)))
        spec.scale = np.asarray(spec.scale, dtype=np.float32)
        spec.shift = np.asarray(spec.shift, dtype=np.float32)
        self._set_affine()


class _KernelSpecLayer(_SpecLayer):
    """A loaded layer whose kernel and bias the executor holds (Conv2D, Dense)."""

    def get_weights(self) -> List[np.ndarray]:
        kernel, bias = self._executor.get_weights(self._index)
        return [kernel, bias] if self.use_bias else [kernel]

    def _load_from_spec(self) -> None:
        self._assign(*self._spec.weights)
        self._spec.weights = []  # the executor holds them now; get_weights reads them back from it


class LoadedConv2D(_KernelSpecLayer, Conv2D):
    """A Keras Conv2D: 3x3 or 1x1, 'same' or 'valid', stride 1, with or without bias."""

    def __init__(self, spec: LayerSpec) -> None:
        self._init_from_spec(spec)
        self.filters = spec.units
        self.kernel_size = (spec.kernel_size, spec.kernel_size)
        self.strides = (1, 1)
        self.padding = spec.padding
        self.activation = spec.activation
        self.use_bias = spec.use_bias

    def _assign(self, kernel, bias=None) -> None:
        kernel = _float32(kernel[()], self.name)
        bias = np.zeros(self.filters, np.float32) if bias is None else _float32(bias[()], self.name)
        if self._spec.kernel_size == 3 and self.padding == "same":
            self._executor.set_conv3x3_weights(self._index, kernel, bias)
        else:
            self._executor.set_conv_weights(self._index, kernel, bias)


class LoadedDense(_KernelSpecLayer, Dense):
    """A Keras Dense layer: on flat rows, or on an image as a 1x1 convolution (the core op then
    holds the kernel as (1, 1, in, units); get_weights gives Keras's (in, units) back)."""

    def __init__(self, spec: LayerSpec) -> None:
        self._init_from_spec(spec)
        self.units = spec.units
        self.activation = spec.activation
        self.use_bias = spec.use_bias
        self._per_pixel = False  # set by build_model: True where the core runs it as a 1x1 convolution

    def get_weights(self) -> List[np.ndarray]:
        weights = _KernelSpecLayer.get_weights(self)
        if self._per_pixel:
            weights[0] = weights[0].reshape(weights[0].shape[2:])
        return weights

    def _assign(self, kernel, bias=None) -> None:
        if bias is None:
            bias = np.zeros(self.units, np.float32)
        if self._per_pixel:
            kernel = _float32(kernel[()], self.name)
            self._executor.set_conv_weights(self._index, kernel.reshape((1, 1) + kernel.shape), _float32(bias[()], self.name))
        else:
            Dense._assign(self, kernel, bias)


def summary_rows(model: Model) -> Sequence[tuple]:
    """(name, class, output shape, parameters) per layer, for ``fastvgg info``."""
    return [(layer.name, layer.class_name, layer.output_shape, layer.count_params()) for layer in model.layers]
