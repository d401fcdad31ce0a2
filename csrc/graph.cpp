#include "graph.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace fastvgg {

namespace {
std::string positive(const char* what, long long value, long long limit) {
  if (value <= 0 || value > limit)
    return std::string(what) + " must be between 1 and " + std::to_string(limit) + ", got " + std::to_string(value);
  return {};
}

void require(const std::string& problem) {
  if (!problem.empty()) throw std::invalid_argument(problem);
}
}  // namespace

const char* op_kind_name(OpKind kind) {
  switch (kind) {
    case OpKind::Conv3x3: return "conv3x3";
    case OpKind::MaxPool2x2: return "max_pool2x2";
    case OpKind::Flatten: return "flatten";
    case OpKind::GlobalPool: return "global_pool";
    case OpKind::Dense: return "dense";
    case OpKind::Conv: return "conv";
    case OpKind::Pool2x2: return "pool2x2";
    case OpKind::Affine: return "affine";
    case OpKind::Elementwise: return "activation";
    case OpKind::PRelu: return "prelu";
    case OpKind::Upsample: return "upsample";
  }
  return "?";
}
static_assert(kOpKindCount == 11, "op_kind_name and parse_op_kind list every OpKind");

const char* activation_name(Activation activation) {
  switch (activation) {
    case Activation::Linear: return "linear";
    case Activation::Relu: return "relu";
    case Activation::Softmax: return "softmax";
    case Activation::Sigmoid: return "sigmoid";
    case Activation::Tanh: return "tanh";
    case Activation::Elu: return "elu";
    case Activation::Selu: return "selu";
    case Activation::Gelu: return "gelu";
    case Activation::Swish: return "swish";
    case Activation::Softplus: return "softplus";
    case Activation::LeakyRelu: return "leaky_relu";
    case Activation::L2Normalize: return "l2_normalize";
    case Activation::ClippedRelu: return "clipped_relu";
    case Activation::Softsign: return "softsign";
    case Activation::Exponential: return "exponential";
    case Activation::Mish: return "mish";
    case Activation::HardSigmoid: return "hard_sigmoid";
    case Activation::HardSigmoidKeras2: return "hard_sigmoid_keras2";
    case Activation::HardSilu: return "hard_silu";
  }
  return "?";
}
static_assert(kActivationCount == 19, "activation_name and parse_activation list every Activation");

const char* pool_mode_name(GlobalPoolMode mode) { return mode == GlobalPoolMode::Max ? "max" : "avg"; }

OpKind parse_op_kind(const std::string& name) {
  for (int k = 0; k < kOpKindCount; ++k)
    if (name == op_kind_name(OpKind(k))) return OpKind(k);
  throw std::invalid_argument("unknown op kind '" + name +
                              "'; expected 'conv3x3', 'max_pool2x2', 'flatten', 'global_pool', 'dense', 'conv', "
                              "'pool2x2', 'affine', 'activation', 'prelu' or 'upsample'");
}

Activation parse_activation(const std::string& name) {
  for (int a = 0; a < kActivationCount; ++a)
    if (name == activation_name(Activation(a))) return Activation(a);
  if (name == "silu") return Activation::Swish;  // Keras 3's name for it
  if (name == "hard_swish") return Activation::HardSilu;  // likewise
  throw std::invalid_argument("unknown activation '" + name +
                              "'; expected linear, relu, softmax, sigmoid, tanh, elu, selu, gelu, swish, softplus, "
                              "leaky_relu, l2_normalize, clipped_relu, softsign, exponential, mish, hard_sigmoid, "
                              "hard_sigmoid_keras2 or hard_silu");
}

GlobalPoolMode parse_pool_mode(const std::string& name) {
  if (name == "avg") return GlobalPoolMode::Average;
  if (name == "max") return GlobalPoolMode::Max;
  throw std::invalid_argument("unknown pooling mode '" + name + "'; expected 'avg' or 'max'");
}

std::size_t shape_elements(const OpShape& shape) {
  std::size_t n = 1;
  for (int d : shape) n *= std::size_t(d);
  return n;
}

Graph::Graph(int input_channels) : input_channels_(input_channels) {
  require(positive("input_channels", input_channels, kMaxChannels));
}

const Op& Graph::op(int index) const {
  if (index < 0 || index >= op_count())
    throw std::out_of_range("op index " + std::to_string(index) + " is out of range: the graph has " +
                            std::to_string(op_count()) + " ops");
  return ops_[std::size_t(index)];
}

