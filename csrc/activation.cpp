// Element-wise activations with Keras's formulas: relu, sigmoid, tanh, elu (alpha 1), selu,
// gelu (the exact erf form: Keras 3 and tf.keras both default to approximate=False), swish
// (silu), softplus, leaky relu (x < 0 ? negative_slope * x : x, the slope the op's), Keras's
// ReLU with a cap or threshold (clipped relu), softsign, exponential, mish, Keras 3's hard
// sigmoid and hard silu, and tf.keras's hard sigmoid.
//
// They run on a head's few values, not on VGG's large activations, so all but relu are scalar
// float math from <cmath> (each within an ulp or two of exact); the formulas are arranged so no
// intermediate overflows or cancels (expm1 for elu, erfc for gelu, a max-split softplus).
// On blocked images only the real channels of the real pixels change: f(0) is not 0 for
// sigmoid or softplus, and the border and padding channels must stay zero for the next kernel.
#include <algorithm>
#include <cmath>  // the per-ISA code calls the C library's float functions (expf, fmaf, ...), not
                  // <cmath>'s inline std:: overloads: those are weak symbols that an AVX object
                  // would share by name with every ISA (tests/test_isa_symbols.py)
#include <stdexcept>

#include "ops.h"
#include "simd.h"

namespace fastvgg {

#if FASTVGG_ISA_IS_GENERIC
namespace {
// Elementwise's names, in its order.
const char* const kElementwiseNames[] = {"linear",       "relu",         "sigmoid",     "tanh",
                                         "elu",          "selu",         "gelu",        "swish",
                                         "softplus",     "leaky_relu",   "clipped_relu", "softsign",
                                         "exponential",  "mish",         "hard_sigmoid", "hard_sigmoid_keras2",
                                         "hard_silu"};
}  // namespace

Elementwise parse_elementwise(const std::string& name) {
  for (int i = 0; i < int(sizeof(kElementwiseNames) / sizeof(kElementwiseNames[0])); ++i)
    if (name == kElementwiseNames[i]) return Elementwise(i);
  if (name == "silu") return Elementwise::Swish;
  if (name == "hard_swish") return Elementwise::HardSilu;
  throw std::invalid_argument("unknown activation '" + name +
                              "'; expected linear, relu, sigmoid, tanh, elu, selu, gelu, swish (silu), softplus, "
                              "leaky_relu, clipped_relu, softsign, exponential, mish, hard_sigmoid, "
                              "hard_sigmoid_keras2 or hard_silu (hard_swish)");
}

const char* elementwise_name(Elementwise f) { return kElementwiseNames[int(f)]; }
#endif

namespace {
// Keras's selu constants (Klambauer et al. 2017).
constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
constexpr double kSeluScale = 1.0507009873554804934193349852946;
constexpr double kSqrtHalf = 0.70710678118654752440084436210485;
}  // namespace

namespace FASTVGG_ISA {
namespace {

// Keras's ReLU(negative_slope, max_value, threshold) when it is not a leaky one, step by step as
// Keras (3 and tf.keras) computes it in float32: x where x > threshold, else 0; that clipped
// to [0, max_value] if there is a cap; minus negative_slope * relu(threshold - x), the product
// rounded once. Below the threshold that is 0 - p = -p exactly, above it nothing is subtracted.
inline float clipped_relu(float x, const ActivationParams& p) {
  if (x != x) return x;  // NaN stays NaN
  float passed = x > p.threshold ? x : 0.0f;
  if (p.max_value < kNoCap)
    passed = passed < 0.0f ? 0.0f : (passed > p.max_value ? p.max_value : passed);
  if (p.negative_slope == 0.0f || x > p.threshold) return passed;
  return passed - p.negative_slope * (p.threshold - x);
}

// log(1 + e^x) = max(x, 0) + log1p(e^-|x|): never overflows.
inline float softplus(float x) { return (x < 0.0f ? 0.0f : x) + log1pf(expf(-fabsf(x))); }

// Keras 3's hard sigmoid, relu6(x + 3) / 6, in its float32 steps (NaN stays NaN).
inline float hard_sigmoid(float x) {
  const float shifted = x + 3.0f;
  return (shifted < 0.0f ? 0.0f : shifted > 6.0f ? 6.0f : shifted) / 6.0f;
}

template <Elementwise F>
inline float apply(float x, [[maybe_unused]] const ActivationParams& params) {
  if constexpr (F == Elementwise::Relu) return x < 0.0f ? 0.0f : x;  // keeps NaN
  if constexpr (F == Elementwise::Sigmoid) return 1.0f / (1.0f + expf(-x));
  if constexpr (F == Elementwise::Tanh) return tanhf(x);
  if constexpr (F == Elementwise::Elu) return x > 0.0f ? x : expm1f(x);
  if constexpr (F == Elementwise::Selu)
    return x > 0.0f ? float(kSeluScale) * x : float(kSeluScale * kSeluAlpha) * expm1f(x);
  // 0.5 x (1 + erf(x / sqrt 2)) without 1 + erf's cancellation for negative x.
  if constexpr (F == Elementwise::Gelu) return 0.5f * x * erfcf(-x * float(kSqrtHalf));
  if constexpr (F == Elementwise::Swish) return x / (1.0f + expf(-x));
  if constexpr (F == Elementwise::Softplus) return softplus(x);
  // One product, rounded once: TensorFlow's max(slope * x, x) for slopes up to 1, its select above.
  if constexpr (F == Elementwise::LeakyRelu) return x < 0.0f ? params.negative_slope * x : x;  // keeps NaN
  if constexpr (F == Elementwise::ClippedRelu) return clipped_relu(x, params);
  if constexpr (F == Elementwise::Softsign) return x / (1.0f + fabsf(x));
  if constexpr (F == Elementwise::Exponential) return expf(x);
  if constexpr (F == Elementwise::Mish) return x * tanhf(softplus(x));
  if constexpr (F == Elementwise::HardSigmoid) return hard_sigmoid(x);
  // tf.keras: clip(x * 0.2 + 0.5, 0, 1), the product and the sum each rounded (this file is
  // compiled without floating-point contraction, so no fused multiply-add merges them).
  if constexpr (F == Elementwise::HardSigmoidKeras2) {
    const float y = x * 0.2f + 0.5f;
    return y < 0.0f ? 0.0f : y > 1.0f ? 1.0f : y;
  }
  if constexpr (F == Elementwise::HardSilu) return x * hard_sigmoid(x);
  return x;
}

template <Elementwise F>
void apply_span(float* values, std::size_t count, const ActivationParams& params) {
  if constexpr (F == Elementwise::Relu) {
    std::size_t i = 0;
    for (; i + kChannelBlock <= count; i += kChannelBlock) store(values + i, relu(load(values + i)));
    for (; i < count; ++i) values[i] = apply<F>(values[i], params);
  } else {
    // The relus' selects vectorise as they are; the others are scalar libm calls.
    for (std::size_t i = 0; i < count; ++i) values[i] = apply<F>(values[i], params);
  }
}

template <Elementwise F>
void apply_blocked(const BlockedImage& image, const ActivationParams& params, int threads) {
  const int items = image.blocks() * image.height;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; ++item) {
    const int b = item / image.height, y = item % image.height;
    const int lanes = std::min(kChannelBlock, image.channels - b * kChannelBlock);
    float* row = image.at(b, y, 0);
    if (lanes == kChannelBlock) {
      apply_span<F>(row, std::size_t(image.width) * kChannelBlock, params);
    } else {
      for (int x = 0; x < image.width; ++x) apply_span<F>(row + x * kChannelBlock, std::size_t(lanes), params);
    }
  }
}

template <typename Run>
void dispatch(Elementwise f, Run run) {
  switch (f) {
    case Elementwise::Linear: return;
    case Elementwise::Relu: return run(std::integral_constant<Elementwise, Elementwise::Relu>{});
    case Elementwise::Sigmoid: return run(std::integral_constant<Elementwise, Elementwise::Sigmoid>{});
    case Elementwise::Tanh: return run(std::integral_constant<Elementwise, Elementwise::Tanh>{});
    case Elementwise::Elu: return run(std::integral_constant<Elementwise, Elementwise::Elu>{});
    case Elementwise::Selu: return run(std::integral_constant<Elementwise, Elementwise::Selu>{});
    case Elementwise::Gelu: return run(std::integral_constant<Elementwise, Elementwise::Gelu>{});
    case Elementwise::Swish: return run(std::integral_constant<Elementwise, Elementwise::Swish>{});
    case Elementwise::Softplus: return run(std::integral_constant<Elementwise, Elementwise::Softplus>{});
    case Elementwise::LeakyRelu: return run(std::integral_constant<Elementwise, Elementwise::LeakyRelu>{});
    case Elementwise::ClippedRelu: return run(std::integral_constant<Elementwise, Elementwise::ClippedRelu>{});
    case Elementwise::Softsign: return run(std::integral_constant<Elementwise, Elementwise::Softsign>{});
    case Elementwise::Exponential: return run(std::integral_constant<Elementwise, Elementwise::Exponential>{});
    case Elementwise::Mish: return run(std::integral_constant<Elementwise, Elementwise::Mish>{});
    case Elementwise::HardSigmoid: return run(std::integral_constant<Elementwise, Elementwise::HardSigmoid>{});
    case Elementwise::HardSigmoidKeras2:
      return run(std::integral_constant<Elementwise, Elementwise::HardSigmoidKeras2>{});
    case Elementwise::HardSilu: return run(std::integral_constant<Elementwise, Elementwise::HardSilu>{});
  }
}

}  // namespace

void activation_blocked(const BlockedImage& image, Elementwise f, const ActivationParams& params, int threads) {
  dispatch(f, [&](auto which) { apply_blocked<decltype(which)::value>(image, params, threads); });
}

void activation_rows(float* values, std::size_t count, Elementwise f, const ActivationParams& params) {
  dispatch(f, [&](auto which) { apply_span<decltype(which)::value>(values, count, params); });
}

}  // namespace FASTVGG_ISA

