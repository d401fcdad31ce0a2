"""Reading Keras weight files into a model.

The classic Keras HDF5 layout (Keras 2 ``save_weights``, and the official VGG files of 2016):
the root attribute ``layer_names`` lists the layers in order; each layer is a group whose
attribute ``weight_names`` lists its datasets (kernel first, then bias). Both name styles
occur: ``block1_conv1/kernel:0`` (tf.keras) and ``block1_conv1_W_1:0`` (the 2016 files).
Order always comes from those attributes, never from h5py's iteration order, and weights
are matched to the model's layers by name.

Every dataset's shape and dtype is checked before any of them is read, so a file that does
not fit raises an error and leaves the model as it was.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from .models import TOP_LAYERS, Model


def _read_name_list(group, attribute: str) -> Optional[List[str]]:
    """A list-of-names attribute; Keras splits long ones into ``name0``, ``name1``, ..."""
    if attribute in group.attrs:
        values = list(group.attrs[attribute])
    elif f"{attribute}0" in group.attrs:
        values = []
        part = 0
        while f"{attribute}{part}" in group.attrs:
            values.extend(group.attrs[f"{attribute}{part}"])
            part += 1
    else:
        return None
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _open_hdf5(path: str):
    import h5py

    if not os.path.exists(path):
        raise FileNotFoundError(f"No weights file at {path!r}.")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory; pass the path of a Keras .h5 weights file.")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise ValueError(
            f"{path!r} is not a readable HDF5 file ({error}). fastvgg reads Keras weights saved in "
            "HDF5 format (.h5); the file may be truncated, or in another format."
        ) from None


def load_weights(model: Model, filepath) -> None:
    """Fills every weighted layer of ``model`` from a Keras HDF5 file, matching by layer name."""
    import h5py

    path = os.fspath(filepath)
    with _open_hdf5(path) as f:
        root = f
        if "layer_names" not in f.attrs and "layer_names0" not in f.attrs and isinstance(f.get("model_weights"), h5py.Group):
            root = f["model_weights"]  # a whole model saved with model.save(...h5)
        layer_names = _read_name_list(root, "layer_names")
        if layer_names is None:
            raise ValueError(
                f"{path!r} is an HDF5 file but not in Keras's weights layout: its root has no "
                f"'layer_names' attribute (top-level entries: {sorted(root.keys())[:10]})."
            )
        stored: Dict[str, Tuple[object, List[str]]] = {}
        for name in layer_names:
            group = root.get(name)
            if not isinstance(group, h5py.Group):
                raise ValueError(f"{path!r} lists layer {name!r} in 'layer_names' but has no group for it.")
            weight_names = _read_name_list(group, "weight_names") or []
            if weight_names:
                stored[name] = (group, weight_names)

        wanted = {layer.name: layer for layer in model.layers if layer.weight_shapes()}
        missing = [name for name in wanted if name not in stored]
        if missing:
            hint = ""
            if set(missing) <= set(TOP_LAYERS):
                hint = " The file has no classifier top: build the model with include_top=False."
            raise ValueError(
                f"{path!r} has no weights for layer(s) {missing} of model {model.name!r}; "
                f"it has weights for {list(stored)}.{hint}"
            )
        # A full VGG file may fill a model without its top; anything else unknown is a sign of
        # another architecture, which must not load silently.
        unexpected = [name for name in stored if name not in wanted and name not in TOP_LAYERS]
        if unexpected:
            raise ValueError(
                f"{path!r} has weights for layer(s) {unexpected} that model {model.name!r} does not have; "
                "it does not look like a VGG of this depth."
            )

        checked = []
        for name, layer in wanted.items():
            group, weight_names = stored[name]
            expected = layer.weight_shapes()
            if len(weight_names) != len(expected):
                raise ValueError(
                    f"Layer {name!r} in {path!r} has {len(weight_names)} weights {weight_names}; "
                    f"expected {len(expected)} (kernel and bias)."
                )
            datasets = []
            for weight_name, shape in zip(weight_names, expected):
                dataset = group.get(weight_name)
                if not isinstance(dataset, h5py.Dataset):
                    raise ValueError(f"Layer {name!r} in {path!r}: weight {weight_name!r} is listed but missing.")
                if tuple(dataset.shape) != tuple(shape):
                    raise ValueError(
                        f"Layer {name!r}: weight {weight_name!r} in {path!r} has shape {tuple(dataset.shape)}, "
                        f"expected {tuple(shape)}. The file was saved from a model with other "
                        "input size, class count or channel count."
                    )
                if dataset.dtype.kind != "f":
                    raise ValueError(
                        f"Layer {name!r}: weight {weight_name!r} in {path!r} has dtype {dataset.dtype}; "
                        "weights must be floating point."
                    )
                datasets.append(dataset)
            checked.append((layer, datasets))
        for layer, (kernel, bias) in checked:
            layer._assign(kernel, bias)
