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
read into VGG16) are an error. Every dataset's shape and type is
checked, and every dataset that libhdf5 must decode (chunked, compressed) is read, before any
layer is written, so a file that does not fit, or whose data cannot be read back, leaves the
model as it was; only a file cut short or changed while it is being read can fail later, and
that error names the layer and says the earlier ones were loaded. Early Keras 3 files, which name no layers,
are mapped by order only when they hold as many convolutions as the model. Nothing in a file
is executed; external links, soft links, external storage and virtual datasets are refused.

Files are untrusted by default: libhdf5 parses their metadata only in a child process (see
``_hdf5_reader``), floats must be exactly IEEE binary16/32/64, and every failure is a
``ValueError`` (``OSError`` for I/O) naming the file. Only fastvgg's md5-checked ImageNet
files are parsed in-process (``trusted=True``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ._hdf5_reader import Dataset, Group, HDF5ReadError, HDF5Source, Link, read_arrays, read_rows, read_structure
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
    arrays: List[Dataset] = field(default_factory=list)
    where: str = ""


# Opening ----------------------------------------------------------------------------------------
def _archive_member(path: str) -> Tuple[HDF5Source, Optional[dict]]:
    """The weights member of a ``.keras`` archive, as a window onto the zip, and its model config.

    zipfile raises a dozen exception types on hostile archives (unsupported versions and
    methods, encryption, bad offsets, undecodable names, corrupt streams); each becomes a
    ValueError saying what is wrong. Only config.json (at most 16 MB) is ever decompressed."""
    archive_size = os.path.getsize(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, EOFError) as error:
        if isinstance(error, (PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{path!r} looks like a zip archive (.keras) but its zip directory cannot be read ({error}); "
                         "the file is truncated or damaged.") from None
    except Exception as error:  # BadZipFile, NotImplementedError, UnicodeDecodeError, ValueError, ...
        raise ValueError(f"{path!r} looks like a zip archive (.keras) but its zip directory is damaged or uses features "
                         f"Keras never writes ({type(error).__name__}: {error}).") from None
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
        if info.flag_bits & 0x1:
            raise ValueError(f"{path!r}: {_KERAS_ARCHIVE_WEIGHTS} is encrypted, which Keras never does; fastvgg cannot read it.")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(
                f"{path!r}: {_KERAS_ARCHIVE_WEIGHTS} is compressed, which Keras never does; fastvgg reads "
                ".keras files in place and does not inflate members. Unzip it and pass the path of "
                f"{_KERAS_ARCHIVE_WEIGHTS} instead."
            )
        if info.file_size > archive_size:
            raise ValueError(f"{path!r}: {_KERAS_ARCHIVE_WEIGHTS} claims {info.file_size} bytes in a {archive_size}-byte file.")
        if not 0 <= info.header_offset < archive_size:
            raise ValueError(f"{path!r}: the zip directory puts {_KERAS_ARCHIVE_WEIGHTS} at byte {info.header_offset}, "
                             f"outside the {archive_size}-byte file; the archive is damaged.")
        config = _archive_config(archive, members.get(_KERAS_ARCHIVE_CONFIG), path)
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
    return HDF5Source(path, start, info.file_size), config


def _archive_config(archive: zipfile.ZipFile, info: Optional[zipfile.ZipInfo], path: str) -> Optional[dict]:
    """config.json as data. A missing one is allowed (names then come from the weights file or
    the VGG definition); one that is there but cannot be read means a damaged archive."""
    if info is None:
        return None
    where = f"{path!r}: {_KERAS_ARCHIVE_CONFIG} in the archive"
    if info.file_size > _MAX_CONFIG_BYTES:
        raise ValueError(f"{where} declares {info.file_size} bytes; a model config is a few hundred KB at most.")
    if info.flag_bits & 0x1:
        raise ValueError(f"{where} is encrypted, which Keras never does.")
    try:
        text = archive.read(info)
    except Exception as error:  # zlib.error, LZMAError, BadZipFile (CRC), NotImplementedError, OSError, ...
        raise ValueError(f"{where} cannot be extracted ({type(error).__name__}: {error}); the archive is damaged.") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{where} nests deeper than Python's JSON parser allows; no Keras config does.") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{where} is not valid JSON ({error}); the archive is damaged.") from None


@contextlib.contextmanager
def _open_weights(path: str, trusted: bool = False) -> Iterator[Tuple[HDF5Source, Group, Optional[dict]]]:
    """The HDF5 image holding the weights (the file itself, or a .keras archive's member), its
    structure, and the model config that came with it, if any."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No weights file at {path!r}.")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            # tf.keras's model.save("dir") before TensorFlow 2.16, or Keras 3's model.export():
            # TensorFlow's own protobuf and checkpoint formats, which fastvgg does not read.
            raise IsADirectoryError(
                f"{path!r} is a TensorFlow SavedModel directory, a whole model: load it with "
                "fastvgg.load_model(path) (tf.keras's SavedModels load; TensorFlow serving graphs do not). "
                "weights= takes a Keras weights file (.h5, .weights.h5 or .keras)."
            )
        raise IsADirectoryError(f"{path!r} is a directory; pass the path of a Keras weights file (.h5, .weights.h5 or .keras).")
    config = None
    with open(path, "rb") as raw:
        signature = raw.read(8)
    if signature.startswith(b"PK"):
        source, config = _archive_member(path)
    else:
        source = HDF5Source(path)
    if not _looks_like_hdf5(source):
        inside = f" ({_KERAS_ARCHIVE_WEIGHTS} inside the archive)" if source.size is not None else ""
        raise ValueError(
            f"{path!r}{inside} is not a readable HDF5 file (no HDF5 signature). fastvgg reads Keras weights saved as "
            ".h5, .weights.h5 or .keras; the file may be truncated, or in another format."
        )
    try:
        root = read_structure(source, isolated=not trusted)
    except HDF5ReadError as error:
        raise ValueError(f"{error} It is not a readable HDF5 file (truncated, damaged or hostile); fastvgg reads "
                         "Keras weights saved as .h5, .weights.h5 or .keras.") from None
    yield source, root, config


def _looks_like_hdf5(source: HDF5Source) -> bool:
    """The HDF5 signature at byte 0, 512, 1024, ... (where libhdf5 looks for a superblock)."""
    limit = source.size if source.size is not None else os.path.getsize(source.path)
    with open(source.path, "rb") as raw:
        offset = 0
        while offset + 8 <= limit:
            raw.seek(source.start + offset)
            if raw.read(8) == b"\x89HDF\r\n\x1a\n":
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


# Walking the file without following anything but hard links -------------------------------------
def _child(group: Group, name: str, path: str):
    """The node at ``name`` (which may have several parts, as classic weight names do) below
    ``group``, or None; a link on the way is refused, never followed."""
    node: object = group
    for part in name.split("/"):
        if not isinstance(node, Group):
            return None
        parent, node = node, node.children.get(part)
        if isinstance(node, Link):
            raise ValueError(
                f"{path!r}: {parent.path.rstrip('/')}/{part} is a {node.kind}, not stored data; fastvgg does "
                "not follow links out of a weights file (Keras never writes them)."
            )
    return node


def _dataset(group: Group, name: str, path: str) -> Dataset:
    node = _child(group, name, path)
    if not isinstance(node, Dataset):
        raise ValueError(f"Layer group {group.path.strip('/')!r} in {path!r}: weight {name!r} is listed but missing.")
    if node.external or node.is_virtual:
        raise ValueError(
            f"{path!r}: weight {node.path} keeps its data outside this file (external or virtual dataset); "
            "fastvgg only reads data stored in the file itself."
        )
    return node


def _text_value(value, what: str, path: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        raise ValueError(f"{path!r}: {what} holds {value[:40]!r}, which is not UTF-8 text; the file is damaged.")
    raise ValueError(f"{path!r}: {what} is not text ({type(value).__name__}); the file is damaged or not a Keras file.")


def _read_name_list(group: Group, attribute: str, path: str) -> Optional[List[str]]:
    """A list-of-names attribute; Keras splits long ones into ``name0``, ``name1``, ..."""
    attrs = group.attrs
    if attribute in attrs:
        parts = [attribute]
    elif f"{attribute}0" in attrs:
        parts = []
        while f"{attribute}{len(parts)}" in attrs:
            parts.append(f"{attribute}{len(parts)}")
    else:
        return None
    names = []
    for part in parts:
        value = attrs[part]
        if isinstance(value, np.ndarray) and value.dtype == object:
            values = value.reshape(-1).tolist()
        elif isinstance(value, (str, bytes)):
            values = [value]
        elif isinstance(value, np.ndarray) and value.size == 0:
            values = []  # Keras 2 writes a layer without weights as an empty float array
        else:
            raise ValueError(f"{path!r}: attribute {part!r} of {group.path} is not a list of names; the file is damaged.")
        names.extend(_text_value(v, f"attribute {part!r} of {group.path}", path) for v in values)
    return names


def _describe(root: Group) -> str:
    keys = sorted(root.children)
    attrs = sorted(root.attrs)
    return f"top-level entries {keys[:10]}{' ...' if len(keys) > 10 else ''}, attributes {attrs[:10]}"


# Classic layout -------------------------------------------------------------------------------------
def _classic_layers(root: Group, layer_names: List[str], path: str) -> Dict[str, StoredLayer]:
    stored: Dict[str, StoredLayer] = {}
    for group_name in layer_names:
        group = _child(root, group_name, path)
        if not isinstance(group, Group):
            raise ValueError(f"{path!r} lists layer {group_name!r} in 'layer_names' but has no group for it.")
        owners: Dict[str, StoredLayer] = {}
        for weight_name in _read_name_list(group, "weight_names", path) or []:
            # "block1_conv1/kernel:0" in its own group or in a nested model's group ("vgg16");
            # the 2016 files say "block1_conv1_W_1:0" in the layer's group.
            parts = weight_name.split("/")
            layer = parts[-2] if len(parts) >= 2 else group_name
            if layer not in owners:
                if layer in stored:
                    raise ValueError(f"{path!r} has weights for layer {layer!r} twice ({stored[layer].where} and {group.path}).")
                owners[layer] = stored[layer] = StoredLayer(layer, where=group.path)
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
    for layer in config_layers if isinstance(config_layers, list) else []:
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


def _config_of(layer_config) -> dict:
    """A layer's ``config`` dict from a model config that is only data (anything else: {})."""
    inner = layer_config.get("config") if isinstance(layer_config, dict) else None
    return inner if isinstance(inner, dict) else {}


def _keras3_layers(container: Group, config_layers, model: Model, path: str, depth: int = 0) -> Dict[str, StoredLayer]:
    if depth > _MAX_NESTING:
        raise ValueError(f"{path!r}: models nested more than {_MAX_NESTING} deep; not a file Keras wrote.")
    by_auto_name = _auto_names(config_layers)
    stored: Dict[str, StoredLayer] = {}
    unnamed: List[Tuple[str, StoredLayer]] = []
    for auto_name in list(container.keys()):
        group = _child(container, auto_name, path)
        if not isinstance(group, Group):
            continue
        layer_config = by_auto_name.get(auto_name, {})
        variables = _child(group, "vars", path)
        if isinstance(variables, Group) and variables.children:
            keys = list(variables.keys())
            if sorted(keys) != sorted(str(i) for i in range(len(keys))):
                shown = sorted(keys, key=lambda k: (not k.isdigit(), len(k), k))[:5]
                raise ValueError(f"{path!r}: {variables.path} holds {shown}, not Keras's numbered variables 0, 1, ...")
            keys = [str(i) for i in range(len(keys))]
            name = variables.attrs.get("name")
            if name is not None:
                name = _text_value(name, f"the 'name' attribute of {variables.path}", path)
            if not name:
                name = _config_of(layer_config).get("name")
                name = name if isinstance(name, str) else None
            entry = StoredLayer(name or "", [_dataset(variables, k, path) for k in keys], variables.path)
            if entry.name:
                _add(stored, entry, path)
            else:
                unnamed.append((auto_name, entry))
        inner = _child(group, "layers", path)
        if isinstance(inner, Group):
            nested_config = _config_of(layer_config).get("layers")
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


def _stored_layers(handle: Group, config: Optional[dict], model: Model, path: str) -> Dict[str, StoredLayer]:
    root = handle
    has_names = "layer_names" in handle.attrs or "layer_names0" in handle.attrs
    model_weights = _child(handle, "model_weights", path)
    if not has_names and isinstance(model_weights, Group):
        root = model_weights  # a whole model saved with model.save(...h5)
    layer_names = _read_name_list(root, "layer_names", path)
    if layer_names is not None:
        return _classic_layers(root, layer_names, path)
    layers = _child(handle, "layers", path)
    if isinstance(layers, Group):
        return _keras3_layers(layers, _config_of(config).get("layers"), model, path)
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


class _StoredArray:
    """One checked dataset as the layers' ``_assign`` reads it: ``[()]`` for all of it, a row
    slice for part (fc1's 411 MB is packed slice by slice and never held twice). Data that is
    not contiguous in the file was read beforehand; the rest is read from its offset here."""

    def __init__(self, source: HDF5Source, dataset: Dataset, preloaded: Optional[np.ndarray]) -> None:
        self._source, self._dataset, self._preloaded = source, dataset, preloaded
        self.shape = dataset.shape
        self.dtype = dataset.dtype

    def __getitem__(self, key):
        if self._preloaded is not None:
            return self._preloaded[key]
        if key == ():
            return read_rows(self._source, self._dataset, 0, None)
        if isinstance(key, slice) and key.step in (None, 1) and self.shape:
            first, stop, _ = key.indices(self.shape[0])
            return read_rows(self._source, self._dataset, first, max(first, stop))
        return read_rows(self._source, self._dataset, 0, None)[key]


def load_weights(model: Model, filepath, trusted: bool = False) -> None:
    """Fills every weighted layer of ``model`` from a Keras weights file, matching by layer name.

    Every failure is a ValueError (OSError for I/O) that names the file; a failed load leaves
    the model as it was. ``trusted`` (fastvgg's md5-checked ImageNet files only) lets libhdf5
    parse the metadata in this process instead of in a child process."""
    path = os.fspath(filepath)
    _with_clear_errors(path, lambda: _load_weights(model, path, trusted))


def _with_clear_errors(path: str, work):
    """Runs ``work``; any exception that is not already a ValueError or OSError naming the
    file becomes one (zipfile, json, h5py and Unicode raise many other types)."""
    try:
        return work()
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except OSError as error:
        raise OSError(f"Reading the weights file {path!r} failed: {error}") from None
    except (Exception, RecursionError, MemoryError) as error:  # a case the checks missed: say so, plainly
        raise ValueError(
            f"{path!r} could not be loaded: {type(error).__name__}: {error}. The file is damaged or not a Keras "
            "weights file; the model was left as it was."
        ) from error


@contextlib.contextmanager
def _checked_file(model: Model, path: str, trusted: bool):
    """The file opened and every dataset the model needs found and checked, nothing read:
    (source, [(layer, [kernel, bias])], theano layout, flipped kernels)."""
    with _open_weights(path, trusted) as (source, root, config):
        stored = _stored_layers(root, config, model, path)
        plan, theano = _checked_plan(model, stored, path)
        yield source, plan, theano, theano and "_tf_kernels" not in os.path.basename(path)


def _load_weights(model: Model, path: str, trusted: bool) -> None:
    with _checked_file(model, path, trusted) as (source, plan, theano, flipped):
        # Data that libhdf5 must decode (chunked, compressed, compact) is read now, by one child
        # process, before any layer changes: a damaged chunk then leaves the model as it was.
        indirect = [array for _, arrays in plan for array in arrays if not array.readable_in_place]
        try:
            preloaded = dict(zip((id(a) for a in indirect), read_arrays(source, indirect, isolated=not trusted)))
        except HDF5ReadError as error:
            raise ValueError(f"{error} The model was left as it was.") from None
        # Everything checkable was checked above, the model is still as it was; from here only
        # a file changed or cut short while it is read can fail.
        for layer, arrays in plan:
            kernel, bias = (_StoredArray(source, a, preloaded.get(id(a))) for a in arrays)
            try:
                if theano and layer.class_name == "Conv2D":
                    kernel = np.asarray(kernel[()])
                    if flipped:
                        kernel = kernel[:, :, ::-1, ::-1]
                    kernel = np.transpose(kernel, (2, 3, 1, 0))
                elif theano and layer.name == "fc1":
                    kernel = _theano_fc1_rows(np.asarray(kernel[()]), model)
                layer._assign(kernel, bias)
            except HDF5ReadError as error:
                raise ValueError(
                    f"{error} Reading layer {layer.name!r} failed: the file changed or was cut short while it was "
                    "read. The layers before it already hold this file's weights: load another file or rebuild the model."
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
                    f"Layer {name!r}: {role} {array.path} in {path!r} has shape {tuple(array.shape)}, expected "
                    f"{allowed[0]}. The file was saved from a model with other input size, class count or channel count."
                )
            if array.dtype is None and array.type_problem and "float" in array.type_problem:
                raise ValueError(
                    f"Layer {name!r}: {role} {array.path} in {path!r} is stored as {array.type_problem}. Only IEEE "
                    "binary16, binary32 and binary64 are accepted: libhdf5 would convert other formats without a "
                    "word, giving wrong weights."
                )
            if array.dtype is None or array.dtype.kind != "f":
                kind = array.dtype if array.dtype is not None else array.type_problem
                raise ValueError(
                    f"Layer {name!r}: {role} {array.path} in {path!r} has dtype {kind}; weights must be "
                    "floating point (float16, float32 and float64 are converted to float32)."
                )
        plan.append((layer, entry.arrays))
    return plan, theano
