"""Reading any Keras weight file into a model, matching layers by name.

Layouts recognised (the file's content decides, never its extension):

* classic HDF5 (Keras 2 / tf.keras ``save_weights``, the official 2016 files, and whole
  models saved with ``model.save("x.h5")`` under ``model_weights/``): the attribute
  ``layer_names`` (or ``layer_names0``, ``layer_names1``, ... when Keras split a long list)
  lists the layer groups, each with ``weight_names``. A VGG nested inside a bigger model is one
  group (``vgg16``) whose ``weight_names`` name the inner layers (``block1_conv1/kernel:0``);
* Keras 3 ``.weights.h5``: ``layers/<auto-name>/vars/0`` (kernel) and ``vars/1`` (bias),
  nested models under ``layers/<auto-name>/layers/``. The auto-names (``conv2d``,
  ``conv2d_1``, ...) say only the class; the real name is the ``name`` attribute of ``vars``
  (recent Keras), else it comes from the model config (``.keras`` files), else from the order
  of the layers of that class in the VGG definition;
* the ``.keras`` zip (``config.json``, ``model.weights.h5``): its HDF5 member is read in
  place through a window onto the zip, never unpacked;
* Theano-ordered files (``*_th_dim_ordering_th_kernels*.h5``): recognised by kernels stored
  (out, in, 3, 3). Their kernels are flipped (convolution, not correlation), so they are
  rotated by 180 degrees and transposed to Keras's (3, 3, in, out); fc1's rows, in
  (channel, row, column) order, are permuted to (row, column, channel). A file name with
  ``_tf_kernels`` marks unflipped kernels.

Layers a VGG does not have are ignored when their names are not VGG names (the head of a
fine-tuned model); weights for a VGG layer this model lacks (``block3_conv4`` of a VGG19 file
read into VGG16) are an error. Every dataset's shape and dtype is
checked before any is read, so a file that does not fit leaves the model as it was; only data
that cannot be read back (a damaged compressed chunk) shows up mid-load, and that error names
the layer and says the earlier ones were loaded. Early Keras 3 files, which name no layers,
are mapped by order only when they hold as many convolutions as the model. Nothing in a file
is executed; external links, soft links, external storage and virtual datasets are refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .models import TOP_LAYERS, Model

# Names that only a VGG's own layers have: weights under such a name that the model lacks mean
# the file is another VGG (or depth), not a head to ignore.
_VGG_LAYER_NAME = re.compile(r"block\d+_conv\d+|fc1|fc2|predictions")
_KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"
_KERAS_ARCHIVE_CONFIG = "config.json"
# config.json of a VGG is ~20 KB; anything far larger is not one, and is not read into memory.
_MAX_CONFIG_BYTES = 16 << 20
# Keras nests models a level or two deep; a deeper walk means a loop or a hostile file.
_MAX_NESTING = 16


@dataclass
class StoredLayer:
    """One layer's arrays in a file, in Keras's order (kernel, bias), and where they are."""

    name: str
    arrays: List[object] = field(default_factory=list)  # h5py datasets
    where: str = ""


# Opening ----------------------------------------------------------------------------------------
class _ZipMemberReader(io.RawIOBase):
    """A read-only window onto a stored (uncompressed) zip member, for h5py to read in place."""

    def __init__(self, path: str, start: int, size: int) -> None:
        super().__init__()
        self._file = open(path, "rb")
        self._start, self._size, self._position = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._size - self._position))
        if count == 0:
            return 0
        self._file.seek(self._start + self._position)
        read = self._file.readinto(memoryview(buffer)[:count])
        self._position += read
        return read

    def close(self) -> None:
        self._file.close()
        super().close()


def _archive_member(path: str) -> Tuple[_ZipMemberReader, Optional[dict]]:
    """The weights member of a ``.keras`` archive, opened in place, and its model config."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path!r} looks like a zip archive but cannot be read ({error}).") from None
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        unsafe = [n for n in members if n.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", n) or ":" in n]
        if unsafe:
            raise ValueError(
                f"{path!r} has archive members with unsafe paths {unsafe[:3]}; it is not a file Keras wrote, "
                "and fastvgg does not read it."
            )
        info = members.get(_KERAS_ARCHIVE_WEIGHTS)
        if info is None:
            raise ValueError(
                f"{path!r} is a zip archive without {_KERAS_ARCHIVE_WEIGHTS!r} (it holds {sorted(members)[:10]}); "
                "a Keras .keras file has config.json, metadata.json and model.weights.h5."
            )
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(
                f"{path!r}: {_KERAS_ARCHIVE_WEIGHTS} is compressed, which Keras never does; fastvgg reads "
                ".keras files in place and does not inflate members. Unzip it and pass the path of "
                f"{_KERAS_ARCHIVE_WEIGHTS} instead."
            )
        archive_size = os.path.getsize(path)
        if info.file_size > archive_size:
            raise ValueError(f"{path!r}: {_KERAS_ARCHIVE_WEIGHTS} claims {info.file_size} bytes in a {archive_size}-byte file.")
        config = None
        config_info = members.get(_KERAS_ARCHIVE_CONFIG)
        if config_info is not None and config_info.file_size <= _MAX_CONFIG_BYTES:
            try:
                config = json.loads(archive.read(config_info))
            except (ValueError, zipfile.BadZipFile, OSError):
                config = None  # names then come from the weights file or the VGG definition
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        header = raw.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"{path!r}: the zip entry of {_KERAS_ARCHIVE_WEIGHTS} is damaged.")
    name_length = int.from_bytes(header[26:28], "little")
    extra_length = int.from_bytes(header[28:30], "little")
    start = info.header_offset + 30 + name_length + extra_length
    if start + info.file_size > archive_size:
        raise ValueError(f"{path!r}: {_KERAS_ARCHIVE_WEIGHTS} runs past the end of the file (truncated?).")
    return _ZipMemberReader(path, start, info.file_size), config


