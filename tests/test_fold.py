"""An affine map (BatchNormalization) folded into the convolution before it.

The executor runs Conv2D (no activation) -> affine as one convolution with kernel * scale and
bias * scale + shift, fuses a ReLU that follows into the convolution's kernel when nobody asks
for the outputs in between, and gives the convolution's own output back as
(y - shift) / scale. Each output is checked against float64 with a bound derived from the
arithmetic:

- the folded weights w' = fl(w * s) and b' = fl(fl(b * s) + t) differ from the exact
  s * w and s * b + t by at most u |s w| and gamma_2 (|s b| + |t|);
- the convolution of w' and b' has the method's own bound (gamma_{K+1} on absolute values for
  the direct one, kernel_checks.winograd_error_bound for Winograd), taken on |w'| and |b'|;
- the unfolded output (y - t) / s adds gamma_2 (|y| + |t|) / |s| to the error of y / s.
"""

import numpy as np
import pytest

from fastvgg import _core

from bf16_checks import requires_bf16
from helpers import aligned_copy
from kernel_checks import UNIT_ROUNDOFF, conv3x3_float64, gamma, winograd_error_bound

FILTERS = 24


def build(kind, in_channels, split=False, conv_activation="linear"):
    """conv -> affine -> relu; `split` puts a linear activation between conv and affine, which
    keeps them apart (the unfolded twin)."""
    graph = _core.Graph(in_channels)
    if kind == "same":
        conv = graph.add_conv3x3(FILTERS, conv_activation)
    else:
        conv = graph.add_conv(1 if kind == "1x1" else 3, FILTERS, "valid", conv_activation)
    if split:
        graph.add_activation("linear")
    affine = graph.add_affine(FILTERS)
    relu = graph.add_activation("relu")
    return graph, conv, affine, relu


def weights(kind, in_channels, seed=0):
    rng = np.random.default_rng(seed)
    size = 1 if kind == "1x1" else 3
    kernel = (rng.standard_normal((size, size, in_channels, FILTERS)) / np.sqrt(size * size * in_channels)).astype(np.float32)
    bias = rng.standard_normal(FILTERS).astype(np.float32)
    # Scales of both signs and a wide range, as trained BatchNormalizations have.
    scale = (rng.choice([-1.0, 1.0], FILTERS) * rng.uniform(0.05, 8.0, FILTERS)).astype(np.float32)
    shift = (3 * rng.standard_normal(FILTERS)).astype(np.float32)
    return kernel, bias, scale, shift


def loaded(graph, conv, affine, kernel, bias, scale, shift, precision="fast"):
    executor = _core.CpuExecutor(graph, precision)
    with executor.updating():
        executor.set_conv_weights(conv, kernel, bias)
        executor.set_affine(affine, scale, shift)
    return executor


def conv_float64(kind, x, kernel, bias):
    """The layer in float64: 'same' 3x3, 'valid' 3x3 (the interior of 'same'), or 1x1."""
    if kind == "1x1":
        return x.astype(np.float64) @ kernel[0, 0].astype(np.float64) + bias.astype(np.float64)
    same = conv3x3_float64(x, kernel, bias)
    return same if kind == "same" else same[:, 1:-1, 1:-1, :]


def conv_bound(kind, method, x, kernel, bias):
    """The convolution's rounding bound for that method, elementwise (module docstring)."""
    if method.startswith("winograd"):
        bound = winograd_error_bound(x, kernel, bias)
        return bound if kind == "same" else bound[:, 1:-1, 1:-1, :]
    depth = kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
    return gamma(depth + 1) * conv_float64(kind, np.abs(x), np.abs(kernel), np.abs(bias))


def expected_and_bounds(kind, method, x, kernel, bias, scale, shift):
    s, t = scale.astype(np.float64), shift.astype(np.float64)
    folded_kernel = (kernel * scale).astype(np.float32)  # what the executor packs
    folded_bias = (bias * scale + shift).astype(np.float32)
    conv = conv_float64(kind, x, kernel, bias)
    affine = conv * s + t
    magnitude = conv_float64(kind, np.abs(x), np.abs(kernel), np.zeros_like(bias)) * np.abs(s)
    affine_bound = (
        conv_bound(kind, method, x, folded_kernel, folded_bias)
        + UNIT_ROUNDOFF * magnitude
        + gamma(2) * (np.abs(bias * s) + np.abs(t))
    )
    conv_bound_ = affine_bound / np.abs(s) + gamma(2) * (np.abs(affine) + affine_bound + np.abs(t)) / np.abs(s)
    return conv, affine, affine_bound, conv_bound_


def assert_within(actual, exact, bound, what):
    error = np.abs(actual.astype(np.float64) - exact)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert np.all(error <= bound), f"{what}: error {error[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


# (kind, input channels): Winograd 'same' (>= 16 input channels under precision="fast"), the
# direct 'same' kernel (3 input channels), 'valid' 3x3 (a cropped 'same' run), 1x1 (pointwise).
CASES = [("same", 24), ("same", 3), ("valid", 19), ("1x1", 40)]


