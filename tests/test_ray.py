"""fastvgg.ray.Extractor in a real local Ray cluster (2 CPUs, started and stopped here).

The pipeline's features must equal a plain loop over the same decoded images with
``model.extract`` bit for bit (the model is deterministic whatever the batch and thread
count), and an actor killed in the middle of the job must cost no row and duplicate none
once Ray restarts it and retries its batch. Images are 32x32 and the model has random
weights saved as a Keras HDF5 file (what a fine-tuned file would be), so the Ray part stays
well under two minutes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastvgg
import helpers

PIL = pytest.importorskip("PIL.Image", reason="the Ray tests decode images with Pillow")
ray = pytest.importorskip("ray", reason='the Ray tests need Ray Data: pip install "fastvgg[ray]"')
pytest.importorskip("ray.data", reason='the Ray tests need Ray Data: pip install "fastvgg[ray]"')

import fastvgg.ray as fastvgg_ray  # noqa: E402

IMAGE_COUNT = 40
LAYERS = ["block3_conv3:preact", "block5_pool"]
RAY_VERSION = tuple(int(part) for part in ray.__version__.split(".")[:2] if part.isdigit())


def actor_pool(size: int) -> dict:
    """map_batches' argument for a fixed pool of `size` actors, as the README writes it: Ray 2.51
    deprecated `concurrency` for `compute=ActorPoolStrategy(size=...)`; older Ray takes `concurrency`."""
    if RAY_VERSION >= (2, 51):
        return {"compute": ray.data.ActorPoolStrategy(size=size)}
    return {"concurrency": size}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    return helpers.random_vgg16_notop_h5(tmp_path_factory.mktemp("weights"), seed=3)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_images")
    rng = np.random.default_rng(11)
    for i in range(IMAGE_COUNT):
        PIL.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


def read_images(image_dir):
    """The decoded images, read before the actors start: with 2 CPUs in the cluster, actors
    holding both would leave no CPU for the read tasks, and the pipeline would wait forever."""
    return ray.data.read_images(str(image_dir), mode="RGB", include_paths=True).materialize()


@pytest.fixture(autouse=True)
def time_limit():
    """A stuck pipeline fails the test after 100 s instead of hanging the suite."""
    with helpers.time_limit(100, "the Ray pipeline"):
        yield


def reference(weights_file, paths, pooling):
    """The plain loop: Pillow decode, preprocess_input, extract, pool in numpy."""
    model = fastvgg.VGG16(weights_file, include_top=False)
    x = np.stack([np.asarray(PIL.open(p).convert("RGB")) for p in paths])
    out = model.extract(fastvgg.preprocess_input(x), LAYERS, batch_size=5)
    if pooling == "avg":
        out = {k: v.mean(axis=(1, 2)) for k, v in out.items()}
    return out


def by_path(rows):
    paths = [os.path.basename(p) for p in rows["path"]]
    order = np.argsort(paths)
    return [paths[i] for i in order], {k: np.asarray(list(rows[k]))[order] for k in LAYERS}


def read_all(ds):
    batches = list(ds.iter_batches(batch_format="numpy", batch_size=None))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_two_actors_give_the_plain_loop_s_features_bit_for_bit(cluster, image_dir, weights_file):
    ds = read_images(image_dir)
    features = ds.map_batches(
        fastvgg_ray.Extractor,
        fn_constructor_kwargs=dict(weights=weights_file, layer=LAYERS, pooling="avg"),
        **actor_pool(2), num_cpus=1, batch_size=8, batch_format="numpy",
    )
    names, got = by_path(read_all(features))
    assert names == sorted(f"img{i:03d}.png" for i in range(IMAGE_COUNT))
    expected = reference(weights_file, [image_dir / n for n in names], "avg")
    for layer in LAYERS:
        assert got[layer].shape == expected[layer].shape
        np.testing.assert_array_equal(got[layer], expected[layer])


def test_a_killed_actor_loses_and_duplicates_no_row(cluster, image_dir, weights_file, tmp_path):
    marker = str(tmp_path / "killed-once")

    class DiesOnItsSecondBatch(fastvgg_ray.Extractor):
        """Kills its own process (as the OOM killer or a lost node would) in the middle of
        the job, once; the restarted actor finds the marker and carries on."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.batches = 0

        def __call__(self, batch):
            self.batches += 1
            if self.batches == 2 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            out = super().__call__(batch)
            out["threads"] = np.full(len(out["path"]), fastvgg.get_num_threads())
            return out

    ds = read_images(image_dir)
    features = ds.map_batches(
        DiesOnItsSecondBatch,
        fn_constructor_kwargs=dict(weights=weights_file, layer=LAYERS),
        **actor_pool(1), num_cpus=2, batch_size=8, batch_format="numpy",
        # Ray Data's defaults restart a dead actor and retry its batch (max_restarts=-1,
        # max_task_retries=-1); recent Ray deprecates passing them to map_batches.
    )
    rows = read_all(features)
    assert os.path.exists(marker), "the actor was never killed: the test did not test a retry"
    names, got = by_path(rows)
    assert names == sorted(f"img{i:03d}.png" for i in range(IMAGE_COUNT))  # each row once
    assert set(rows["threads"]) == {2}  # the threads follow the actor's num_cpus
    expected = reference(weights_file, [image_dir / n for n in names], None)
    for layer in LAYERS:
        np.testing.assert_array_equal(got[layer], expected[layer])


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps")
def test_two_actors_share_the_mapped_weights(cluster, weights_file, tmp_path):
    from fastvgg.packed_cache import SUFFIX

    # Defined here, not at module level: Ray ships closures by value, but module functions by
    # reference, and the workers cannot import this test module.
    def mapped_memory_kb(suffix):
        """(Rss, Pss) in kB of this process's mappings of files ending in ``suffix``."""
        rss = pss = 0
        current = False
        with open("/proc/self/smaps") as f:
            for line in f:
                fields = line.split()
                if fields and "-" in fields[0] and len(fields) >= 5:
                    current = len(fields) >= 6 and fields[-1].endswith(suffix)
                elif current and fields[0] in ("Rss:", "Pss:"):
                    if fields[0] == "Rss:":
                        rss += int(fields[1])
                    else:
                        pss += int(fields[1])
        return rss, pss

    cache = str(tmp_path / "packed")
    fastvgg.VGG16(weights_file, include_top=False, packed_cache=cache)  # builds the cache file

    @ray.remote(num_cpus=1)
    class Holder:
        def __init__(self):
            self.extractor = fastvgg_ray.Extractor(weights_file, layer="block5_pool", packed_cache=cache)

        def run(self):  # touches every weight page
            self.extractor({"image": np.zeros((1, 32, 32, 3), np.uint8)})
            return self.extractor.model._packed_cache_status

        def memory(self):
            return mapped_memory_kb(SUFFIX)

    holders = [Holder.remote() for _ in range(2)]
    assert ray.get([h.run.remote() for h in holders]) == ["hit", "hit"]
    for rss, pss in ray.get([h.memory.remote() for h in holders]):
        assert rss > 10_000  # the 14.7M conv weights' packed pages are mapped from the file
        assert pss < 0.6 * rss  # and counted half in each actor: shared
    for holder in holders:
        ray.kill(holder)


