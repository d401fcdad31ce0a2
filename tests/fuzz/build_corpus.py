"""Seed corpus for fuzz_loader.py: VGG weight files in every Keras layout, small enough to
fuzz (every dataset declared with its real shape but never written, so HDF5 allocates no
storage and a VGG16 file is tens of KB), the same inside .keras archives, their structure
descriptions (what the child process sends back), and, with --keras, files written by real
Keras 3 and tf-keras models (small, not VGG: they reach the loader's "this is another model"
paths).

    python tests/fuzz/build_corpus.py CORPUS_DIR [--keras]
"""

from __future__ import annotations

import io
import json
import os
import sys

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for weight_files and numpy_vgg

import numpy_vgg as nv  # noqa: E402
import weight_files as wf  # noqa: E402


def _declared_only(path: str) -> None:
    """Rewrites every dataset as shape and dtype only (no storage): tiny files, same metadata."""
    with h5py.File(path, "r+") as f:
        datasets = []
        f.visititems(lambda name, node: datasets.append(name) if isinstance(node, h5py.Dataset) else None)
        for name in datasets:
            shape, dtype = f[name].shape, f[name].dtype
            del f[name]
            f.create_dataset(name, shape=shape, dtype=dtype)
    with h5py.File(path, "r") as f:  # repack so the freed space does not stay in the file
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as g:
            for key in f.attrs:
                g.attrs[key] = f.attrs[key]
            for key in f:
                f.copy(f[key], g, name=key)
    with open(path, "wb") as out:
        out.write(buffer.getvalue())


def _small_weights(depth: int, include_top: bool):
    """Weights of the right shapes, all zeros (their values never reach the corpus)."""
    return {name: tuple(np.zeros(a.shape, np.float32) for a in arrays)
            for name, arrays in nv.random_weights(depth, include_top, seed=0).items()}


def build(directory: str, with_keras: bool = False) -> list:
    import keras_h5

    os.makedirs(directory, exist_ok=True)
    written = []

    def keep(name: str, data: bytes) -> None:
        path = os.path.join(directory, name)
        with open(path, "wb") as out:
            out.write(data)
        written.append(path)

    def h5_bytes(writer) -> bytes:
        scratch = os.path.join(directory, ".scratch.h5")
        writer(scratch)
        _declared_only(scratch)
        with open(scratch, "rb") as raw:
            data = raw.read()
        os.remove(scratch)
        return data

    weights16 = _small_weights(16, False)
    weights16_top = _small_weights(16, True)
    classic = h5_bytes(lambda p: keras_h5.write_classic_h5(p, weights16, nv.layer_names(16, False)))
    keep("classic_tf_keras.h5", classic)
    keep("classic_legacy2016.h5", h5_bytes(lambda p: keras_h5.write_classic_h5(
        p, weights16, nv.layer_names(16, False), naming="legacy2016")))
    keep("classic_top.h5", h5_bytes(lambda p: keras_h5.write_classic_h5(p, weights16_top, nv.layer_names(16, True))))
    keras3 = h5_bytes(lambda p: wf.write_keras3_weights(p, weights16, 16, False))
    keep("keras3.weights.h5", keras3)
    early = h5_bytes(lambda p: wf.write_keras3_weights(p, weights16, 16, False, name_attributes=False))
    keep("keras3_unnamed.weights.h5", early)
    head = {"dense": (np.zeros((512, 3), np.float32), np.zeros(3, np.float32))}
    nested = h5_bytes(lambda p: wf.write_keras3_weights(p, weights16, 16, False, head=head))
    keep("keras3_nested.weights.h5", nested)
    for name, data, config in (("keras3.keras", keras3, wf.keras3_config(16, False)),
                               ("keras3_unnamed.keras", early, wf.keras3_config(16, False)),
                               ("keras3_nested.keras", nested, wf.keras3_config(16, False, head=head))):
        buffer = io.BytesIO()
        wf.write_keras_archive(buffer, data, config)
        keep(name, buffer.getvalue())

    # What the child sends back for some of them: seeds for the "structure" target.
    from fastvgg import _hdf5_reader as reader

    for name in ("classic_tf_keras.h5", "keras3.weights.h5", "keras3_nested.weights.h5"):
        description = reader._describe(reader.HDF5Source(os.path.join(directory, name)))
        keep(name + ".json", json.dumps(description).encode())

    if with_keras:
        written += _real_keras_files(directory)
    return written


def _real_keras_files(directory: str) -> list:
    """Small models saved by Keras 3 (.keras, .weights.h5) and tf-keras (.h5)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="block1_conv1"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="predictions")])
    paths = [os.path.join(directory, "real_keras3.keras"), os.path.join(directory, "real_keras3.weights.h5")]
    model.save(paths[0])
    model.save_weights(paths[1])
    import tf_keras

    tf_model = tf_keras.Sequential([tf_keras.layers.Conv2D(4, 3, name="block1_conv1", input_shape=(8, 8, 3)),
                                    tf_keras.layers.Flatten(), tf_keras.layers.Dense(2, name="predictions")])
    paths.append(os.path.join(directory, "real_tf_keras.h5"))
    tf_model.save_weights(paths[-1])
    paths.append(os.path.join(directory, "real_tf_keras_model.h5"))
    tf_model.save(paths[-1])
    return paths


if __name__ == "__main__":
    files = build(sys.argv[1], with_keras="--keras" in sys.argv)
    print(f"{len(files)} seeds, {sum(os.path.getsize(f) for f in files)} bytes, in {sys.argv[1]}")
