"""Reading a TensorFlow SavedModel directory that tf.keras wrote, without TensorFlow.

``model.save("dir")`` in tf.keras (the default before TensorFlow 2.16, and tf_keras's still)
writes a directory of TensorFlow formats rather than an HDF5 file:

- ``keras_metadata.pb``: a protobuf list of the saved objects, each with its path from the
  model ("root.layer_with_weights-0.layer-3") and a JSON text; the root's JSON holds the model
  config that an ``.h5`` file would hold, the others name each layer. TensorFlow 2.0-2.4 kept
  the same JSON texts in ``saved_model.pb``'s object graph instead, where the paths are found
  by walking the graph (only that part of the file is parsed; its graph is never run).
- ``variables/variables.index``: a LevelDB-format table (sorted keys, blocks with CRC-32C
  trailers) from each variable's checkpoint key to where its bytes are: which data shard, at
  which offset, how many, their dtype, shape and CRC-32C. Its ``_CHECKPOINTABLE_OBJECT_GRAPH``
  entry is a protobuf graph of the saved objects; walking it by the metadata's paths leads
  from each layer to its variables' checkpoint keys (the keys themselves are not layer names:
  a nested model's variables are stored as "variables/7/...").
- ``variables/variables.data-00000-of-00001`` (and further shards): the tensors' raw bytes.

Only what loading a Keras model needs is read: no TensorFlow graph or function is run or parsed.
Every structure is bounds-checked; anything malformed, truncated or foreign is a ValueError
naming the file and what is wrong. The tensors' checksums are verified as they are read.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

METADATA_FILE = "keras_metadata.pb"
GRAPH_FILE = "saved_model.pb"
VARIABLES_PREFIX = os.path.join("variables", "variables")
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

# Sizes beyond any Keras model's, refused before they are read into memory.
_MAX_METADATA_BYTES = 512 << 20
_MAX_INDEX_BYTES = 64 << 20  # a VGG16's is 2 KB; one entry per variable
_MAX_SHARDS = 100_000
_TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB's table footer magic, which TensorFlow keeps
_FOOTER_BYTES = 48
_BLOCK_TRAILER_BYTES = 5  # compression type, masked CRC-32C

# TensorFlow's DataType enum values for the tensors a Keras layer can hold; bfloat16 is
# widened by hand (numpy has no such dtype).
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 9: np.dtype("<i8"), 19: np.dtype("<f2"),
           14: np.dtype("<u2")}
_DT_BFLOAT16, _DT_STRING = 14, 7
_DTYPE_NAMES = {4: "uint8", 5: "int16", 6: "int8", 7: "string", 8: "complex64", 10: "bool", 20: "resource",
                21: "variant", 22: "uint32", 23: "uint64"}


def is_saved_model(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, GRAPH_FILE))


def saved_model_files(path: str) -> List[str]:
    """The files of a SavedModel directory that loading reads (relative paths, sorted): what
    the packed cache's key hashes."""
    variables = os.path.join(path, "variables")
    names = sorted(n for n in os.listdir(variables) if n.startswith("variables.")) if os.path.isdir(variables) else []
    return [METADATA_FILE] + [os.path.join("variables", n) for n in names]


class _Malformed(ValueError):
    """A structure inside the directory is not what TensorFlow writes; the reader adds the path."""


