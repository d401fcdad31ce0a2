"""Features of many image files, streamed to disk: what ``fastvgg features`` runs.

    from fastvgg.stream import extract_files
    summary = extract_files(model, ["photos/", "more/*.jpg"], ["block5_pool"], "feats.npy",
                            size=(224, 224), pooling="avg")

The inputs (files, directories searched recursively for image files, glob patterns) are
listed once, in a fixed order. Images are decoded by a pool of threads (Pillow releases the
GIL while it decodes) a few batches ahead of the model, which runs with the GIL released too,
so decoding overlaps prediction. Memory stays bounded whatever the number of images: at most
``prefetch_batches`` batches of decoded images are held, and results go straight into
memory-mapped arrays on disk.

Work in progress lives in a folder beside the output, ``<output>.partial/``:

- ``files.txt``: the input files, one a line, in processing order (listed at the first run,
  so a resumed run sees the same list even if files were added since);
- ``state.json``: the settings, the number of input files done, the rows written and the
  files skipped; replaced atomically (temporary file + rename) after each batch, once that
  batch's rows are flushed;
- ``layer<i>.npy``: one memory-mapped array per layer, preallocated for every file.

A run that finds a ``.partial`` folder with the same settings resumes after the last batch it
recorded (an interrupted batch is simply done again); with other settings it stops and says
so. When all files are done, the output is written (``.npy``: the array is cut to the rows
written and renamed into place; ``.npz``: the arrays are stored uncompressed in a zip;
``.parquet``: one fixed-size-list column per layer, written by pyarrow in row groups) and the
``.partial`` folder is removed. Files that cannot be read as images are skipped: the output
has rows only for the images read, in input order; ``<stem>.paths.txt`` (beside a ``.npy``)
or the ``paths`` array / ``path`` column (``.npz``/``.parquet``) names the image of each row,
and ``<stem>.skipped.txt`` lists the skipped files with the reason.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._progress import progress_bar

# Extensions a directory is searched for; a file named explicitly is tried whatever its name.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
OUTPUT_FORMATS = (".npy", ".npz", ".parquet")
STATE_VERSION = 1
# Decoded images are held for this many batches ahead of the model: enough to keep the model
# busy while the pool decodes, few enough that memory does not grow with the file count.
DEFAULT_PREFETCH_BATCHES = 2


class StreamError(ValueError):
    """A problem with the inputs, the output path or a partial run, said in one line."""


def list_inputs(patterns: Sequence[str]) -> List[str]:
    """The files named by ``patterns`` (files, directories, glob patterns), in argument order;
    a directory gives its image files, recursively, sorted by path. Duplicates are dropped."""
    files: List[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if os.path.isdir(pattern):
            files.extend(_images_under(pattern))
        elif os.path.exists(pattern):
            files.append(pattern)
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            found = []
            for match in matches:
                found.extend(_images_under(match) if os.path.isdir(match) else [match])
            if not found:
                raise StreamError(f"{pattern}: the pattern matches no file.")
            files.extend(found)
        else:
            raise StreamError(f"{pattern}: no such file or directory.")
    return list(dict.fromkeys(files))


def _images_under(directory: str) -> List[str]:
    found = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                path = os.path.join(root, name)
                if os.path.isfile(path):
                    found.append(path)
    return found


def output_format(output: str) -> str:
    extension = os.path.splitext(output)[1].lower()
    if extension not in OUTPUT_FORMATS:
        raise StreamError(
            f"{output}: the output must end in .npy (one layer), .npz or .parquet (one or several layers)."
        )
    return extension


def pool_features(features: np.ndarray, pooling: Optional[str], layer: str) -> np.ndarray:
    """A layer's (batch, height, width, channels) output averaged ("avg") or maxed ("max")
    over height and width, or as it is (None). Shared by the command line and fastvgg.ray so
    that both give the same numbers."""
    if pooling is None:
        return features
    if features.ndim != 4:
        raise StreamError(f"pooling needs a spatial layer; {layer!r} gives shape {features.shape[1:]}.")
    return features.mean(axis=(1, 2)) if pooling == "avg" else features.max(axis=(1, 2))


def _write_json_atomically(path: str, content: dict) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(content, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _decode(path: str, size: Tuple[int, int]) -> np.ndarray:
    from .image import img_to_array, load_img

    return img_to_array(load_img(path, target_size=size))


def _npy_header(shape: Tuple[int, ...], length: int) -> bytes:
    """A version-1 .npy header for float32 C-order ``shape``, padded to exactly ``length``
    bytes (the length of the header written for the preallocated array, which had at least
    as many rows, so the shorter row count always fits)."""
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': %r, }" % (tuple(shape),)
    preamble = b"\x93NUMPY\x01\x00" + (length - 10).to_bytes(2, "little")
    body = text.encode("latin1")
    padding = length - len(preamble) - len(body) - 1
    if padding < 0:
        raise AssertionError("the shortened .npy header does not fit")  # cannot happen: fewer digits
    return preamble + body + b" " * padding + b"\n"


class _Run:
    """One extraction job: the file list, the memory-mapped arrays and the saved state."""

    def __init__(self, output: str, settings: dict, patterns: Sequence[str], restart: bool) -> None:
        self.output = output
        self.work = output + ".partial"
        self.state_path = os.path.join(self.work, "state.json")
        if restart and os.path.isdir(self.work):
            shutil.rmtree(self.work)
        if os.path.isdir(self.work):
            self.files, self.state = self._resume(settings)
            self.resumed = True
        else:
            self.files = list_inputs(patterns)
            if not self.files:
                raise StreamError("no input files: name image files, directories or glob patterns.")
            os.makedirs(self.work)
            with open(os.path.join(self.work, "files.txt"), "w") as f:
                f.writelines(path + "\n" for path in self.files)
            self.state = {"version": STATE_VERSION, "settings": settings, "done": 0, "rows": 0, "skipped": []}
            self.resumed = False
        shapes = settings["shapes"]
        mode = "r+" if self.resumed else "w+"
        self.arrays = [
            np.lib.format.open_memmap(
                self._layer_path(i), mode=mode, dtype=np.float32,
                shape=None if self.resumed else (len(self.files),) + tuple(shape),
            )
            for i, shape in enumerate(shapes)
        ]
        for array, shape in zip(self.arrays, shapes):
            if array.shape != (len(self.files),) + tuple(shape) or array.dtype != np.float32:
                raise StreamError(f"{self.work}: a partial array has an unexpected shape; pass --restart.")
        if not self.resumed:
            self.save()

    def _layer_path(self, i: int) -> str:
        return os.path.join(self.work, f"layer{i}.npy")

    def _resume(self, settings: dict):
        try:
            with open(self.state_path) as f:
                state = json.load(f)
            with open(os.path.join(self.work, "files.txt")) as f:
                files = [line[:-1] for line in f]
            usable = (
                state.get("version") == STATE_VERSION
                and isinstance(state.get("done"), int)
                and isinstance(state.get("rows"), int)
                and 0 <= state["rows"] <= state["done"] <= len(files)
            )
        except (OSError, ValueError, AttributeError):
            usable = False
        if not usable:
            raise StreamError(
                f"{self.work} holds an unreadable partial run; delete it or pass --restart to start again."
            )
        if state["settings"] != settings:
            changed = sorted(k for k in set(settings) | set(state["settings"])
                             if settings.get(k) != state["settings"].get(k))
            raise StreamError(
                f"{self.work} holds a partial run with other settings ({', '.join(changed)} differ); run the "
                "same command as before to resume it, or pass --restart to start again."
            )
        return files, state

    def save(self) -> None:
        for array in self.arrays:
            array.flush()  # rows on disk before the state that counts them
        _write_json_atomically(self.state_path, self.state)

    def finish(self, fmt: str, layers: Sequence[str], shapes) -> None:
        rows = self.state["rows"]
        skipped = self.state["skipped"]
        skipped_set = {path for path, _ in skipped}
        paths = [p for p in self.files[: self.state["done"]] if p not in skipped_set]
        if len(paths) != rows:
            raise StreamError(f"{self.work}: the partial run is inconsistent; pass --restart.")
        stem = os.path.splitext(self.output)[0]
        for array in self.arrays:
            array.flush()
        self.arrays = []  # close the maps before the files are cut or renamed
        if fmt == ".npy":
            layer_path = self._layer_path(0)
            with open(layer_path, "r+b") as f:
                header_length = _header_length(f)
                f.seek(0)
                f.write(_npy_header((rows,) + tuple(shapes[0]), header_length))
                f.truncate(header_length + rows * int(np.prod(shapes[0], dtype=np.int64)) * 4)
            os.replace(layer_path, self.output)
            _write_lines(stem + ".paths.txt", paths)
        elif fmt == ".npz":
            temporary = self.output + ".tmp"
            with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                for i, (layer, shape) in enumerate(zip(layers, shapes)):
                    full = np.load(self._layer_path(i), mmap_mode="r")
                    with archive.open(layer + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, full[:rows], allow_pickle=False)
                    del full
                with archive.open("paths.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.array(paths, dtype=str), allow_pickle=False)
            os.replace(temporary, self.output)
        else:
            _write_parquet(self.output, layers, shapes, [self._layer_path(i) for i in range(len(layers))], paths)
        if skipped:
            _write_lines(stem + ".skipped.txt", [f"{path}\t{reason}" for path, reason in skipped])
        shutil.rmtree(self.work)


def _header_length(f) -> int:
    """The total header length of the .npy file open in ``f`` (format versions 1 to 3)."""
    version = np.lib.format.read_magic(f)
    if version != (1, 0):  # open_memmap writes version 1 whenever the header fits, as ours do
        raise StreamError(f"{f.name}: unexpected .npy format version {version}; pass --restart.")
    return 10 + int.from_bytes(f.read(2), "little")


def _write_lines(path: str, lines: Sequence[str]) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(temporary, path)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as error:
        raise ImportError('Parquet output needs pyarrow: pip install pyarrow (or write .npy/.npz).') from error
    return pyarrow


_PARQUET_ROWS_PER_GROUP = 1024


def _write_parquet(output: str, layers, shapes, layer_paths, paths) -> None:
    pa = _pyarrow()
    import pyarrow.parquet as pq

    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    schema = pa.schema(
        [pa.field("path", pa.string())]
        + [pa.field(layer, pa.list_(pa.float32(), size)) for layer, size in zip(layers, sizes)],
        metadata={b"fastvgg.shapes": json.dumps({layer: list(shape) for layer, shape in zip(layers, shapes)}).encode()},
    )
    arrays = [np.load(p, mmap_mode="r") for p in layer_paths]
    temporary = output + ".tmp"
    with pq.ParquetWriter(temporary, schema) as writer:
        for start in range(0, len(paths), _PARQUET_ROWS_PER_GROUP):
            stop = min(start + _PARQUET_ROWS_PER_GROUP, len(paths))
            columns = [pa.array(paths[start:stop], pa.string())]
            for array, size in zip(arrays, sizes):
                flat = np.ascontiguousarray(array[start:stop]).reshape(-1)
                columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), size))
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    del arrays
    os.replace(temporary, output)


def extract_files(
    model,
    patterns: Sequence[str],
    layers: Sequence[str],
    output: str,
    *,
    size: Tuple[int, int],
    pooling: Optional[str] = None,
    batch_size: int = 32,
    workers: Optional[int] = None,
    settings: Optional[dict] = None,
    restart: bool = False,
    progress: bool = True,
    prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
) -> Dict[str, object]:
    """Runs ``model`` over the image files named by ``patterns`` and streams the outputs of
    ``layers`` (optionally pooled over height and width) to ``output``.

    ``model`` must have been built for ``size`` (height, width). ``settings`` (any JSON data,
    e.g. the model name and weights) is stored with the partial run, so that a resumed run is
    refused when they differ. Returns a summary: ``files``, ``rows``, ``skipped`` (list of
    (path, reason)), ``resumed_at`` (the number of files already done, or None), ``output``.
    """
    fmt = output_format(output)
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise StreamError("name at least one layer.")
    if fmt == ".npy" and len(layers) != 1:
        raise StreamError(f"{output}: a .npy file holds one layer; write several layers to .npz or .parquet.")
    if fmt == ".parquet":
        _pyarrow()
    if os.path.isdir(output):
        raise StreamError(f"{output} is a directory; name the output file.")
    if pooling not in (None, "avg", "max"):
        raise StreamError(f"pooling must be None, 'avg' or 'max', got {pooling!r}.")
    size = (int(size[0]), int(size[1]))
    # The shapes of one image's outputs, from a tiny run on a blank image; this also checks
    # the layer names (a wrong one raises here, before anything is written).
    probe = model.extract(np.zeros((1,) + size + (3,), np.float32), layers)
    shapes = [tuple(pool_features(probe[layer], pooling, layer).shape[1:]) for layer in layers]
    full_settings = {
        "layers": layers, "pooling": pooling, "size": list(size), "format": fmt,
        "shapes": [list(s) for s in shapes], "inputs": [os.fspath(p) for p in patterns],
        **(settings or {}),
    }
    full_settings = json.loads(json.dumps(full_settings))  # as it reads back from state.json
    run = _Run(output, full_settings, patterns, restart)
    total = len(run.files)
    resumed_at = run.state["done"] if run.resumed else None
    workers = workers or max(2, min(8, os.cpu_count() or 1))

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastvgg-decode")
    pending: List[Tuple[str, Future]] = []
    next_file = run.state["done"]

    def submit_until(limit: int) -> None:
        nonlocal next_file
        while next_file < min(limit, total):
            path = run.files[next_file]
            pending.append((path, pool.submit(_decode, path, size)))
            next_file += 1

    try:
        with progress_bar(total, unit="img", desc="features", enabled=progress) as bar:
            bar.update(run.state["done"])
            while run.state["done"] < total:
                submit_until(run.state["done"] + batch_size * (1 + prefetch_batches))
                batch_items = pending[:batch_size]
                del pending[:batch_size]
                images, good_paths = [], []
                for path, future in batch_items:
                    try:
                        images.append(future.result())
                        good_paths.append(path)
                    except Exception as error:  # noqa: BLE001 -- any decoding failure skips the file
                        run.state["skipped"].append([path, f"{type(error).__name__}: {error}"])
                if images:
                    from .imagenet import preprocess_input

                    x = preprocess_input(np.stack(images))
                    del images
                    results = model.extract(x, layers, batch_size=len(x))
                    row = run.state["rows"]
                    for array, layer in zip(run.arrays, layers):
                        array[row : row + len(x)] = pool_features(results[layer], pooling, layer)
                    run.state["rows"] = row + len(x)
                run.state["done"] += len(batch_items)
                run.save()
                bar.update(len(batch_items))
    finally:
        # Threads still decoding finish their current image; queued ones are dropped.
        pool.shutdown(wait=False, cancel_futures=True)

    skipped = [tuple(item) for item in run.state["skipped"]]
    if run.state["rows"] == 0:
        first = skipped[0][1] if skipped else "no files"
        shutil.rmtree(run.work)
        raise StreamError(f"none of the {total} file(s) could be read as an image (first error: {first}).")
    rows = run.state["rows"]
    run.finish(fmt, layers, shapes)
    return {"files": total, "rows": rows, "skipped": skipped, "resumed_at": resumed_at, "output": output,
            "shapes": dict(zip(layers, shapes))}