#if FASTVGG_ISA_IS_GENERIC
namespace reference {

void activation(const float* x, std::size_t count, Elementwise f, const ActivationParams& params, float* y) {
  for (std::size_t i = 0; i < count; ++i) {
    const double v = x[i];
    double r = v;
    switch (f) {
      case Elementwise::Linear: break;
      case Elementwise::Relu: r = v < 0.0 ? 0.0 : v; break;
      case Elementwise::Sigmoid: r = 1.0 / (1.0 + std::exp(-v)); break;
      case Elementwise::Tanh: r = std::tanh(v); break;
      case Elementwise::Elu: r = v > 0.0 ? v : std::expm1(v); break;
      case Elementwise::Selu: r = v > 0.0 ? kSeluScale * v : kSeluScale * kSeluAlpha * std::expm1(v); break;
      case Elementwise::Gelu: r = 0.5 * v * std::erfc(-v * kSqrtHalf); break;
      case Elementwise::Swish: r = v / (1.0 + std::exp(-v)); break;
      case Elementwise::Softplus: r = std::max(v, 0.0) + std::log1p(std::exp(-std::fabs(v))); break;
      case Elementwise::LeakyRelu: r = v < 0.0 ? double(params.negative_slope) * v : v; break;
      case Elementwise::ClippedRelu: {
        // The formula as Keras states it, in double; the float32 steps' roundings (t - x, then
        // the product) are the test's to allow for.
        const double t = params.threshold, cap = params.max_value;
        if (v != v) break;
        r = v > t ? std::min(cap, v) : -double(params.negative_slope) * (t - v);
        if (v > t && params.max_value < kNoCap) r = std::max(r, 0.0);
        break;
      }
      case Elementwise::Softsign: r = v / (1.0 + std::fabs(v)); break;
      case Elementwise::Exponential: r = std::exp(v); break;
      case Elementwise::Mish: r = v * std::tanh(std::max(v, 0.0) + std::log1p(std::exp(-std::fabs(v)))); break;
      case Elementwise::HardSigmoid: r = std::min(std::max((v + 3.0) / 6.0, 0.0), 1.0); break;
      // The constant as tf.keras holds it: 0.2 rounded to float32.
      case Elementwise::HardSigmoidKeras2: r = std::min(std::max(double(0.2f) * v + 0.5, 0.0), 1.0); break;
      case Elementwise::HardSilu: r = v * std::min(std::max((v + 3.0) / 6.0, 0.0), 1.0); break;
    }
    y[i] = float(r);
  }
}

}  // namespace reference
#endif

}  // namespace fastvgg
