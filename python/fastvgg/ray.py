"""VGG features in a Ray Data pipeline: a callable class for ``Dataset.map_batches``.

    import ray, fastvgg.ray
    ds = ray.data.read_images("s3://bucket/images/", size=(224, 224), mode="RGB", include_paths=True)
    feats = ds.map_batches(fastvgg.ray.Extractor, fn_constructor_kwargs=dict(
                weights="imagenet", layer="block5_pool", pooling="avg"),
            concurrency=4, num_cpus=2, batch_size=64, batch_format="numpy")
    feats.write_parquet("s3://bucket/features/")

On Ray 2.51 and later, ``compute=ray.data.ActorPoolStrategy(size=4)`` replaces the deprecated
``concurrency=4`` (same pool, no deprecation warning).

Install with ``pip install "fastvgg[ray]"``. Each actor builds the model once; its threads
follow the CPUs Ray assigned to the actor (``num_cpus`` above), so actors on one node do not
oversubscribe it. The output batch has one column per layer, named after the layer (e.g.
``block5_pool``, ``block5_conv3:preact``), plus every input column except the images (e.g.
``path``), so rows can be matched to their files.

The class does not need Ray to run: ``Extractor(...)(batch)`` works on any dict of numpy
arrays, which is what Ray passes with ``batch_format="numpy"``. It keeps no state between
batches, so when Ray restarts a dead actor and retries its batch, the retried batch gives
the same rows as the first attempt would have.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Union

import numpy as np

from .models import TOP_LAYERS, VGG16, VGG19
from .stream import pool_features

__all__ = ["Extractor"]

ARCHITECTURES = {"vgg16": VGG16, "vgg19": VGG19}


def _threads_from_ray() -> Optional[int]:
    """The whole CPUs Ray assigned to this actor or task, or None outside a Ray worker."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 -- not in a worker (the driver asserts), or no Ray at all
        return None
    if not cpus:
        return None
    return max(1, int(cpus))