@pytest.mark.parametrize("precision", ["fast", "highest"])
@pytest.mark.parametrize("kind, in_channels", CASES)
def test_folded_outputs_are_within_the_bound(kind, in_channels, precision):
    kernel, bias, scale, shift = weights(kind, in_channels)
    graph, conv, affine, relu = build(kind, in_channels)
    executor = loaded(graph, conv, affine, kernel, bias, scale, shift, precision)
    assert executor.method(affine) == "folded"
    method = executor.method(conv)
    x = np.random.default_rng(1).standard_normal((2, 9, 13, in_channels)).astype(np.float32)
    conv64, affine64, affine_bound, conv_bound_ = expected_and_bounds(kind, method, x, kernel, bias, scale, shift)

    # The ReLU fused into the convolution (nothing in between asked for).
    (fused,) = executor.forward(x, [relu])
    assert_within(fused, np.maximum(affine64, 0), affine_bound, f"{kind} fused relu")
    # Every output asked for: the ReLU runs as its own pass, the convolution's output unfolded.
    got_conv, got_affine, got_relu = executor.forward(x, [conv, affine, relu])
    assert_within(got_affine, affine64, affine_bound, f"{kind} affine")
    assert_within(got_relu, np.maximum(affine64, 0), affine_bound, f"{kind} relu")
    assert_within(got_conv, conv64, conv_bound_, f"{kind} conv")
    (preact,) = executor.forward(x, [conv], [True])
    np.testing.assert_array_equal(preact, got_conv)
    # The fused and unfused ReLU see the same sums.
    np.testing.assert_array_equal(fused, got_relu)

    # get_weights gives the loaded weights back bit for bit.
    got_kernel, got_bias = executor.get_weights(conv)
    np.testing.assert_array_equal(got_kernel, kernel)
    np.testing.assert_array_equal(got_bias, bias)
    got_scale, got_shift = executor.get_weights(affine)
    np.testing.assert_array_equal(got_scale, scale)
    np.testing.assert_array_equal(got_shift, shift)


@pytest.mark.parametrize("kind, in_channels", CASES)
def test_the_unfolded_twin_agrees(kind, in_channels):
    # The same layers kept apart by a linear activation run the affine map as its own pass.
    kernel, bias, scale, shift = weights(kind, in_channels, seed=2)
    x = np.random.default_rng(3).standard_normal((1, 8, 11, in_channels)).astype(np.float32)
    outputs = []
    for split in (False, True):
        graph, conv, affine, relu = build(kind, in_channels, split)
        executor = loaded(graph, conv, affine, kernel, bias, scale, shift)
        assert (executor.method(affine) == "folded") == (not split)
        outputs.append(executor.forward(x, [relu])[0])
    _, affine64, affine_bound, _ = expected_and_bounds(kind, executor.method(conv), x, kernel, bias, scale, shift)
    for got, what in zip(outputs, ("folded", "apart")):
        assert_within(got, np.maximum(affine64, 0), affine_bound, what)


@pytest.mark.parametrize("bad", ["zero", "inf", "nan_shift"])
def test_a_scale_that_cannot_fold_is_applied_as_a_pass(bad):
    kernel, bias, scale, shift = weights("same", 24)
    if bad == "zero":
        scale[5] = 0.0
    elif bad == "inf":
        scale[5] = np.inf
    else:
        shift[5] = np.nan
    graph, conv, affine, relu = build("same", 24)
    executor = loaded(graph, conv, affine, kernel, bias, scale, shift)
    assert executor.method(affine) == "affine_f32"
    x = np.random.default_rng(1).standard_normal((1, 6, 7, 24)).astype(np.float32)
    got_conv, got_relu = executor.forward(x, [conv, relu])
    assert_within(got_conv, conv3x3_float64(x, kernel, bias), winograd_error_bound(x, kernel, bias), "conv")
    with np.errstate(invalid="ignore"):
        expected = np.maximum(conv3x3_float64(x, kernel, bias) * scale.astype(np.float64) + shift, 0)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(got_relu), finite)
    other = np.arange(FILTERS) != 5
    np.testing.assert_allclose(got_relu[..., other], expected[..., other], rtol=1e-4, atol=1e-4)


def test_a_convolution_with_an_activation_is_not_folded():
    kernel, bias, scale, shift = weights("same", 24)
    graph, conv, affine, relu = build("same", 24, conv_activation="relu")
    executor = loaded(graph, conv, affine, kernel, bias, scale, shift)
    assert executor.method(affine) == "affine_f32"


@requires_bf16
def test_bf16_keeps_the_affine_map_apart():
    kernel, bias, scale, shift = weights("same", 24)
    graph, conv, affine, relu = build("same", 24)
    executor = loaded(graph, conv, affine, kernel, bias, scale, shift, "bf16")
    assert executor.method(affine) == "affine_f32"