bool Graph::flat() const {
  return std::any_of(ops_.begin(), ops_.end(), [](const Op& o) { return !o.is_spatial(); });
}

int Graph::current_channels() const {
  // Pooling, affine maps and activations keep the channel count: it is the last convolution's.
  for (auto it = ops_.rbegin(); it != ops_.rend(); ++it)
    if (it->is_convolution()) return it->out_channels;
  return input_channels_;
}

namespace {
// Sets op's activation and its numbers, after checking them (see Graph's comment).
void set_activation(Op& op, Activation activation, const ActivationParams& params) {
  if (!std::isfinite(params.negative_slope)) throw std::invalid_argument("negative_slope must be a finite number");
  if (std::isnan(params.max_value) || params.max_value < 0.0f)
    throw std::invalid_argument("max_value must be a number >= 0 (infinity: no cap)");
  if (!std::isfinite(params.threshold)) throw std::invalid_argument("threshold must be a finite number");
  const ActivationParams none;
  const bool takes_slope = activation == Activation::LeakyRelu || activation == Activation::ClippedRelu;
  if (params.negative_slope != 0.0f && !takes_slope)
    throw std::invalid_argument(std::string("negative_slope is leaky_relu's and clipped_relu's; activation ") +
                                activation_name(activation) + " takes none");
  if ((params.max_value != none.max_value || params.threshold != none.threshold) && activation != Activation::ClippedRelu)
    throw std::invalid_argument(std::string("max_value and threshold are clipped_relu's; activation ") +
                                activation_name(activation) + " takes none");
  op.activation = activation;
  op.negative_slope = params.negative_slope;
  op.max_value = params.max_value;
  op.threshold = params.threshold;
}
}  // namespace

int Graph::append(Op op) {
  const bool flat_so_far = flat();
  if (op.in_place()) op.on_image = !flat_so_far;
  if (op.is_spatial() && flat_so_far)
    throw std::invalid_argument("a convolution, pooling or upsampling layer cannot follow a flatten, global pooling or dense "
                                "layer");
  if ((op.kind == OpKind::Flatten || op.kind == OpKind::GlobalPool) && flat_so_far)
    throw std::invalid_argument("the network is already flat");
  if (op.kind == OpKind::Dense && !flat_so_far)
    throw std::invalid_argument("a dense layer needs a flatten or global pooling layer before it");
  if (op.activation == Activation::L2Normalize && !(op.kind == OpKind::Elementwise && !op.on_image))
    throw std::invalid_argument("l2_normalize is an op of its own on flat rows (after a flatten or global pooling layer), "
                                "not a layer's activation or an image's");
  // A per-channel op on an image has the image's channels (on flat rows, shapes() checks them).
  if ((op.kind == OpKind::Affine || op.kind == OpKind::PRelu) && op.on_image && op.out_channels != current_channels())
    throw std::invalid_argument(std::string(op.kind == OpKind::Affine ? "an affine map" : "a prelu") + " of " +
                                std::to_string(op.out_channels) + " channels cannot follow a layer of " +
                                std::to_string(current_channels()) + " channels");
  if (op.kind == OpKind::PRelu && !op.on_image && (op.alpha_height != 1 || op.alpha_width != 1))
    throw std::invalid_argument("a prelu on flat rows has one alpha per feature: alpha_height and alpha_width must be 1");
  ops_.push_back(op);
  return int(ops_.size()) - 1;
}

int Graph::add_conv3x3(int filters, Activation activation, const ActivationParams& params) {
  require(positive("filters", filters, kMaxChannels));
  Op op{OpKind::Conv3x3};
  // Pooling keeps the channel count, so the input is whatever the last convolution made.
  op.in_channels = current_channels();
  op.out_channels = filters;
  op.same_padding = true;
  set_activation(op, activation, params);
  return append(op);
}

int Graph::add_max_pool2x2() { return append(Op{OpKind::MaxPool2x2}); }
int Graph::add_flatten() { return append(Op{OpKind::Flatten}); }

int Graph::add_global_pool(GlobalPoolMode mode) {
  Op op{OpKind::GlobalPool};
  op.pool_mode = mode;
  return append(op);
}

int Graph::add_dense(int in_features, int units, Activation activation, const ActivationParams& params) {
  require(positive("in_features", in_features, kMaxFeatures));
  require(positive("units", units, kMaxChannels));
  Op op{OpKind::Dense};
  op.in_channels = in_features;
  op.out_channels = units;
  set_activation(op, activation, params);
  return append(op);
}