@contextlib.contextmanager
def _open_weights(path: str) -> Iterator[Tuple[object, Optional[dict]]]:
    """The HDF5 file holding the weights (the file itself, or a .keras archive's member) and
    the model config that came with it, if any."""
    import h5py

    if not os.path.exists(path):
        raise FileNotFoundError(f"No weights file at {path!r}.")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory; pass the path of a Keras weights file (.h5, .weights.h5 or .keras).")
    config = None
    member = None
    if zipfile.is_zipfile(path):
        member, config = _archive_member(path)
        source = member
    else:
        source = path
    try:
        try:
            handle = h5py.File(source, "r")
        except OSError as error:
            inside = f" ({_KERAS_ARCHIVE_WEIGHTS} inside the archive)" if member else ""
            raise ValueError(
                f"{path!r}{inside} is not a readable HDF5 file ({error}). fastvgg reads Keras weights saved as "
                ".h5, .weights.h5 or .keras; the file may be truncated, or in another format."
            ) from None
        with handle:
            yield handle, config
    finally:
        if member is not None:
            member.close()


# Walking the file without following anything but hard links -------------------------------------
def _child(group, name: str, path: str):
    import h5py

    link = group.get(name, getlink=True)
    if link is None:
        return None
    if not isinstance(link, h5py.HardLink):
        raise ValueError(
            f"{path!r}: {group.name.rstrip('/')}/{name} is a {type(link).__name__}, not stored data; fastvgg does "
            "not follow links out of a weights file (Keras never writes them)."
        )
    return group[name]


def _dataset(group, name: str, path: str):
    import h5py

    node = _child(group, name, path)
    if not isinstance(node, h5py.Dataset):
        raise ValueError(f"Layer group {group.name.strip('/')!r} in {path!r}: weight {name!r} is listed but missing.")
    if node.external or node.is_virtual:
        raise ValueError(
            f"{path!r}: weight {node.name} keeps its data outside this file (external or virtual dataset); "
            "fastvgg only reads data stored in the file itself."
        )
    return node