def test_new_weights_refold_in_any_order():
    kernel, bias, scale, shift = weights("same", 24, seed=4)
    kernel2, bias2, scale2, shift2 = weights("same", 24, seed=5)
    graph, conv, affine, relu = build("same", 24)
    x = np.random.default_rng(6).standard_normal((1, 8, 8, 24)).astype(np.float32)
    executor = _core.CpuExecutor(graph, "fast")
    # Affine first, then the convolution, each outside an update: folds as soon as both are there.
    executor.set_affine(affine, scale, shift)
    assert executor.method(affine) == "affine_f32"
    executor.set_conv_weights(conv, kernel, bias)
    assert executor.method(affine) == "folded"
    for k, b, s, t in [(kernel, bias, scale2, shift2), (kernel2, bias2, scale2, shift2)]:
        if s is scale2 and k is kernel:
            executor.set_affine(affine, s, t)
        else:
            executor.set_conv_weights(conv, k, b)
        assert executor.method(affine) == "folded"
        got_kernel, got_bias = executor.get_weights(conv)
        np.testing.assert_array_equal(got_kernel, k)
        np.testing.assert_array_equal(got_bias, b)
        got_conv, got_affine = executor.forward(x, [conv, affine])
        conv64, affine64, affine_bound, conv_bound_ = expected_and_bounds("same", "winograd", x, k, b, s, t)
        assert_within(got_affine, affine64, affine_bound, "affine after new weights")
        assert_within(got_conv, conv64, conv_bound_, "conv after new weights")


def test_packed_sections_carry_the_fold():
    kernel, bias, scale, shift = weights("same", 24, seed=7)
    graph, conv, affine, relu = build("same", 24)
    source = loaded(graph, conv, affine, kernel, bias, scale, shift)
    sections = [(name, aligned_copy(view)) for name, view in source.packed_sections()]
    names = [name for name, _ in sections]
    assert f"op{conv}.fold.scale" in names and f"op{conv}.fold.loaded_bias" in names
    target = _core.CpuExecutor(build("same", 24)[0], "fast")
    with target.updating():
        for name, data in sections:
            target.adopt_section(name, data)
    assert target.method(affine) == "folded"
    assert [name for name, _ in target.packed_sections()] == names
    x = np.random.default_rng(8).standard_normal((2, 7, 9, 24)).astype(np.float32)
    for requested in ([relu], [conv, affine, relu]):
        for a, b in zip(source.forward(x, requested), target.forward(x, requested)):
            np.testing.assert_array_equal(a, b)
    got_kernel, got_bias = target.get_weights(conv)
    np.testing.assert_array_equal(got_kernel, kernel)
    np.testing.assert_array_equal(got_bias, bias)
    # Another affine map would disagree with what the convolution folded.
    other_shift = aligned_copy((shift + 1).view(np.uint8))
    with pytest.raises(ValueError, match="disagrees with the affine map"):
        target.adopt_section(f"op{affine}.bias", other_shift)


def test_a_fold_section_for_a_layer_that_cannot_fold_is_refused():
    kernel, bias, scale, shift = weights("same", 24)
    graph, conv, affine, relu = build("same", 24, split=True)
    executor = _core.CpuExecutor(graph, "fast")
    with pytest.raises(ValueError, match="unknown packed section"):
        executor.adopt_section(f"op{conv}.fold.scale", scale.view(np.uint8))
    graph, conv, affine, relu = build("same", 24)
    executor = _core.CpuExecutor(graph, "fast")
    scale[0] = 0.0
    with pytest.raises(ValueError, match="cannot have been folded"):
        executor.adopt_section(f"op{conv}.fold.scale", scale.view(np.uint8))


def test_batched_layers_fold_too():
    # 512 -> 512 channels: Winograd weights large enough to run batched (one call for the batch).
    rng = np.random.default_rng(9)
    graph = _core.Graph(512)
    conv = graph.add_conv3x3(512, "linear")
    affine = graph.add_affine(512)
    relu = graph.add_activation("relu")
    kernel = (rng.standard_normal((3, 3, 512, 512)) / 68).astype(np.float32)
    bias = rng.standard_normal(512).astype(np.float32)
    scale = rng.uniform(0.2, 3, 512).astype(np.float32)
    shift = rng.standard_normal(512).astype(np.float32)
    executor = loaded(graph, conv, affine, kernel, bias, scale, shift)
    assert executor.method(affine) == "folded"
    x = rng.standard_normal((3, 4, 5, 512)).astype(np.float32)
    batch = executor.forward(x, [conv, relu])
    fused_batch = executor.forward(x, [relu])[0]
    for n in range(3):
        single = executor.forward(x[n : n + 1], [conv, relu])
        np.testing.assert_array_equal(fused_batch[n], single[1][0])
        for got, want in zip(batch, single):
            np.testing.assert_array_equal(got[n], want[0])
    conv64, affine64, affine_bound, conv_bound_ = expected_and_bounds("same", "winograd", x, kernel, bias, scale, shift)
    assert_within(batch[1], np.maximum(affine64, 0), affine_bound, "batched relu")
    assert_within(batch[0], conv64, conv_bound_, "batched conv")