int Graph::add_conv(int kernel_size, int filters, bool same_padding, Activation activation,
                    const ActivationParams& params) {
  if (kernel_size != 1 && kernel_size != 3)
    throw std::invalid_argument("kernel_size must be 1 or 3, got " + std::to_string(kernel_size));
  require(positive("filters", filters, kMaxChannels));
  Op op{OpKind::Conv};
  op.in_channels = current_channels();
  op.out_channels = filters;
  op.kernel_size = kernel_size;
  op.same_padding = kernel_size == 1 || same_padding;  // the two are the same for a 1x1 kernel
  set_activation(op, activation, params);
  return append(op);
}

int Graph::add_pool2x2(GlobalPoolMode mode, bool same_padding) {
  Op op{OpKind::Pool2x2};
  op.pool_mode = mode;
  op.same_padding = same_padding;
  return append(op);
}

int Graph::add_affine(int channels) {
  require(positive("channels", channels, kMaxFeatures));
  Op op{OpKind::Affine};
  op.in_channels = op.out_channels = channels;
  return append(op);
}

int Graph::add_activation(Activation activation, const ActivationParams& params) {
  if (activation == Activation::L2Normalize)
    throw std::invalid_argument("l2_normalize needs its max_inverse_norm: use add_l2_normalize");
  Op op{OpKind::Elementwise};
  set_activation(op, activation, params);
  return append(op);
}

int Graph::add_prelu(int channels, int alpha_height, int alpha_width) {
  require(positive("channels", channels, kMaxFeatures));
  require(positive("alpha_height", alpha_height, kMaxSide));
  require(positive("alpha_width", alpha_width, kMaxSide));
  Op op{OpKind::PRelu};
  op.in_channels = op.out_channels = channels;
  op.alpha_height = alpha_height;
  op.alpha_width = alpha_width;
  return append(op);
}

int Graph::add_upsample(int size_height, int size_width) {
  require(positive("size_height", size_height, kMaxSide));
  require(positive("size_width", size_width, kMaxSide));
  Op op{OpKind::Upsample};
  op.size_height = size_height;
  op.size_width = size_width;
  return append(op);
}

int Graph::add_l2_normalize(float max_inverse_norm) {
  if (!std::isfinite(max_inverse_norm) || !(max_inverse_norm > 0.0f))
    throw std::invalid_argument("max_inverse_norm must be a finite number above 0");
  Op op{OpKind::Elementwise};
  op.activation = Activation::L2Normalize;
  op.max_inverse_norm = max_inverse_norm;
  return append(op);
}

int Graph::add(const Op& op) {
  // A convolution's input channels follow from the chain; a description that disagrees is
  // refused and the op taken back.
  auto channels_agree = [&](int index) {
    if (ops_.back().in_channels != op.in_channels) {
      const int expected = ops_.back().in_channels;
      ops_.pop_back();
      throw std::invalid_argument("convolution " + std::to_string(index) + " would read " + std::to_string(expected) +
                                  " channels, but its description says " + std::to_string(op.in_channels));
    }
    return index;
  };
  switch (op.kind) {
    case OpKind::Conv3x3: return channels_agree(add_conv3x3(op.out_channels, op.activation, op.activation_params()));
    case OpKind::MaxPool2x2: return add_max_pool2x2();
    case OpKind::Flatten: return add_flatten();
    case OpKind::GlobalPool: return add_global_pool(op.pool_mode);
    case OpKind::Dense: return add_dense(op.in_channels, op.out_channels, op.activation, op.activation_params());
    case OpKind::Conv:
      return channels_agree(
          add_conv(op.kernel_size, op.out_channels, op.same_padding, op.activation, op.activation_params()));
    case OpKind::Pool2x2: return add_pool2x2(op.pool_mode, op.same_padding);
    case OpKind::Affine: return add_affine(op.out_channels);
    case OpKind::PRelu: return add_prelu(op.out_channels, op.alpha_height, op.alpha_width);
    case OpKind::Upsample: return add_upsample(op.size_height, op.size_width);
    case OpKind::Elementwise:
      return op.activation == Activation::L2Normalize ? add_l2_normalize(op.max_inverse_norm)
                                                       : add_activation(op.activation, op.activation_params());
  }
  throw std::invalid_argument("unknown op kind");
}