# The class outside Ray: errors are the ones predict gives, raised in the caller -----------
def test_mixed_image_sizes_in_one_batch_are_refused_clearly():
    extractor = fastvgg_ray.Extractor(None, layer="block1_pool", seed=0, num_threads=1)
    images = np.empty(2, dtype=object)
    images[0], images[1] = np.zeros((32, 32, 3), np.uint8), np.zeros((40, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"different sizes.*read_images\(\.\.\., size="):
        extractor({"image": images})
    with pytest.raises(ValueError, match="at least 32x32"):
        extractor({"image": np.zeros((2, 16, 16, 3), np.uint8)})
    with pytest.raises(ValueError, match="no column 'image'"):
        extractor({"img": np.zeros((2, 32, 32, 3), np.uint8)})
    with pytest.raises(TypeError, match='batch_format="numpy"'):
        extractor([np.zeros((32, 32, 3))])


def test_bad_arguments_fail_when_the_actor_starts():
    with pytest.raises(ValueError, match="No such layer: 'block9_pool'"):
        fastvgg_ray.Extractor(None, layer="block9_pool", seed=0)
    with pytest.raises(ValueError, match="`pooling`"):
        fastvgg_ray.Extractor(None, pooling="mean", seed=0)
    with pytest.raises(ValueError, match="`model`"):
        fastvgg_ray.Extractor(None, model="vgg11", seed=0)


def test_top_layers_build_the_top_and_other_columns_pass_through():
    extractor = fastvgg_ray.Extractor(None, layer=["fc2", "block5_pool"], seed=0, num_threads=2)
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    out = extractor({"image": x, "id": np.array([7, 9])})
    assert sorted(out) == ["block5_pool", "fc2", "id"]
    assert out["fc2"].shape == (2, 4096) and out["block5_pool"].shape == (2, 7, 7, 512)
    np.testing.assert_array_equal(out["id"], [7, 9])
    expected = fastvgg.VGG16(None, seed=0).extract(fastvgg.preprocess_input(x), ["fc2"])["fc2"]
    np.testing.assert_array_equal(out["fc2"], expected)


def test_a_fine_tuned_model_file_is_a_model(tmp_path):
    # model=<a whole Keras model file>: its own layers and weights, what load_model gives.
    keras = pytest.importorskip("keras", reason="the fine-tuned model is built by Keras")
    layers = keras.layers
    net = keras.Sequential([keras.Input((32, 32, 3)), layers.Rescaling(1 / 255.0, name="scale"),
                            layers.Conv2D(8, 3, padding="same", activation="relu", name="conv"),
                            layers.MaxPooling2D(name="pool"), layers.GlobalAveragePooling2D(name="gap"),
                            layers.Dense(3, activation="softmax", name="probs")])
    path = str(tmp_path / "tuned.keras")
    net.save(path)
    extractor = fastvgg_ray.Extractor(model=path, layer=["probs", "conv"], preprocess=False, num_threads=1,
                                      packed_cache=str(tmp_path / "cache"))
    x = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    out = extractor({"image": x})
    expected = fastvgg.load_model(path, packed_cache=False).extract(x.astype(np.float32), ["probs", "conv"])
    for name in ("probs", "conv"):
        np.testing.assert_array_equal(out[name], expected[name])
    np.testing.assert_allclose(out["probs"], net.predict(x.astype(np.float32), verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="holds its own weights"):
        fastvgg_ray.Extractor("imagenet_weights.h5", model=path)
    with pytest.raises(ValueError, match="`model`"):
        fastvgg_ray.Extractor(None, model=str(tmp_path / "missing.keras"), seed=0)
