"""precision="bf16x3" (CPUs with AMX-BF16): 3x3 convolutions on AMX tiles with "bf16x3" products.

Activations and weights are each carried as two bf16 values, hi = bf16(v) and lo = bf16(v - hi),
and each multiply-add becomes three exact products, hi*hi + lo*hi + hi*lo (lo*lo is left out).
Each value is then carried to within 2^-16 of itself (lo's rounding), and the dropped product is
under 2^-16 of the whole, so every term is within 3 * 2^-16 of x * w (16 significant bits where
float32 keeps 24: about 4x the error of "fast"'s Winograd F(4x4, 3x3) on VGG16). The kernel is held to its plain twin
(conv3x3_bf16x3_reference, the same three products in double) by the float32 summation bound
for three times the terms, and to the unrounded float64 convolution by that plus 3 * 2^-16 of
the magnitude; it must also lie over ten times closer to its twin than to the AMX bf16 kernel's
(weights rounded once), so the weights' lo parts really take part.

NaN, infinity and the border columns: tests/test_bf16_kernels.py, for both AMX kernels.
Skipped, with the reason printed, where the CPU or Linux offers no AMX-BF16.
"""

import numpy as np
import pytest

import fastvgg
from bf16_checks import AMX_AWKWARD_SHAPES, bf16_round, requires_amx
from fastvgg import _core
from kernel_checks import UNIT_ROUNDOFF, VGG_CHANNEL_PAIRS, assert_within, conv3x3_float64, gamma, random_array

testing = _core.testing

# Each term within 3 * 2^-16 of x * w (see the module docstring).
TERM_ERROR = 3 * 2.0**-16


def split_parts(v):
    """v's hi and lo bf16 parts, as the packer and the kernel's conversion make them (where
    bf16(v) is infinite or NaN, hi = 0 and lo carries it)."""
    rounded = bf16_round(v)
    finite = np.isfinite(rounded)
    with np.errstate(invalid="ignore"):
        lo = np.where(finite, bf16_round((v - rounded).astype(np.float32)), rounded)
    return np.where(finite, rounded, 0).astype(np.float64), lo.astype(np.float64)


def check_x3_conv(rng, n, h, w, cin, cout, relu):
    x = random_array(rng, (n, h, w, cin))
    kernel = random_array(rng, (3, 3, cin, cout))
    bias = random_array(rng, (cout,))
    (xh, xl), (kh, kl) = split_parts(x), split_parts(kernel)
    zero = np.zeros_like(bias, dtype=np.float64)
    exact_terms = conv3x3_float64(xh, kh, bias) + conv3x3_float64(xl, kh, zero) + conv3x3_float64(xh, kl, zero)
    magnitude = conv3x3_float64(np.abs(x), np.abs(kernel), np.abs(bias))
    activate = (lambda a: np.maximum(a, 0.0)) if relu else (lambda a: a)
    fast = testing.conv3x3_bf16x3_amx(x, kernel, bias, relu)
    twin = testing.conv3x3_bf16x3_reference(x, kernel, bias, relu)
    assert fast.shape == (n, h, w, cout) and fast.dtype == np.float32
    assert_within(twin, activate(exact_terms), UNIT_ROUNDOFF * np.abs(exact_terms) + 1e-30, "bf16x3 twin vs float64")
    # Three products a multiply-add, in pairs of channels, + the bias: float32 additions.
    bound = gamma(3 * 9 * (cin + 1) + 2) * (1 + 2.0**-7) * magnitude
    assert_within(fast, twin.astype(np.float64), 2 * bound + 1e-30, "bf16x3 AMX conv3x3 vs its twin")
    unrounded = activate(conv3x3_float64(x, kernel, bias))
    assert_within(fast, unrounded, TERM_ERROR * magnitude + 2 * bound + 1e-30, "bf16x3 AMX conv3x3 vs float64")
    if cin * cout >= 16:
        weights_once = testing.conv3x3_bf16_amx(x, kernel, bias, relu)
        assert np.abs(fast - weights_once).max() > 10 * np.abs(fast - twin).max()
    return x, kernel, bias, fast


@requires_amx
@pytest.mark.parametrize("n, h, w, cin, cout", AMX_AWKWARD_SHAPES)
@pytest.mark.parametrize("relu", [True, False])
def test_conv3x3_bf16x3_awkward_shapes(n, h, w, cin, cout, relu):
    rng = np.random.default_rng([n, h, w, cin, cout, 3])
    x, kernel, bias, fast = check_x3_conv(rng, n, h, w, cin, cout, relu)
    np.testing.assert_array_equal(testing.conv3x3_bf16x3_amx(x, kernel, bias, relu, "batch"), fast)
    if h >= 2 and w >= 2:
        np.testing.assert_array_equal(testing.conv3x3_bf16x3_amx(x, kernel, bias, relu, "max_pool"),
                                      testing.max_pool2x2(fast, _core.available_isas()[0]))


@requires_amx
@pytest.mark.parametrize("cin, cout", VGG_CHANNEL_PAIRS)
def test_conv3x3_bf16x3_vgg_layer_shapes(cin, cout):
    check_x3_conv(np.random.default_rng([cin, cout, 33]), 1, 7, 15, cin, cout, True)


@requires_amx
def test_conv3x3_bf16x3_random_shapes():
    rng = np.random.default_rng(2033)
    for _ in range(8):
        n, h, w = rng.integers(1, 3), rng.integers(1, 18), rng.integers(1, 40)
        cin, cout = rng.integers(1, 70), rng.integers(1, 70)
        check_x3_conv(rng, n, h, w, cin, cout, bool(rng.integers(2)))


