"""The same input gives the same bits: run after run, with 1 or 2 threads, alone or in a batch.

No kernel splits one output's sum between threads: convolutions (direct and Winograd) divide
the work by output rows, tiles and channel blocks, and the dense layers by column panels, each
summing its whole reduction in a fixed order that depends neither on the thread count nor on
the other images of the batch. So nothing here is compared with a tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastvgg
from bf16_checks import AMX_UNAVAILABLE, BF16_UNAVAILABLE
from helpers import noise_images

# bf16 runs this CPU's bf16 set (the AMX one where it has AMX), skipped without AVX512_BF16.
PRECISIONS = ["fast", "highest", pytest.param("bf16", marks=pytest.mark.skipif(
    bool(BF16_UNAVAILABLE), reason=f"bf16 kernels skipped: {BF16_UNAVAILABLE}")),
              pytest.param("bf16x3", marks=pytest.mark.skipif(
                  bool(AMX_UNAVAILABLE), reason=f"bf16x3 skipped: {AMX_UNAVAILABLE}"))]


@pytest.fixture(scope="module", params=PRECISIONS)
def model(request):
    # The top over a 64x64 input: convolutions, pools, flatten and all three dense layers
    # (fc1 sees a 2x2x512 grid).
    return fastvgg.VGG16(None, input_shape=(64, 64, 3), classes=10, classifier_activation=None, seed=2,
                         precision=request.param)


@pytest.fixture
def restore_threads():
    original = fastvgg.get_num_threads()
    yield
    fastvgg.set_num_threads(original)


@pytest.mark.parametrize("batch", [1, 3])
def test_same_bits_run_after_run_and_for_any_thread_count(model, restore_threads, batch):
    x = noise_images(batch, (64, 64), seed=batch)
    results = {}
    for threads in (1, 2, 1, 2):
        fastvgg.set_num_threads(threads)
        results.setdefault(threads, []).append(model.predict(x))
        # Another size in between: reused scratch must not carry anything over.
        model.predict(noise_images(2, (64, 64), seed=99), batch_size=1)
    reference = results[1][0]
    assert reference.shape == (batch, 10) and np.isfinite(reference).all()
    assert len({r.tobytes() for runs in results.values() for r in runs}) == 1, (
        "outputs differ between runs or thread counts; largest difference "
        f"{max(float(np.abs(r - reference).max()) for runs in results.values() for r in runs):.3g}"
    )


def test_an_image_gives_the_same_bits_alone_and_in_a_batch(model, restore_threads):
    x = noise_images(3, (64, 64), seed=7)
    for threads in (1, 2):
        fastvgg.set_num_threads(threads)
        together = model.predict(x)
        for i in range(3):
            assert np.array_equal(model.predict(x[i : i + 1]), together[i : i + 1]), (threads, i)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_features_without_the_top_for_any_thread_count(restore_threads, precision):
    # A size whose tiles, rows and channel groups split unevenly between 1, 2 and 3 threads.
    model = fastvgg.VGG16(None, include_top=False, pooling="avg", seed=4, precision=precision)
    x = noise_images(3, (61, 83), seed=8)
    outputs = []
    for threads in (1, 2, 3):
        fastvgg.set_num_threads(threads)
        outputs.append(model.predict(x))
    assert all(np.array_equal(out, outputs[0]) for out in outputs[1:])


def test_a_batch_longer_than_one_chunk_gives_each_image_its_own_bits():
    # At 224x224 the executor runs block3 onwards layer by layer over chunks of 9 images
    # (csrc/cpu_executor.cpp, kChunkBytes: about 32 MB of one layer's activations): 11 images
    # make a full chunk and a short one, and every output must land at its own image's index,
    # also one asked for inside the chunked layers (block3_conv2, before its ReLU).
    model = fastvgg.VGG16(None, include_top=False, seed=5)
    x = noise_images(11, (224, 224), seed=11)
    names = ["block3_conv2:preact", "block4_conv1", "block5_pool"]
    together = model.extract(x, names, batch_size=11)
    for i in (0, 8, 9, 10):
        alone = model.extract(x[i : i + 1], names)
        for name in names:
            assert np.array_equal(alone[name], together[name][i : i + 1]), (name, i)
