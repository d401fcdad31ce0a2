"""precision="bf16": each bf16 kernel set this CPU runs drives a whole He-scaled VGG16 through
the real executor, against the same graph at precision "fast" (fp32): the AVX512_BF16 set (int14
Winograd from 16 input channels on, bf16 direct for the first layer, bf16 dense) and, with AMX,
the AMX set (every convolution bf16 direct on AMX tiles, bf16 dense). FASTVGG_BF16_KERNELS picks
the set an executor gets; without it the first of _core.testing.bf16_kernel_sets() runs."""

import numpy as np
import pytest

from bf16_checks import requires_bf16
from fastvgg import _core

# Each set's methods for the first two convolutions (3 and 64 input channels).
SET_METHODS = {"avx512_bf16": ("direct_bf16", "winograd_f4x4_int14"), "amx_bf16": ("direct_bf16_amx", "direct_bf16_amx")}
SETS = _core.testing.bf16_kernel_sets()
from test_bf16_accuracy import he_vgg16, pink_noise_images

pytestmark = requires_bf16
SIZE = 64  # small images keep the test quick; fc1 then has 2 x 2 x 512 inputs


def build(precision, convs, dense):
    graph = _core.Graph(3)
    conv_layers = []
    for block in convs:
        for kernel, _ in block:
            conv_layers.append(graph.add_conv3x3(kernel.shape[3], "relu"))
        pool = graph.add_max_pool2x2()
    graph.add_flatten()
    dense_layers = [graph.add_dense(k.shape[0], k.shape[1], "relu" if i < 2 else "softmax") for i, (k, _) in enumerate(dense)]
    executor = _core.CpuExecutor(graph, precision)
    for index, (kernel, bias) in zip(conv_layers, [layer for block in convs for layer in block]):
        executor.set_conv3x3_weights(index, kernel, bias)
    for index, (kernel, bias) in zip(dense_layers, dense):
        executor.set_dense_kernel_rows(index, 0, kernel)
        executor.set_dense_bias(index, bias)
    return executor, pool, dense_layers[-1]


def test_the_default_set_is_the_first_one_listed(monkeypatch):
    monkeypatch.delenv("FASTVGG_BF16_KERNELS", raising=False)
    assert set(SETS) <= set(SET_METHODS) and SETS
    assert _core.CpuExecutor(_core.Graph(3), "bf16").kernel_set == SETS[0]
    if "amx_bf16" not in SETS:
        print(f"\nAMX set not tested here: {_core.testing.amx_unavailable_reason()}")


def test_a_set_that_cannot_run_here_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("FASTVGG_BF16_KERNELS", "bf8_tiles")
    with pytest.raises(RuntimeError, match="FASTVGG_BF16_KERNELS='bf8_tiles'"):
        _core.CpuExecutor(_core.Graph(3), "bf16")


@pytest.mark.parametrize("kernel_set", SETS)
def test_bf16_executor_matches_fp32_within_the_contract(kernel_set, monkeypatch):
    monkeypatch.setenv("FASTVGG_BF16_KERNELS", kernel_set)
    rng = np.random.default_rng(64)
    convs, dense = he_vgg16(rng)
    # fc1 for 64x64 inputs: 2 x 2 x 512 rows instead of 7 x 7 x 512.
    dense[0] = (dense[0][0][: 2 * 2 * 512] * np.float32(np.sqrt(49 / 4)), dense[0][1])
    x = pink_noise_images(rng, 3, SIZE)
    results = {}
    for precision in ("fast", "bf16"):
        executor, pool, last = build(precision, convs, dense)
        results[precision] = executor.forward(x, [pool, last])
        results[precision + " set"] = executor.kernel_set
    assert results["bf16 set"] == kernel_set
    (features, probs), (bf16_features, bf16_probs) = results["fast"], results["bf16"]
    errors = [np.linalg.norm(bf16_features[i] - features[i]) / np.linalg.norm(features[i]) for i in range(len(x))]
    print(f"\nexecutor bf16 ({kernel_set}) vs fast: block5_pool relative L2 {', '.join(f'{e:.2e}' for e in errors)}")
    assert 1e-5 < max(errors) < 1e-2
    top5 = lambda p: np.argsort(-p, axis=1)[:, :5]
    assert np.array_equal(top5(probs)[:, 0], top5(bf16_probs)[:, 0])
    assert all(len(set(a) & set(b)) >= 4 for a, b in zip(top5(probs), top5(bf16_probs)))


def test_unknown_precision_still_names_the_choices():
    with pytest.raises(ValueError, match="fast"):
        _core.CpuExecutor(_core.Graph(3), "fp8")


@pytest.mark.parametrize("kernel_set", SETS)
def test_bf16_model_reports_its_precision_and_returns_the_rounded_weights(kernel_set, monkeypatch):
    import fastvgg

    monkeypatch.setenv("FASTVGG_BF16_KERNELS", kernel_set)
    model = fastvgg.VGG16(None, include_top=False, input_shape=(32, 32, 3), seed=0, precision="bf16")
    assert model._executor.precision == "bf16"
    assert (model._executor.method(0), model._executor.method(1)) == SET_METHODS[kernel_set]
    loaded = fastvgg.VGG16(None, include_top=False, input_shape=(32, 32, 3), seed=0).layers[1].get_weights()[0]
    rounded = model.layers[1].get_weights()[0]
    # bf16 keeps 8 significant bits: each weight within half a step (2**-8 relative) of the loaded one.
    assert np.all(np.abs(rounded - loaded) <= np.abs(loaded) * 2.0**-8)
    assert not np.array_equal(rounded, loaded)