std::vector<OpShape> Graph::shapes(int height, int width) const {
  if (height < 1 || width < 1 || height > kMaxSide || width > kMaxSide)
    throw std::invalid_argument("input height and width must be between 1 and " + std::to_string(kMaxSide) + ", got " +
                                std::to_string(height) + "x" + std::to_string(width));
  std::vector<OpShape> result;
  int h = height, w = width, c = input_channels_;
  long long features = 0;
  for (std::size_t i = 0; i < ops_.size(); ++i) {
    const Op& op = ops_[i];
    switch (op.kind) {
      case OpKind::Conv3x3:
        c = op.out_channels;
        result.push_back({h, w, c});
        break;
      case OpKind::MaxPool2x2:
        h /= 2;
        w /= 2;
        if (h < 1 || w < 1)
          throw std::invalid_argument("input " + std::to_string(height) + "x" + std::to_string(width) +
                                      " is too small: layer " + std::to_string(i) + " would pool it to nothing");
        result.push_back({h, w, c});
        break;
      case OpKind::Flatten:
        features = static_cast<long long>(h) * w * c;
        if (features > kMaxFeatures)
          throw std::invalid_argument("flatten layer " + std::to_string(i) + " would make " + std::to_string(features) +
                                      " features, more than the " + std::to_string(kMaxFeatures) + " supported");
        result.push_back({int(features)});
        break;
      case OpKind::GlobalPool:
        features = c;
        result.push_back({c});
        break;
      case OpKind::Conv:
        c = op.out_channels;
        if (!op.same_padding) {
          h -= op.kernel_size - 1;
          w -= op.kernel_size - 1;
          if (h < 1 || w < 1)
            throw std::invalid_argument("input " + std::to_string(height) + "x" + std::to_string(width) +
                                        " is too small: layer " + std::to_string(i) +
                                        " ('valid' 3x3 convolution) would leave nothing");
        }
        result.push_back({h, w, c});
        break;
      case OpKind::Upsample:
        // In 64 bits: the product must not wrap around to pass the check.
        if (static_cast<long long>(h) * op.size_height > kMaxSide || static_cast<long long>(w) * op.size_width > kMaxSide)
          throw std::invalid_argument("input " + std::to_string(height) + "x" + std::to_string(width) +
                                      " is too large: upsampling layer " + std::to_string(i) +
                                      " would make its sides more than " + std::to_string(kMaxSide));
        h *= op.size_height;
        w *= op.size_width;
        result.push_back({h, w, c});
        break;
      case OpKind::Pool2x2:
        h = op.same_padding ? (h + 1) / 2 : h / 2;
        w = op.same_padding ? (w + 1) / 2 : w / 2;
        if (h < 1 || w < 1)
          throw std::invalid_argument("input " + std::to_string(height) + "x" + std::to_string(width) +
                                      " is too small: layer " + std::to_string(i) + " would pool it to nothing");
        result.push_back({h, w, c});
        break;
      case OpKind::Affine:
      case OpKind::Elementwise:
      case OpKind::PRelu:
        if (op.kind != OpKind::Elementwise && (op.on_image ? c : features) != op.out_channels)
          throw std::invalid_argument(std::string(op_kind_name(op.kind)) + " layer " + std::to_string(i) + " has " +
                                      std::to_string(op.out_channels) + " channels but an input of " +
                                      std::to_string(height) + "x" + std::to_string(width) + " gives it " +
                                      std::to_string(op.on_image ? c : features));
        // An alpha per row or column (Keras's PReLU without shared_axes) fits one image size only.
        if (op.kind == OpKind::PRelu && op.on_image &&
            ((op.alpha_height != 1 && op.alpha_height != h) || (op.alpha_width != 1 && op.alpha_width != w)))
          throw std::invalid_argument("prelu layer " + std::to_string(i) + " has an alpha for " +
                                      std::to_string(op.alpha_height) + "x" + std::to_string(op.alpha_width) +
                                      " images, but an input of " + std::to_string(height) + "x" +
                                      std::to_string(width) + " gives it " + std::to_string(h) + "x" +
                                      std::to_string(w) + ": use the input size the model was built for");
        if (op.on_image)
          result.push_back({h, w, c});
        else
          result.push_back({int(features)});
        break;
      case OpKind::Dense:
        if (features != op.in_channels)
          throw std::invalid_argument("dense layer " + std::to_string(i) + " expects " + std::to_string(op.in_channels) +
                                      " input features but an input of " + std::to_string(height) + "x" +
                                      std::to_string(width) + " gives " + std::to_string(features));
        features = op.out_channels;
        result.push_back({op.out_channels});
        break;
    }
  }
  return result;
}

}  // namespace fastvgg
