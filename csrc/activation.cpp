// Element-wise activations with Keras's formulas: relu, sigmoid, tanh, elu (alpha 1), selu,
// gelu (the exact erf form: Keras 3 and tf.keras both default to approximate=False), swish
// (silu), softplus and leaky relu (x < 0 ? negative_slope * x : x, the slope the op's).
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
const char* const kElementwiseNames[] = {"linear", "relu",  "sigmoid", "tanh",      "elu",
                                         "selu",   "gelu",  "swish",   "softplus", "leaky_relu"};
}  // namespace

Elementwise parse_elementwise(const std::string& name) {
  for (int i = 0; i < int(sizeof(kElementwiseNames) / sizeof(kElementwiseNames[0])); ++i)
    if (name == kElementwiseNames[i]) return Elementwise(i);
  if (name == "silu") return Elementwise::Swish;
  throw std::invalid_argument("unknown activation '" + name +
                              "'; expected linear, relu, sigmoid, tanh, elu, selu, gelu, swish (silu), softplus or leaky_relu");
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

template <Elementwise F>
inline float apply(float x, [[maybe_unused]] float negative_slope) {
  if constexpr (F == Elementwise::Relu) return x < 0.0f ? 0.0f : x;  // keeps NaN
  if constexpr (F == Elementwise::Sigmoid) return 1.0f / (1.0f + expf(-x));
  if constexpr (F == Elementwise::Tanh) return tanhf(x);
  if constexpr (F == Elementwise::Elu) return x > 0.0f ? x : expm1f(x);
  if constexpr (F == Elementwise::Selu)
    return x > 0.0f ? float(kSeluScale) * x : float(kSeluScale * kSeluAlpha) * expm1f(x);
  // 0.5 x (1 + erf(x / sqrt 2)) without 1 + erf's cancellation for negative x.
  if constexpr (F == Elementwise::Gelu) return 0.5f * x * erfcf(-x * float(kSqrtHalf));
  if constexpr (F == Elementwise::Swish) return x / (1.0f + expf(-x));
  // log(1 + e^x) = max(x, 0) + log1p(e^-|x|): never overflows.
  if constexpr (F == Elementwise::Softplus) return (x < 0.0f ? 0.0f : x) + log1pf(expf(-fabsf(x)));
  // One product, rounded once: TensorFlow's max(slope * x, x) for slopes up to 1, its select above.
  if constexpr (F == Elementwise::LeakyRelu) return x < 0.0f ? negative_slope * x : x;  // keeps NaN
  return x;
}

template <Elementwise F>
void apply_span(float* values, std::size_t count, float negative_slope) {
  if constexpr (F == Elementwise::Relu) {
    std::size_t i = 0;
    for (; i + kChannelBlock <= count; i += kChannelBlock) store(values + i, relu(load(values + i)));
    for (; i < count; ++i) values[i] = apply<F>(values[i], negative_slope);
  } else {
    // Leaky relu's select vectorises as it is; the others are scalar libm calls.
    for (std::size_t i = 0; i < count; ++i) values[i] = apply<F>(values[i], negative_slope);
  }
}

template <Elementwise F>
void apply_blocked(const BlockedImage& image, float negative_slope, int threads) {
  const int items = image.blocks() * image.height;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; ++item) {
    const int b = item / image.height, y = item % image.height;
    const int lanes = std::min(kChannelBlock, image.channels - b * kChannelBlock);
    float* row = image.at(b, y, 0);
    if (lanes == kChannelBlock) {
      apply_span<F>(row, std::size_t(image.width) * kChannelBlock, negative_slope);
    } else {
      for (int x = 0; x < image.width; ++x) apply_span<F>(row + x * kChannelBlock, std::size_t(lanes), negative_slope);
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
  }
}

}  // namespace

void activation_blocked(const BlockedImage& image, Elementwise f, float negative_slope, int threads) {
  dispatch(f, [&](auto which) { apply_blocked<decltype(which)::value>(image, negative_slope, threads); });
}

void activation_rows(float* values, std::size_t count, Elementwise f, float negative_slope) {
  dispatch(f, [&](auto which) { apply_span<decltype(which)::value>(values, count, negative_slope); });
}

}  // namespace FASTVGG_ISA

#if FASTVGG_ISA_IS_GENERIC
namespace reference {

void activation(const float* x, std::size_t count, Elementwise f, float negative_slope, float* y) {
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
      case Elementwise::LeakyRelu: r = v < 0.0 ? double(negative_slope) * v : v; break;
    }
    y[i] = float(r);
  }
}

}  // namespace reference
#endif

}  // namespace fastvgg