def _read_name_list(group, attribute: str) -> Optional[List[str]]:
    """A list-of-names attribute; Keras splits long ones into ``name0``, ``name1``, ..."""
    if attribute in group.attrs:
        values = np.atleast_1d(group.attrs[attribute]).tolist()
    elif f"{attribute}0" in group.attrs:
        values = []
        part = 0
        while f"{attribute}{part}" in group.attrs:
            values.extend(np.atleast_1d(group.attrs[f"{attribute}{part}"]).tolist())
            part += 1
    else:
        return None
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _describe(handle) -> str:
    keys = sorted(handle.keys())
    attrs = sorted(handle.attrs.keys())
    return f"top-level entries {keys[:10]}{' ...' if len(keys) > 10 else ''}, attributes {attrs[:10]}"


# Classic layout -------------------------------------------------------------------------------------
def _classic_layers(root, layer_names: List[str], path: str) -> Dict[str, StoredLayer]:
    import h5py

    stored: Dict[str, StoredLayer] = {}
    for group_name in layer_names:
        group = _child(root, group_name, path)
        if not isinstance(group, h5py.Group):
            raise ValueError(f"{path!r} lists layer {group_name!r} in 'layer_names' but has no group for it.")
        owners: Dict[str, StoredLayer] = {}
        for weight_name in _read_name_list(group, "weight_names") or []:
            # "block1_conv1/kernel:0" in its own group or in a nested model's group ("vgg16");
            # the 2016 files say "block1_conv1_W_1:0" in the layer's group.
            parts = weight_name.split("/")
            layer = parts[-2] if len(parts) >= 2 else group_name
            if layer not in owners:
                if layer in stored:
                    raise ValueError(f"{path!r} has weights for layer {layer!r} twice ({stored[layer].where} and {group.name}).")
                owners[layer] = stored[layer] = StoredLayer(layer, where=group.name)
            owners[layer].arrays.append(_dataset(group, weight_name, path))
    return stored


# Keras 3 layout -------------------------------------------------------------------------------------
def _snake_case(class_name: str) -> str:
    """Keras 3's auto-name of a class (``Conv2D`` -> ``conv2d``, ``MaxPooling2D`` -> ``max_pooling2d``)."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _auto_names(config_layers) -> Dict[str, dict]:
    """Keras 3's saving names a model's layers by class with a counter, in the model's order:
    auto-name -> that layer's config."""
    counts: Dict[str, int] = {}
    names: Dict[str, dict] = {}
    for layer in config_layers or []:
        if not isinstance(layer, dict):
            continue
        base = _snake_case(str(layer.get("class_name", "")))
        index = counts.get(base, 0)
        counts[base] = index + 1
        names[base if index == 0 else f"{base}_{index}"] = layer
    return names


def _split_auto_name(auto_name: str) -> Tuple[str, int]:
    match = re.fullmatch(r"(.*?)(?:_(\d+))?", auto_name)
    return match.group(1), int(match.group(2) or 0)


