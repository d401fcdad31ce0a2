"""Writers for the weight layouts other than the classic one (see keras_h5.py for that), built
with h5py and zipfile alone, following what Keras 3.15 and tf_keras 2.21 were seen to write:

* Keras 3 ``save_weights("x.weights.h5")``: ``layers/<auto-name>/vars/<i>``, auto-names by
  class with a counter in model order (``conv2d``, ``conv2d_1``, ... ``conv2d_12``, ``dense``,
  ``dense_1``, ...); every layer gets a group, weightless ones an empty ``vars``; recent Keras
  puts the layer's real name in the ``name`` attribute of ``vars``, early Keras 3 did not;
  a nested model is ``layers/functional/layers/...``;
* ``model.save("x.keras")``: a zip of ``metadata.json``, ``config.json`` and
  ``model.weights.h5``, all stored uncompressed;
* a classic file of a model that nests VGG: one ``vgg16`` group in ``layer_names`` whose
  ``weight_names`` are ``block1_conv1/kernel:0``, ...;
* the Theano-ordered 2016 files: classic layout, 2016 names, kernels (out, in, 3, 3) flipped,
  fc1 rows in (channel, row, column) order.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

import keras_h5
import numpy_vgg as nv

Weights = Dict[str, Tuple[np.ndarray, ...]]


def _class_of(name: str) -> str:
    if "_conv" in name:
        return "Conv2D"
    if name.endswith("_pool"):
        return "MaxPooling2D"
    if name == "flatten":
        return "Flatten"
    return "Dense"


def vgg_layers(depth: int, include_top: bool) -> List[Tuple[str, str]]:
    """(class name, layer name) of a Keras VGG, in model order, input layer first."""
    return [("InputLayer", "input_layer")] + [(_class_of(n), n) for n in nv.layer_names(depth, include_top)]


def _auto_names(classes: Sequence[str]) -> List[str]:
    snake = {"InputLayer": "input_layer", "Conv2D": "conv2d", "MaxPooling2D": "max_pooling2d",
             "Flatten": "flatten", "Dense": "dense", "Functional": "functional"}
    counts: Dict[str, int] = {}
    names = []
    for cls in classes:
        base = snake[cls]
        names.append(base if counts.get(base, 0) == 0 else f"{base}_{counts[base]}")
        counts[base] = counts.get(base, 0) + 1
    return names


def _write_keras3_container(group, layers, weights: Weights, name_attributes: bool) -> None:
    for auto_name, (cls, name) in zip(_auto_names([c for c, _ in layers]), layers):
        entry = group.create_group(auto_name)
        if cls == "Functional":
            _write_keras3_container(entry.create_group("layers"), name, weights, name_attributes)
            entry.create_group("vars")
            continue
        variables = entry.create_group("vars")
        if name_attributes:
            variables.attrs["name"] = name
        for i, array in enumerate(weights.get(name, ())):
            variables.create_dataset(str(i), data=array)


def write_keras3_weights(target, weights: Weights, depth: int, include_top: bool,
                         name_attributes: bool = True, head: Optional[Weights] = None) -> None:
    """A Keras 3 ``.weights.h5`` of a VGG, or with ``head`` of ``Sequential([vgg, Flatten,
    Dense...])`` with the VGG nested. ``target`` is a path or a binary file object."""
    with h5py.File(target, "w") as f:
        layers_group = f.create_group("layers")
        vgg = vgg_layers(depth, include_top)
        if head is None:
            _write_keras3_container(layers_group, vgg, weights, name_attributes)
        else:
            outer = [("Functional", vgg), ("Flatten", "flatten")] + [("Dense", n) for n in head]
            _write_keras3_container(layers_group, outer, {**weights, **head}, name_attributes)
        f.create_group("vars")


def keras3_config(depth: int, include_top: bool, head: Optional[Weights] = None) -> dict:
    def layer_list(layers):
        return [{"class_name": cls, "config": {"name": name}} for cls, name in layers]

    vgg = {"class_name": "Functional", "config": {"name": f"vgg{depth}", "layers": layer_list(vgg_layers(depth, include_top))}}
    if head is None:
        return vgg
    outer = [vgg, {"class_name": "Flatten", "config": {"name": "flatten"}}]
    outer += [{"class_name": "Dense", "config": {"name": n}} for n in head]
    return {"class_name": "Sequential", "config": {"name": "sequential", "layers": outer}}


def write_keras_archive(path, weights_h5: bytes, config: dict, compression=zipfile.ZIP_STORED,
                        extra_members: Sequence[Tuple[str, bytes]] = ()) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        archive.writestr("config.json", json.dumps(config))
        archive.writestr(zipfile.ZipInfo("model.weights.h5"), weights_h5, compress_type=compression)
        for name, data in extra_members:
            archive.writestr(name, data)


def keras3_weights_bytes(weights: Weights, depth: int, include_top: bool, **kwargs) -> bytes:
    buffer = io.BytesIO()
    write_keras3_weights(buffer, weights, depth, include_top, **kwargs)
    return buffer.getvalue()


def write_nested_classic(path, weights: Weights, depth: int, head: Weights) -> None:
    """tf_keras ``Sequential([vgg_base, Flatten(), Dense(...)]).save_weights("x.h5")``."""
    inner = [name for name in nv.layer_names(depth, include_top=False) if name in weights]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([f"vgg{depth}".encode(), b"flatten"] + [n.encode() for n in head])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.21.0"
        base = f.create_group(f"vgg{depth}")
        names = [f"{n}/{w}" for n in inner for w in ("kernel:0", "bias:0")]
        base.attrs["weight_names"] = np.array([n.encode() for n in names])
        for n in inner:
            for w, array in zip(("kernel:0", "bias:0"), weights[n]):
                base.create_dataset(f"{n}/{w}", data=array)
        f.create_group("flatten").attrs["weight_names"] = np.array([], dtype="S1")
        for n, arrays in head.items():
            group = f.create_group(n)
            group.attrs["weight_names"] = np.array([f"{n}/kernel:0".encode(), f"{n}/bias:0".encode()])
            for w, array in zip(("kernel:0", "bias:0"), arrays):
                group.create_dataset(f"{n}/{w}", data=array)


def to_theano(weights: Weights, pool_hw: Tuple[int, int]) -> Weights:
    """The 2016 Theano-ordered form of Keras-layout weights: kernels (out, in, 3, 3) flipped
    in both spatial axes, fc1's rows in (channel, row, column) order."""
    converted = {}
    for name, (kernel, bias) in weights.items():
        if kernel.ndim == 4:
            kernel = np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1))[:, :, ::-1, ::-1])
        elif name == "fc1":
            h, w = pool_hw
            kernel = kernel.reshape(h, w, -1, kernel.shape[1]).transpose(2, 0, 1, 3).reshape(kernel.shape)
        converted[name] = (kernel, bias)
    return converted


def write_theano_h5(path, weights: Weights, depth: int, include_top: bool, pool_hw=(7, 7)) -> None:
    keras_h5.write_classic_h5(path, to_theano(weights, pool_hw), nv.layer_names(depth, include_top), naming="legacy2016")