@requires_amx
@pytest.mark.parametrize("h, w, cin", [(40, 30, 512), (9, 100, 3)])
def test_conv3x3_bf16x3_bands_and_forms(h, w, cin):
    # Several bands (512 channels) and the im2col first layer: every form against image by image.
    rng = np.random.default_rng([h, w, cin, 3])
    x = random_array(rng, (2, h, w, cin))
    kernel, bias = random_array(rng, (3, 3, cin, 48)), random_array(rng, (48,))
    image_by_image = testing.conv3x3_bf16x3_amx(x, kernel, bias, True)
    magnitude = conv3x3_float64(np.abs(x), np.abs(kernel), np.abs(bias))
    bound = 2 * gamma(3 * 9 * (cin + 1) + 2) * (1 + 2.0**-7) * magnitude
    assert_within(image_by_image, testing.conv3x3_bf16x3_reference(x, kernel, bias, True).astype(np.float64), bound,
                  "bf16x3 AMX conv3x3 vs its twin")
    np.testing.assert_array_equal(testing.conv3x3_bf16x3_amx(x, kernel, bias, True, "batch"), image_by_image)
    np.testing.assert_array_equal(testing.conv3x3_bf16x3_amx(x, kernel, bias, True, "max_pool"),
                                  testing.max_pool2x2(image_by_image, _core.available_isas()[0]))


@requires_amx
def test_bf16x3_unpack_is_hi_plus_lo_within_2_to_the_minus_16():
    kernel = random_array(np.random.default_rng(9), (3, 3, 33, 17))
    hi, lo = split_parts(kernel)
    unpacked = testing.bf16_unpack_roundtrip(kernel, "direct_bf16x3_amx")
    assert np.array_equal(unpacked, (hi + lo).astype(np.float32))
    assert np.all(np.abs(unpacked - kernel.astype(np.float64)) <= 2.0**-16 * np.abs(kernel))
    assert not np.array_equal(unpacked, bf16_round(kernel))


def he_scaled_vgg16(precision):
    """A VGG16 without the top at 64x64 whose activations keep their scale (He-scaled kernels)."""
    model = fastvgg.VGG16(None, include_top=False, input_shape=(64, 64, 3), seed=0, precision=precision)
    rng = np.random.default_rng(1)
    weights = [(rng.standard_normal(w.shape) * (np.sqrt(2 / (9 * w.shape[2])) if w.ndim == 4 else 0.01))
               .astype(np.float32) for w in model.get_weights()]
    model.set_weights(weights)
    return model, weights


def float64_vgg(weights, x):
    """Every conv and pool output of the plain VGG16 base in float64, by layer name."""
    names = [f"block{b}_conv{c}" for b, n in enumerate((2, 2, 3, 3, 3), 1) for c in range(1, n + 1)]
    a, outputs, i = x.astype(np.float64), {}, 0
    for name in names:
        a = np.maximum(conv3x3_float64(a, weights[2 * i].astype(np.float64), weights[2 * i + 1].astype(np.float64)), 0)
        outputs[name] = a
        i += 1
        if name.endswith(("1_conv2", "2_conv2", "3_conv3", "4_conv3", "5_conv3")):
            n, h, w, c = a.shape
            a = a.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
            outputs[name.split("_")[0] + "_pool"] = a
    return outputs


@requires_amx
def test_bf16x3_vgg16_within_its_bound_of_float64_and_weights_as_loaded():
    # Measured on a Xeon (Sapphire Rapids class): 5e-6 relative L2 after block1_conv2 (block1_conv1
    # runs the fp32 direct kernel), 1.2e-5 at block5_pool; "fast" 1.5e-6 and 3.2e-6. Bound: the
    # per-layer term error 3 * 2^-16 ~ 4.6e-5 at most, well under it in the L2 sense.
    model, weights = he_scaled_vgg16("bf16x3")
    assert model._executor.kernel_set == "amx_bf16x3"
    x = np.random.default_rng(2).uniform(-2, 2, (2, 64, 64, 3)).astype(np.float32)
    expected = float64_vgg(weights, x)
    got = model.extract(x, list(expected))
    errors = {name: float(np.linalg.norm(got[name] - e) / np.linalg.norm(e)) for name, e in expected.items()}
    print("bf16x3 relative L2 against float64:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert errors["block1_conv1"] < 1e-6  # the fp32 direct kernel
    assert max(errors.values()) < 4e-5
    assert errors["block5_pool"] > 1e-6  # bf16x3 really ran (fp32 would be ~3e-6, bf16 ~5e-3)
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)


def test_bf16x3_is_refused_with_the_reason_where_amx_cannot_run():
    reason = testing.amx_unavailable_reason()
    if reason:
        with pytest.raises(RuntimeError, match="precision='bf16x3' is not available here: .*precision='fast'"):
            _core.CpuExecutor(_core.Graph(3), "bf16x3")
        print(f"bf16x3 unavailable here: {reason}")
    else:
        assert _core.CpuExecutor(_core.Graph(3), "bf16x3").kernel_set == "amx_bf16x3"
    # The other precisions never pick it.
    for precision in ("fast", "highest"):
        assert _core.CpuExecutor(_core.Graph(3), precision).kernel_set == _core.active_isa()