def _keras3_layers(container, config_layers, model: Model, path: str, depth: int = 0) -> Dict[str, StoredLayer]:
    import h5py

    if depth > _MAX_NESTING:
        raise ValueError(f"{path!r}: models nested more than {_MAX_NESTING} deep; not a file Keras wrote.")
    by_auto_name = _auto_names(config_layers)
    stored: Dict[str, StoredLayer] = {}
    unnamed: List[Tuple[str, StoredLayer]] = []
    for auto_name in container.keys():
        group = _child(container, auto_name, path)
        if not isinstance(group, h5py.Group):
            continue
        layer_config = by_auto_name.get(auto_name, {})
        variables = _child(group, "vars", path)
        if isinstance(variables, h5py.Group) and len(variables):
            keys = sorted(variables.keys(), key=lambda k: int(k) if k.isdigit() else -1)
            if keys != [str(i) for i in range(len(keys))]:
                raise ValueError(f"{path!r}: {variables.name} holds {keys[:5]}, not Keras's numbered variables 0, 1, ...")
            name = variables.attrs.get("name")
            name = name.decode("utf8") if isinstance(name, bytes) else name
            if not name:
                name = (layer_config.get("config") or {}).get("name")
            entry = StoredLayer(str(name) if name else "", [_dataset(variables, k, path) for k in keys], variables.name)
            if entry.name:
                _add(stored, entry, path)
            else:
                unnamed.append((auto_name, entry))
        inner = _child(group, "layers", path)
        if isinstance(inner, h5py.Group):
            nested_config = ((layer_config.get("config") or {}).get("layers")) if layer_config else None
            for entry in _keras3_layers(inner, nested_config, model, path, depth + 1).values():
                _add(stored, entry, path)
    # Files of early Keras 3 releases name nothing: the k-th conv2d of the model that holds the
    # convolutions is its k-th Conv2D layer, and likewise for dense. Unnamed layers elsewhere
    # (a fine-tuned model's own head) stay unnamed and are ignored.
    convolutions = sum(_split_auto_name(a)[0] == "conv2d" for a, _ in unnamed)
    if convolutions:
        by_class = {
            "conv2d": [layer.name for layer in model.layers if layer.class_name == "Conv2D"],
            "dense": [layer.name for layer in model.layers if layer.class_name == "Dense"],
        }
        # Order alone says nothing when the counts differ (a VGG19 file read into VGG16 would
        # otherwise fill block4_conv1 with block3_conv4's weights wherever the shapes agree).
        if convolutions != len(by_class["conv2d"]):
            raise ValueError(
                f"{path!r} names no layers (an early Keras 3 file) and has {convolutions} convolutions; model "
                f"{model.name!r} has {len(by_class['conv2d'])}, so the file is another VGG depth or another model."
            )
        for auto_name, entry in unnamed:
            base, index = _split_auto_name(auto_name)
            candidates = by_class.get(base, [])
            if index < len(candidates):
                entry.name = candidates[index]
                _add(stored, entry, path)
    return stored


def _add(stored: Dict[str, StoredLayer], entry: StoredLayer, path: str) -> None:
    if entry.name in stored:
        raise ValueError(f"{path!r} has weights for layer {entry.name!r} twice ({stored[entry.name].where} and {entry.where}).")
    stored[entry.name] = entry


def _stored_layers(handle, config: Optional[dict], model: Model, path: str) -> Dict[str, StoredLayer]:
    import h5py

    root = handle
    has_names = "layer_names" in handle.attrs or "layer_names0" in handle.attrs
    if not has_names and isinstance(_child(handle, "model_weights", path), h5py.Group):
        root = handle["model_weights"]  # a whole model saved with model.save(...h5)
    layer_names = _read_name_list(root, "layer_names")
    if layer_names is not None:
        return _classic_layers(root, layer_names, path)
    layers = _child(handle, "layers", path)
    if isinstance(layers, h5py.Group):
        config_layers = ((config or {}).get("config") or {}).get("layers") if isinstance(config, dict) else None
        return _keras3_layers(layers, config_layers, model, path)
    raise ValueError(
        f"{path!r} is an HDF5 file but in no Keras weights layout fastvgg knows: it has neither a 'layer_names' "
        f"attribute (Keras 2) nor a 'layers' group (Keras 3); {_describe(handle)}."
    )


# Matching and checking --------------------------------------------------------------------------------
def _theano_kernel_layout(stored: Dict[str, StoredLayer], model: Model, path: str) -> bool:
    """Whether the conv kernels are stored (out, in, 3, 3), as in Theano-ordered files."""
    layouts = set()
    for layer in model.layers:
        if layer.class_name != "Conv2D" or layer.name not in stored or not stored[layer.name].arrays:
            continue
        shape = tuple(stored[layer.name].arrays[0].shape)
        hwio = layer.weight_shapes()[0]
        if shape == hwio:
            layouts.add("keras")
        elif shape == (hwio[3], hwio[2], hwio[0], hwio[1]):
            layouts.add("theano")
    if len(layouts) > 1:
        raise ValueError(f"{path!r} mixes kernels stored (3, 3, in, out) and (out, in, 3, 3); it is not one model's file.")
    return layouts == {"theano"}