class Extractor:
    """Computes VGG features for batches of images; made for ``Dataset.map_batches``.

    Args:
        weights: "imagenet", None (random weights, seeded by ``seed``) or the path of a Keras
            weights file, also a fine-tuned model's ``.keras``/``.h5`` (its VGG part is used).
        model: "vgg16", "vgg19", or the path of a whole fine-tuned Keras model (``.keras`` or
            ``.h5``, what ``fastvgg.load_model`` reads), whose own layers and weights are
            used; ``weights`` and ``seed`` must then be left out.
        layer: one layer name or a list of them; ``"block5_conv3:preact"`` gives a
            convolution's output before the ReLU. ``fc1``, ``fc2``, ``predictions`` and
            ``flatten`` need the top (224x224 images); every other layer takes any image of
            at least 32x32.
        pooling: None, "avg" or "max" over height and width, for every (spatial) layer.
        preprocess: True applies ``fastvgg.preprocess_input`` (RGB 0..255 in, as
            ``read_images`` gives); False passes the images to the model as they are; None
            (the default): True, except for a model file that preprocesses its input itself
            (Rescaling or Normalization first, or preprocess_input inside it).
        image_column: the batch's column of images (``read_images`` calls it "image").
        precision: "fast", "highest", "bf16" or "bf16x3", as for ``fastvgg.VGG16``.
        num_threads: the model's threads; default: the CPUs Ray assigned to the actor, or
            fastvgg's default outside Ray.
        seed: the seed of random weights (``weights=None``), for tests and benchmarks.
        packed_cache: where the packed weights are cached (see ``fastvgg.VGG16``): None
            (the default location, or ``$FASTVGG_PACKED_CACHE``), a directory, or False. With
            it, every actor after the first maps the packed file instead of unpacking the
            weights, and actors on one node share those pages.
    """

    def __init__(
        self,
        weights: Union[None, str, "os.PathLike[str]"] = "imagenet",
        *,
        model: str = "vgg16",
        layer: Union[str, Sequence[str]] = "block5_pool",
        pooling: Optional[str] = None,
        preprocess: Optional[bool] = None,
        image_column: str = "image",
        precision: str = "fast",
        num_threads: Optional[int] = None,
        seed: Optional[int] = None,
        packed_cache=None,
    ) -> None:
        model_file = None
        if not (isinstance(model, str) and model in ARCHITECTURES):
            from .tf_saved_model import is_saved_model

            if not isinstance(model, (str, os.PathLike)) or not (os.path.isfile(model) or is_saved_model(os.fspath(model))):
                raise ValueError(f"`model` must be 'vgg16', 'vgg19' or the path of a Keras model file (or tf.keras "
                                 f"SavedModel directory), got {model!r}.")
            if weights != "imagenet" or seed is not None:
                raise ValueError("A model file holds its own weights: leave out `weights` and `seed` with model=<file>.")
            model_file = os.fspath(model)
        layers = [layer] if isinstance(layer, str) else list(layer)
        if not layers or not all(isinstance(name, str) for name in layers):
            raise ValueError(f"`layer` must be a layer name or a list of them, got {layer!r}.")
        if pooling not in (None, "avg", "max"):
            raise ValueError(f"`pooling` must be None, 'avg' or 'max', got {pooling!r}.")
        self.layers = list(dict.fromkeys(layers))
        self.pooling = pooling
        self.image_column = image_column
        threads = num_threads if num_threads is not None else _threads_from_ray()
        if threads is not None:
            import fastvgg

            fastvgg.set_num_threads(int(threads))
        if model_file is not None:
            from .saved_model import load_model

            self.model = load_model(model_file, precision=precision, packed_cache=packed_cache)
        else:
            include_top = any(name.split(":")[0] in TOP_LAYERS for name in self.layers)
            self.model = ARCHITECTURES[model](weights, include_top=include_top, precision=precision, seed=seed,
                                              packed_cache=packed_cache)
        if preprocess is None:
            from .saved_model import preprocesses_its_input

            preprocess = not (model_file is not None and preprocesses_its_input(self.model))
        self.preprocess = bool(preprocess)
        # A wrong layer name fails here, when the actor starts, not at the first batch.
        for name in self.layers:
            self.model._named_output(name)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if not isinstance(batch, dict):
            raise TypeError(
                f"fastvgg.ray.Extractor takes numpy batches (dicts of arrays), got {type(batch).__name__}: "
                'pass batch_format="numpy" to map_batches.'
            )
        if self.image_column not in batch:
            raise ValueError(
                f"The batch has no column {self.image_column!r} (it has {sorted(batch)}); pass "
                "image_column=... to name the column that holds the images."
            )
        images = _image_batch(batch[self.image_column], self.image_column)
        if self.preprocess:
            from .imagenet import preprocess_input

            images = preprocess_input(images)
        results = self.model.extract(images, self.layers, batch_size=max(1, len(images)))
        out = {name: value for name, value in batch.items() if name != self.image_column}
        for name in self.layers:
            out[name] = pool_features(results[name], self.pooling, name)
        return out


def _image_batch(column, column_name: str) -> np.ndarray:
    """The images of a batch as one (batch, height, width, channels) array. Ray gives images
    of different sizes as an object array of arrays; those cannot form one batch."""
    column = np.asarray(column) if not isinstance(column, np.ndarray) else column
    if column.dtype != object:
        return column
    shapes = sorted({np.shape(image) for image in column})
    if len(shapes) > 1:
        raise ValueError(
            f"The images of column {column_name!r} in one batch have different sizes ({', '.join(map(str, shapes[:4]))}"
            f"{', ...' if len(shapes) > 4 else ''}); every image of a batch must have the same size. Resize them "
            "when reading, e.g. ray.data.read_images(..., size=(224, 224)), or in a map step before this one."
        )
    return np.stack(list(column))