# Protobuf's wire format --------------------------------------------------------------------------
def _varint(data: bytes, position: int, limit: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= limit:
            raise _Malformed("a number runs past the end of its record")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise _Malformed("a number is longer than 64 bits")


def _fields(data: bytes, start: int = 0, end: Optional[int] = None) -> Iterator[Tuple[int, int, object]]:
    """(field number, wire type, value) of each field of one protobuf message: an int for
    varints and fixed-width fields, (start, end) offsets into ``data`` for length-delimited ones."""
    position, limit = start, len(data) if end is None else end
    while position < limit:
        key, position = _varint(data, position, limit)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("a field has number 0")
        if wire == 0:
            value, position = _varint(data, position, limit)
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if position + width > limit:
                raise _Malformed("a fixed-width field runs past the end of its record")
            value = int.from_bytes(data[position:position + width], "little")
            position += width
        elif wire == 2:
            length, position = _varint(data, position, limit)
            if length > limit - position:
                raise _Malformed("a field's length runs past the end of its record")
            value = (position, position + length)
            position += length
        else:  # groups (3, 4) are deprecated and nothing here uses them; 6, 7 do not exist
            raise _Malformed(f"a field has wire type {wire}, which these messages do not use")
        yield number, wire, value


def _text(data: bytes, span, what: str) -> str:
    if not isinstance(span, tuple):
        raise _Malformed(f"{what} is not a string")
    try:
        return data[span[0]:span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"{what} is not UTF-8 text") from None


def _strings(data: bytes, span, fields: Dict[int, str]) -> Tuple[str, ...]:
    """The string fields numbered as ``fields``' keys (described by its values, for errors) of
    the message at ``span``, in that order; "" where absent."""
    found = {number: "" for number in fields}
    for number, _, value in _fields(data, *span):
        if number in fields:
            found[number] = _text(data, value, fields[number])
    return tuple(found[number] for number in fields)


def _int_field(value, what: str) -> int:
    if not isinstance(value, int):
        raise _Malformed(f"{what} is not a number")
    return value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# LevelDB tables (the checkpoint's index) ----------------------------------------------------------
def _mask(crc: int) -> int:
    """LevelDB's and TensorFlow's masked CRC (stored so that a CRC of data holding CRCs differs)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _crc32c(data, crc: int = 0) -> int:
    from . import _core

    return _core.crc32c(data, crc)


def _snappy_decompress(data: bytes) -> bytes:
    """Snappy's raw format (a table block TensorFlow compressed): a length, then literals and
    back-references."""
    length, position = _varint(data, 0, len(data))
    if length > _MAX_INDEX_BYTES:
        raise _Malformed("a compressed block claims more bytes than any checkpoint index holds")
    out = bytearray()
    while position < len(data):
        tag = data[position]
        position += 1
        kind = tag & 3
        if kind == 0:  # literal
            size = tag >> 2
            if size >= 60:
                extra = size - 59
                if position + extra > len(data):
                    raise _Malformed("a compressed block is truncated")
                size = int.from_bytes(data[position:position + extra], "little")
                position += extra
            size += 1
            if position + size > len(data):
                raise _Malformed("a compressed block is truncated")
            out += data[position:position + size]
            position += size
            continue
        if kind == 1:
            if position >= len(data):
                raise _Malformed("a compressed block is truncated")
            size, offset = ((tag >> 2) & 7) + 4, ((tag >> 5) << 8) | data[position]
            position += 1
        else:
            width = 2 if kind == 2 else 4
            if position + width > len(data):
                raise _Malformed("a compressed block is truncated")
            size, offset = (tag >> 2) + 1, int.from_bytes(data[position:position + width], "little")
            position += width
        if offset == 0 or offset > len(out):
            raise _Malformed("a compressed block refers to bytes before its start")
        if size <= offset:
            out += out[len(out) - offset:len(out) - offset + size]
        else:  # an overlapping copy repeats the last `offset` bytes
            pattern = out[len(out) - offset:]
            out += (pattern * (size // offset + 1))[:size]
        if len(out) > length:
            break
    if len(out) != length:
        raise _Malformed(f"a compressed block holds {len(out)} bytes, not the {length} it declares")
    return bytes(out)


def _block(data: bytes, handle: Tuple[int, int], what: str) -> bytes:
    offset, size = handle
    if offset + size + _BLOCK_TRAILER_BYTES > len(data) - _FOOTER_BYTES:
        raise _Malformed(f"the {what} block lies past the end of the index (truncated?)")
    contents = data[offset:offset + size]
    kind = data[offset + size]
    stored = int.from_bytes(data[offset + size + 1:offset + size + 5], "little")
    if _mask(_crc32c(data[offset:offset + size + 1])) != stored:
        raise _Malformed(f"the {what} block fails its checksum (the file is damaged)")
    if kind == 0:
        return contents
    if kind == 1:
        return _snappy_decompress(contents)
    raise _Malformed(f"the {what} block is compressed with method {kind}, which TensorFlow does not use")


def _block_entries(block: bytes, what: str) -> Iterator[Tuple[bytes, bytes]]:
    if len(block) < 4:
        raise _Malformed(f"a {what} block is too short")
    restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * restarts
    if restarts > len(block) // 4 or end < 0:
        raise _Malformed(f"a {what} block's restart table does not fit in it")
    position, key = 0, b""
    while position < end:
        shared, position = _varint(block, position, end)
        unshared, position = _varint(block, position, end)
        value_size, position = _varint(block, position, end)
        if shared > len(key) or unshared + value_size > end - position:
            raise _Malformed(f"a {what} block entry runs past its block")
        key = key[:shared] + block[position:position + unshared]
        position += unshared
        yield key, block[position:position + value_size]
        position += value_size


def _block_handle(data: bytes, position: int, limit: int) -> Tuple[Tuple[int, int], int]:
    offset, position = _varint(data, position, limit)
    size, position = _varint(data, position, limit)
    return (offset, size), position


def read_table(data: bytes) -> Dict[bytes, bytes]:
    """Every key and value of a LevelDB-format table held in ``data``."""
    if len(data) < _FOOTER_BYTES:
        raise _Malformed("the index is shorter than a table's footer (truncated or not a checkpoint index)")
    footer_start = len(data) - _FOOTER_BYTES
    if int.from_bytes(data[-8:], "little") != _TABLE_MAGIC:
        raise _Malformed("the index does not end in a table's magic number (truncated or not a checkpoint index)")
    _, position = _block_handle(data, footer_start, footer_start + 40)  # the meta-index: unused
    index_handle, _ = _block_handle(data, position, footer_start + 40)
    table: Dict[bytes, bytes] = {}
    for _, handle_bytes in _block_entries(_block(data, index_handle, "index"), "index"):
        handle, _ = _block_handle(handle_bytes, 0, len(handle_bytes))
        for key, value in _block_entries(_block(data, handle, "data"), "data"):
            table[key] = value
    return table


# The checkpoint's entries -------------------------------------------------------------------------
@dataclass
class CheckpointTensor:
    """Where one saved tensor's bytes are, checked against the shard's size; ``read`` reads them
    and verifies their checksum. ``shape``, ``dtype`` as numpy gives them (bfloat16 as float32)."""

    key: str
    shard_path: str
    offset: int
    size: int
    crc32c: Optional[int]
    shape: Tuple[int, ...]
    dtype: np.dtype
    stored_dtype: np.dtype
    bfloat16: bool = False
    tf_dtype: int = 0  # TensorFlow's DataType number

    def raw(self) -> bytes:
        with open(self.shard_path, "rb") as f:
            f.seek(self.offset)
            raw = f.read(self.size)
        if len(raw) != self.size:
            raise _Malformed(f"tensor {self.key!r} was cut short: the data file shrank while it was read")
        return raw

    def read(self) -> np.ndarray:
        raw = self.raw()
        if self.crc32c is not None and _mask(_crc32c(raw)) != self.crc32c:
            raise _Malformed(f"tensor {self.key!r} fails its checksum (the data file is damaged)")
        array = np.frombuffer(raw, dtype=self.stored_dtype).reshape(self.shape)
        if self.bfloat16:
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array


def _shape(data: bytes, span) -> Tuple[int, ...]:
    dims: List[int] = []
    for number, _, value in _fields(data, *span):
        if number == 3 and value:
            raise _Malformed("a tensor has unknown rank")
        if number == 2:
            size = 0
            for inner, _, dim in _fields(data, *value):
                if inner == 1:
                    size = _signed64(_int_field(dim, "a dimension"))
            if size < 0:
                raise _Malformed("a tensor has a dimension of unknown size")
            dims.append(size)
    return tuple(dims)


def _entry(key: str, value: bytes, shards: List[str], shard_sizes: List[int], big_endian: bool) -> Optional[CheckpointTensor]:
    dtype_code, shape, shard, offset, size, crc, sliced = 0, (), 0, 0, 0, None, False
    for number, _, field in _fields(value):
        if number == 1:
            dtype_code = _int_field(field, "a dtype")
        elif number == 2:
            shape = _shape(value, field)
        elif number == 3:
            shard = _int_field(field, "a shard number")
        elif number == 4:
            offset = _signed64(_int_field(field, "an offset"))
        elif number == 5:
            size = _signed64(_int_field(field, "a size"))
        elif number == 6:
            crc = _int_field(field, "a checksum")
        elif number == 7:
            sliced = True
    if sliced:
        raise _Malformed(f"tensor {key!r} is saved in slices (a partitioned variable), which Keras models do not use")
    if not 0 <= shard < len(shards):
        raise _Malformed(f"tensor {key!r} lies in data shard {shard}, but the index names {len(shards)}")
    if offset < 0 or size < 0 or offset + size > shard_sizes[shard]:
        raise _Malformed(
            f"tensor {key!r} lies at bytes {offset}..{offset + size} of {os.path.basename(shards[shard])}, which holds "
            f"{shard_sizes[shard]} (truncated?)"
        )
    stored = _DTYPES.get(dtype_code)
    if dtype_code == _DT_STRING:
        stored = np.dtype("u1")
    elif stored is None:
        return CheckpointTensor(key, shards[shard], offset, size, crc, shape, np.dtype("V1"), np.dtype("V1"),
                                tf_dtype=dtype_code)
    if big_endian:
        stored = stored.newbyteorder(">")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if dtype_code != _DT_STRING and count * stored.itemsize != size:
        raise _Malformed(f"tensor {key!r} has shape {shape} of {stored.name} ({count * stored.itemsize} bytes) but {size} bytes")
    bfloat16 = dtype_code == _DT_BFLOAT16
    dtype = np.dtype(np.float32) if bfloat16 else stored
    return CheckpointTensor(key, shards[shard], offset, size, crc, shape if dtype_code != _DT_STRING else (size,),
                            dtype, stored, bfloat16)


def read_checkpoint_index(prefix: str) -> Dict[str, CheckpointTensor]:
    """The tensors of the checkpoint at ``prefix`` (``.../variables/variables``), by key."""
    index_path = prefix + ".index"
    size = os.path.getsize(index_path)
    if size > _MAX_INDEX_BYTES:
        raise _Malformed(f"{os.path.basename(index_path)} is {size} bytes, more than any Keras model's index")
    with open(index_path, "rb") as f:
        table = read_table(f.read())
    header = table.pop(b"", None)
    if header is None:
        raise _Malformed(f"{os.path.basename(index_path)} has no bundle header (not a TensorFlow checkpoint index)")
    shards, big_endian = 1, False
    for number, _, value in _fields(header):
        if number == 1:
            shards = _int_field(value, "the shard count")
        elif number == 2:
            big_endian = _int_field(value, "the byte order") == 1
    if not 1 <= shards <= _MAX_SHARDS:
        raise _Malformed(f"the checkpoint header names {shards} data shards")
    paths = [f"{prefix}.data-{i:05d}-of-{shards:05d}" for i in range(shards)]
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise _Malformed(f"the checkpoint's data file {missing[0]} is missing (copy the whole SavedModel directory)")
    sizes = [os.path.getsize(p) for p in paths]
    tensors: Dict[str, CheckpointTensor] = {}
    for key, value in table.items():
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed("a checkpoint key is not UTF-8 text") from None
        tensor = _entry(name, value, paths, sizes, big_endian)
        if tensor is not None:
            tensors[name] = tensor
    return tensors


def _string_scalar(tensor: CheckpointTensor) -> bytes:
    """A scalar string tensor's bytes. TensorFlow stores the length (a varint), the masked
    CRC-32C of the length as a uint32, then the string; the entry's checksum covers the uint32
    length, that CRC and the string."""
    if tensor.size > _MAX_METADATA_BYTES:
        raise _Malformed(f"tensor {tensor.key!r} is {tensor.size} bytes, more than any Keras model's object graph")
    raw = tensor.raw()
    length, position = _varint(raw, 0, len(raw))
    if position + 4 + length != len(raw) or length >= 1 << 32:
        raise _Malformed(f"tensor {tensor.key!r} is not one string")
    length_bytes, length_crc = struct.pack("<I", length), raw[position:position + 4]
    checks = _mask(_crc32c(length_bytes)) == int.from_bytes(length_crc, "little")
    if tensor.crc32c is not None:
        checks = checks and _mask(_crc32c(raw[position + 4:], _crc32c(length_bytes + length_crc))) == tensor.crc32c
    if not checks:
        raise _Malformed(f"tensor {tensor.key!r} fails its checksum (the data file is damaged)")
    return raw[position + 4:]


# The object graph: from a layer's path to its variables --------------------------------------------
@dataclass
class _Node:
    children: List[Tuple[str, int]]
    variables: List[Tuple[str, str]]  # (full_name, checkpoint key) of a VARIABLE_VALUE attribute


def _object_reference(data: bytes, span) -> Tuple[str, int]:
    """(local name, node id) of an ObjectReference, the child link of both object graphs (the
    checkpoint's and saved_model.pb's)."""
    node_id = -1
    for number, _, item in _fields(data, *span):
        if number == 1:
            node_id = _int_field(item, "a child's node id")
    local_name, = _strings(data, span, {2: "a child's name"})
    return local_name, node_id


def _object_graph(data: bytes) -> List[_Node]:
    nodes: List[_Node] = []
    for number, _, span in _fields(data):
        if number != 1:
            continue
        if not isinstance(span, tuple):
            raise _Malformed("an object graph node is not a message")
        node = _Node([], [])
        for field, _, value in _fields(data, *span):
            if field == 1 and isinstance(value, tuple):
                node.children.append(_object_reference(data, value))
            elif field == 2 and isinstance(value, tuple):
                name, full_name, checkpoint_key = _strings(
                    data, value, {1: "an attribute's name", 2: "a variable's name", 3: "a checkpoint key"})
                if name == "VARIABLE_VALUE":
                    node.variables.append((full_name, checkpoint_key))
        nodes.append(node)
    if not nodes:
        raise _Malformed("the checkpoint's object graph is empty")
    for node in nodes:
        for local_name, node_id in node.children:
            if not 0 <= node_id < len(nodes):
                raise _Malformed(f"the object graph's child {local_name!r} points at node {node_id} of {len(nodes)}")
    return nodes


def _walk(nodes: List[_Node], path: List[str]) -> Optional[_Node]:
    node = nodes[0]
    for name in path:
        found = [node_id for local_name, node_id in node.children if local_name == name]
        if not found:
            return None
        node = nodes[found[0]]
    return node


# The metadata: the model's config and each layer's path --------------------------------------------
def _plain_json(value):
    """Keras's SavedModel JSON with its tuples ({"class_name": "__tuple__", "items": [...]}) and
    TensorShapes made lists, as in an .h5 file's config."""
    if isinstance(value, dict):
        if value.get("class_name") in ("__tuple__", "TensorShape") and isinstance(value.get("items"), list) and len(value) == 2:
            return [_plain_json(v) for v in value["items"]]
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    return value


def _metadata(data: bytes) -> List[Tuple[str, str, str]]:
    """(node path, identifier, JSON text) of each saved object."""
    objects = []
    for number, _, span in _fields(data):
        if number != 1:
            continue
        if not isinstance(span, tuple):
            raise _Malformed(f"{METADATA_FILE} holds a node that is not a message")
        objects.append(_strings(data, span, {3: "a node path", 4: "a node identifier", 5: "a node's metadata"}))
    return objects


def _metadata_in_graph(data: bytes) -> List[Tuple[str, str, str]]:
    """The same triples from saved_model.pb, where TensorFlow 2.0-2.4 kept each Keras object's
    metadata (SavedModel.meta_graphs[0].object_graph_def.nodes[i].user_object.metadata); the
    paths are the breadth-first first-found ones from the root, as keras_metadata.pb names them."""
    meta_graph = next((span for number, _, span in _fields(data) if number == 2), None)
    if not isinstance(meta_graph, tuple):
        raise _Malformed(f"{GRAPH_FILE} holds no meta graph")
    graph = next((span for number, _, span in _fields(data, *meta_graph) if number == 7), None)
    if not isinstance(graph, tuple):
        raise _Malformed(f"{GRAPH_FILE} holds no object graph")
    nodes: List[Tuple[List[Tuple[str, int]], str, str]] = []
    for number, _, span in _fields(data, *graph):
        if number != 1 or not isinstance(span, tuple):
            continue
        children: List[Tuple[str, int]] = []
        identifier = text = ""
        for field, _, value in _fields(data, *span):
            if field == 1 and isinstance(value, tuple):
                children.append(_object_reference(data, value))
            elif field == 4 and isinstance(value, tuple):
                identifier, text = _strings(data, value, {1: "an object's identifier", 3: "an object's metadata"})
        nodes.append((children, identifier, text))
    if not nodes:
        raise _Malformed(f"{GRAPH_FILE}'s object graph is empty")
    paths = {0: "root"}
    queue = [0]
    for node_id in queue:  # breadth first; the list grows as it is walked
        for local_name, child in nodes[node_id][0]:
            if not 0 <= child < len(nodes):
                raise _Malformed(f"{GRAPH_FILE}'s object graph points at node {child} of {len(nodes)}")
            if child not in paths:
                paths[child] = f"{paths[node_id]}.{local_name}"
                queue.append(child)
    return [(paths[i], identifier, text) for i, (_, identifier, text) in enumerate(nodes) if i in paths and text]


def _json(text: str, what: str) -> dict:
    try:
        value = _plain_json(json.loads(text))
    except RecursionError:
        raise _Malformed(f"{what} nests deeper than any Keras config") from None
    except ValueError as error:
        raise _Malformed(f"{what} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise _Malformed(f"{what} is not a JSON object")
    return value


@dataclass
class SavedModelContents:
    config: dict  # {"class_name": ..., "config": ...}, as in an .h5 file's model_config
    keras_version: str
    # The weights of each layer that has any, by layer name: (weight name, tensor) in the
    # order TensorFlow saved them.
    layer_weights: Dict[str, List[Tuple[str, CheckpointTensor]]]


def read_saved_model(path: str) -> SavedModelContents:
    """The model config and the layers' weights (unread: see CheckpointTensor.read) of a
    SavedModel directory that tf.keras wrote."""
    try:
        return _read(path)
    except _Malformed as error:
        raise ValueError(f"{path!r}: {error}.") from None


def _read(path: str) -> SavedModelContents:
    # TensorFlow 2.5 and later write the Keras metadata beside the graph; 2.0-2.4 inside it.
    in_graph = not os.path.isfile(os.path.join(path, METADATA_FILE))
    source = GRAPH_FILE if in_graph else METADATA_FILE
    size = os.path.getsize(os.path.join(path, source))
    if size > _MAX_METADATA_BYTES:
        raise _Malformed(f"{source} is {size} bytes, more than any Keras model's")
    with open(os.path.join(path, source), "rb") as f:
        data = f.read()
    objects = _metadata_in_graph(data) if in_graph else _metadata(data)
    roots = [(identifier, text) for node_path, identifier, text in objects if node_path == "root"]
    if not roots:
        raise _Malformed(
            f"the SavedModel holds no Keras model config (no {METADATA_FILE}, none inside {GRAPH_FILE}): it was written by "
            "tf.saved_model.save or Keras 3's model.export(), a serving graph. fastvgg reads the Keras model, not "
            "TensorFlow graphs. Where TensorFlow is installed, load the Keras model and save it as a Keras file "
            "(model.save('model.keras') or 'model.h5'), then load that file"
            if in_graph else f"{METADATA_FILE} describes no root object (not a Keras SavedModel)"
        )
    identifier, text = roots[0]
    root = _json(text, f"{METADATA_FILE}'s model description")
    config = root.get("config")
    if identifier not in ("_tf_keras_network", "_tf_keras_sequential", "_tf_keras_model") or not isinstance(config, dict) \
            or not isinstance(config.get("layers"), list):
        kind = root.get("class_name") or identifier or "object"
        raise _Malformed(
            f"the saved object is a {kind} without a Functional or Sequential config (a subclassed Keras model, or not "
            "a model): its layers are defined by Python code, which fastvgg does not run. Rebuild it as a Functional or "
            "Sequential model, or save it with model.save('model.h5') and load that file"
        )
    model_config = {"class_name": root.get("class_name"), "config": config}

    tensors = read_checkpoint_index(os.path.join(path, VARIABLES_PREFIX))
    graph_tensor = tensors.get(OBJECT_GRAPH_KEY)
    if graph_tensor is None:
        raise _Malformed("the checkpoint has no object graph (a name-based TensorFlow 1 checkpoint), so its variables "
                         "cannot be matched to the layers")
    nodes = _object_graph(_string_scalar(graph_tensor))
    layer_weights: Dict[str, List[Tuple[str, CheckpointTensor]]] = {}
    owner: Dict[str, str] = {}
    for node_path, identifier, text in objects:
        if node_path == "root" or not identifier.startswith("_tf_keras_") or not text:
            continue
        parts = node_path.split(".")
        if parts[0] != "root":
            continue
        node = _walk(nodes, parts[1:])
        # A layer's weights are its children that hold a variable's value (its other children
        # are functions, lists and the like).
        # One variable may be tracked under two names (Normalization's mean and adapt_mean).
        variables, seen = [], set()
        for local_name, node_id in node.children if node is not None else []:
            if nodes[node_id].variables and node_id not in seen:
                seen.add(node_id)
                variables.append((local_name, nodes[node_id].variables[0]))
        if not variables:
            continue
        name = _json(text, f"{METADATA_FILE}'s description of {node_path}").get("name")
        if not isinstance(name, str):
            raise _Malformed(f"{METADATA_FILE} gives the layer at {node_path} no name")
        if name in owner and owner[name] != node_path:
            raise _Malformed(f"two layers with weights are both named {name!r} ({owner[name]} and {node_path})")
        owner[name] = node_path
        weights = []
        for local_name, (full_name, key) in variables:
            tensor = tensors.get(key)
            if tensor is None:
                raise _Malformed(f"layer {name!r}'s variable {full_name or local_name!r} has no entry {key!r} in the checkpoint")
            # The variable "block1_conv1/kernel" is Keras's weight "kernel" (the attribute may be
            # named otherwise: Normalization keeps its "mean" as adapt_mean).
            weights.append(((full_name.rsplit("/", 1)[-1].split(":", 1)[0]) or local_name, tensor))
        layer_weights[name] = weights
    for weights in layer_weights.values():
        for weight_name, tensor in weights:
            if tensor.stored_dtype == np.dtype("V1"):
                dtype = _DTYPE_NAMES.get(tensor.tf_dtype, f"number {tensor.tf_dtype}")
                raise _Malformed(f"tensor {tensor.key!r} ({weight_name}) has dtype {dtype}; Keras weights are floating point")
    version = root.get("keras_version")
    return SavedModelContents(model_config, version if isinstance(version, str) else "", layer_weights)