def load_weights(model: Model, filepath) -> None:
    """Fills every weighted layer of ``model`` from a Keras weights file, matching by layer name."""
    path = os.fspath(filepath)
    with _open_weights(path) as (handle, config):
        try:
            stored = _stored_layers(handle, config, model, path)
            plan, theano = _checked_plan(model, stored, path)
            flipped = theano and "_tf_kernels" not in os.path.basename(path)
        except (KeyError, RuntimeError, OSError, TypeError) as error:
            if isinstance(error, (FileNotFoundError, IsADirectoryError)):
                raise
            raise ValueError(f"{path!r} is damaged or not a Keras weights file: {type(error).__name__}: {error}") from None
        # Everything checkable was checked above, the model is still as it was; from here a
        # failure means stored data that cannot be read back (a damaged chunk).
        try:
            for layer, (kernel, bias) in plan:
                if theano and layer.class_name == "Conv2D":
                    kernel = np.asarray(kernel[()])
                    if flipped:
                        kernel = kernel[:, :, ::-1, ::-1]
                    kernel = np.transpose(kernel, (2, 3, 1, 0))
                elif theano and layer.name == "fc1":
                    kernel = _theano_fc1_rows(np.asarray(kernel[()]), model)
                layer._assign(kernel, bias)
        except (KeyError, RuntimeError, OSError, TypeError) as error:
            raise ValueError(
                f"{path!r} is damaged: reading layer {layer.name!r} failed ({type(error).__name__}: {error}). The "
                "layers before it already hold this file's weights: load another file or rebuild the model."
            ) from None


def _theano_fc1_rows(kernel: np.ndarray, model: Model) -> np.ndarray:
    """fc1's rows from Theano's (channel, row, column) flatten order to Keras's (row, column, channel)."""
    _, height, width, channels = model.get_layer("flatten").input_shape
    return kernel.reshape(channels, height, width, -1).transpose(1, 2, 0, 3).reshape(kernel.shape)


def _checked_plan(model: Model, stored: Dict[str, StoredLayer], path: str):
    """(layer, [kernel, bias] datasets) for every weighted layer, all checked before any is
    read, and whether the kernels are in Theano's layout."""
    wanted = {layer.name: layer for layer in model.layers if layer.weight_shapes()}
    with_weights = {name: entry for name, entry in stored.items() if entry.arrays}
    missing = [name for name in wanted if name not in with_weights]
    if missing:
        hint = ""
        if set(missing) <= set(TOP_LAYERS):
            hint = " The file has no classifier top: build the model with include_top=False."
        raise ValueError(
            f"{path!r} has no weights for layer(s) {missing} of model {model.name!r}; "
            f"it has weights for {list(with_weights)[:20]}.{hint}"
        )
    # A full VGG file may fill a model without its top, and a fine-tuned model's own head
    # (layers with other names) is not ours to load; weights for VGG layers this model lacks
    # mean another depth or architecture, which must not load silently.
    unexpected = [
        name for name in with_weights
        if name not in wanted and name not in TOP_LAYERS and _VGG_LAYER_NAME.fullmatch(name)
    ]
    if unexpected:
        raise ValueError(
            f"{path!r} has weights for layer(s) {unexpected} that model {model.name!r} does not have; "
            "it does not look like a VGG of this depth."
        )
    theano = _theano_kernel_layout(with_weights, model, path)
    plan = []
    for name, layer in wanted.items():
        entry = with_weights[name]
        expected = layer.weight_shapes()
        if len(entry.arrays) != len(expected):
            raise ValueError(
                f"Layer {name!r} in {path!r} has {len(entry.arrays)} weights; expected {len(expected)} (kernel and bias)."
            )
        for array, shape, role in zip(entry.arrays, expected, ("kernel", "bias")):
            allowed = [tuple(shape)]
            if theano and layer.class_name == "Conv2D" and role == "kernel":
                allowed = [(shape[3], shape[2], shape[0], shape[1])]
            if tuple(array.shape) not in allowed:
                raise ValueError(
                    f"Layer {name!r}: {role} {array.name} in {path!r} has shape {tuple(array.shape)}, expected "
                    f"{allowed[0]}. The file was saved from a model with other input size, class count or channel count."
                )
            if array.dtype.kind != "f":
                raise ValueError(
                    f"Layer {name!r}: {role} {array.name} in {path!r} has dtype {array.dtype}; weights must be "
                    "floating point (float16, float32 and float64 are converted to float32)."
                )
        plan.append((layer, entry.arrays))
    return plan, theano
