"""Writers for the classic (Keras 1/2, ``model.save_weights("x.h5")``) HDF5
weight layout, used to feed fastvgg's loader without TensorFlow.

Layout, as produced by tf_keras 2.21 (checked against a real file):

* root attrs: ``layer_names`` (every layer in model order, including the
  weightless input/pool/flatten layers), ``backend``, ``keras_version``;
* one group per layer with a ``weight_names`` attr listing that layer's
  weights in the order ``set_weights`` expects;
* each weight name is a path relative to the layer group, e.g.
  ``fc1/kernel:0`` -> dataset ``/fc1/fc1/kernel:0``.

The official 2016 ``vgg16_weights_tf_dim_ordering_tf_kernels.h5`` predates
that: names look like ``fc1_W_1:0`` and sit directly in the layer group, and
the root has no ``backend``/``keras_version``.

Groups and datasets are deliberately created in an order that differs from
the logical one, and the file tracks creation order, so h5py (or HDF5
creation-order) iteration yields a scrambled order. A loader that passes
must therefore take the order from ``layer_names``/``weight_names``.
(Iteration by name is alphabetical whatever we do, and for VGG's weighted
layers that happens to match the logical order, so it cannot be scrambled.)
"""

from __future__ import annotations

import random
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import h5py
import numpy as np

NAMINGS = ("tf_keras", "legacy2016")
TF_KERAS_VERSION = "2.21.0"

# Per-naming suffixes for a layer's weights, in weight_names order.
_TF_KERAS_SUFFIXES = ("kernel:0", "bias:0")
_LEGACY_SUFFIXES = ("W_1:0", "b_1:0")

LayerWeights = Sequence[np.ndarray]
ExtraLayer = Union[str, Tuple[str, LayerWeights]]


def weight_names(layer: str, count: int, naming: str = "tf_keras") -> List[str]:
    """The ``weight_names`` entries Keras would record for ``layer``."""
    if naming == "tf_keras":
        suffixes, sep = _TF_KERAS_SUFFIXES, "/"
    elif naming == "legacy2016":
        suffixes, sep = _LEGACY_SUFFIXES, "_"
    else:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    if count > len(suffixes):
        raise ValueError(f"layer {layer!r}: only kernel+bias layers are supported, got {count} weights")
    return [f"{layer}{sep}{suffix}" for suffix in suffixes[:count]]


def _string_list_attr(names: Sequence[str], naming: str) -> np.ndarray:
    if not names:
        # Keras passes an empty Python list through np.asarray, which makes a
        # float64 array of shape (0,), not an empty string array.
        return np.zeros((0,), dtype=np.float64)
    encoded = [name.encode("utf8") for name in names]
    if naming == "tf_keras":
        # h5py 3 stores a list of bytes as variable-length ASCII strings,
        # which is what tf_keras's `group.attrs[name] = [b"..."]` produces.
        return np.array(encoded, dtype=h5py.string_dtype("ascii"))
    # Keras 1 / h5py 2 converted the list with numpy: fixed-length bytes.
    return np.array(encoded, dtype="S")


def _scrambled(items: List, creation_order: str, seed: int) -> List:
    if creation_order == "reversed":
        return items[::-1]
    if creation_order == "shuffled":
        shuffled = list(items)
        random.Random(seed).shuffle(shuffled)
        return shuffled
    if creation_order == "logical":
        return list(items)
    raise ValueError(f"creation_order must be 'reversed', 'shuffled' or 'logical', got {creation_order!r}")


def write_classic_h5(
    path,
    weights: Mapping[str, LayerWeights],
    layer_order: Iterable[str],
    naming: str = "tf_keras",
    extra_layers: Iterable[ExtraLayer] = (),
    input_layer: Optional[str] = "input_1",
    creation_order: str = "reversed",
    seed: int = 0,
) -> None:
    """Write ``weights`` to ``path`` in the classic Keras HDF5 layout.

    weights: layer name -> arrays in Keras order (kernel, bias).
    layer_order: every layer of the model in order, e.g.
        ``numpy_vgg.layer_names(...)``; names absent from ``weights`` become
        weightless layers.
    extra_layers: layers appended to ``layer_names`` after ``layer_order``,
        each a bare name (weightless) or ``(name, arrays)``; lets tests feed
        files from models with more layers than VGG.
    input_layer: prepended to ``layer_names`` as a weightless layer, as Keras
        records the InputLayer; None leaves it out.
    creation_order: "reversed" (default), "shuffled" (with ``seed``) or
        "logical" - the order groups and datasets are created in.
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")

    layers: List[Tuple[str, LayerWeights]] = []
    if input_layer is not None:
        layers.append((input_layer, ()))
    layers.extend((name, weights.get(name, ())) for name in layer_order)
    for extra in extra_layers:
        layers.append((extra, ()) if isinstance(extra, str) else (extra[0], tuple(extra[1])))

    names = [name for name, _ in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate layer names in {names}")
    missing = set(weights) - set(names)
    if missing:
        raise ValueError(f"weights given for layers not in layer_order: {sorted(missing)}")

    with h5py.File(path, "w", track_order=True) as f:
        f.attrs["layer_names"] = _string_list_attr(names, naming)
        if naming == "tf_keras":
            # tf_keras assigns Python bytes; h5py stores those as scalar
            # variable-length ASCII strings.
            f.attrs["backend"] = b"tensorflow"
            f.attrs["keras_version"] = TF_KERAS_VERSION.encode("ascii")

        for name, arrays in _scrambled(layers, creation_order, seed):
            group = f.create_group(name, track_order=True)
            names_in_group = weight_names(name, len(arrays), naming)
            group.attrs["weight_names"] = _string_list_attr(names_in_group, naming)
            layer_weights = list(zip(names_in_group, arrays))
            if creation_order != "logical":
                # A shuffle of two items keeps their order half the time;
                # reversing always puts bias before kernel.
                layer_weights.reverse()
            for weight_name, array in layer_weights:
                parent_name, _, leaf = weight_name.rpartition("/")
                parent = group
                if parent_name:
                    # Keras gets the nested "fc1/fc1" group implicitly; made
                    # explicitly here so it tracks creation order too.
                    if parent_name not in group:
                        group.create_group(parent_name, track_order=True)
                    parent = group[parent_name]
                parent.create_dataset(leaf, data=np.asarray(array))

        if naming == "tf_keras":
            # tf_keras always adds this group for weights owned by the model
            # itself; it is not a layer and is absent from layer_names.
            top = f.create_group("top_level_model_weights")
            top.attrs["weight_names"] = _string_list_attr([], naming)
