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
  }
  return "?";
}
static_assert(kOpKindCount == 9, "op_kind_name and parse_op_kind list every OpKind");

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
  }
  return "?";
}
static_assert(kActivationCount == 12, "activation_name and parse_activation list every Activation");

const char* pool_mode_name(GlobalPoolMode mode) { return mode == GlobalPoolMode::Max ? "max" : "avg"; }

OpKind parse_op_kind(const std::string& name) {
  for (int k = 0; k < kOpKindCount; ++k)
    if (name == op_kind_name(OpKind(k))) return OpKind(k);
  throw std::invalid_argument("unknown op kind '" + name +
                              "'; expected 'conv3x3', 'max_pool2x2', 'flatten', 'global_pool', 'dense', 'conv', "
                              "'pool2x2', 'affine' or 'activation'");
}

Activation parse_activation(const std::string& name) {
  for (int a = 0; a < kActivationCount; ++a)
    if (name == activation_name(Activation(a))) return Activation(a);
  if (name == "silu") return Activation::Swish;  // Keras 3's name for it
  throw std::invalid_argument("unknown activation '" + name +
                              "'; expected linear, relu, softmax, sigmoid, tanh, elu, selu, gelu, swish, softplus, "
                              "leaky_relu or l2_normalize");
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
float checked_slope(Activation activation, float slope) {
  if (!std::isfinite(slope)) throw std::invalid_argument("negative_slope must be a finite number");
  if (slope != 0.0f && activation != Activation::LeakyRelu)
    throw std::invalid_argument(std::string("negative_slope is leaky_relu's; activation ") + activation_name(activation) +
                                " takes none");
  return slope;
}
}  // namespace

int Graph::append(Op op) {
  const bool flat_so_far = flat();
  if (op.in_place()) op.on_image = !flat_so_far;
  if (op.is_spatial() && flat_so_far)
    throw std::invalid_argument("a convolution or pooling layer cannot follow a flatten, global pooling or dense layer");
  if ((op.kind == OpKind::Flatten || op.kind == OpKind::GlobalPool) && flat_so_far)
    throw std::invalid_argument("the network is already flat");
  if (op.kind == OpKind::Dense && !flat_so_far)
    throw std::invalid_argument("a dense layer needs a flatten or global pooling layer before it");
  if (op.activation == Activation::Softmax && !(op.kind == OpKind::Dense || (op.kind == OpKind::Elementwise && !op.on_image)))
    throw std::invalid_argument("softmax is only supported after a dense layer or on other flat rows (after a flatten or "
                                "global pooling layer)");
  if (op.activation == Activation::L2Normalize && !(op.kind == OpKind::Elementwise && !op.on_image))
    throw std::invalid_argument("l2_normalize is an op of its own on flat rows (after a flatten or global pooling layer), "
                                "not a layer's activation or an image's");
  if (op.kind == OpKind::Affine && op.out_channels != (op.on_image ? current_channels() : op.out_channels))
    throw std::invalid_argument("an affine map of " + std::to_string(op.out_channels) + " channels cannot follow a layer of " +
                                std::to_string(current_channels()) + " channels");
  ops_.push_back(op);
  return int(ops_.size()) - 1;
}

int Graph::add_conv3x3(int filters, Activation activation, float negative_slope) {
  require(positive("filters", filters, kMaxChannels));
  Op op{OpKind::Conv3x3};
  // Pooling keeps the channel count, so the input is whatever the last convolution made.
  op.in_channels = current_channels();
  op.out_channels = filters;
  op.same_padding = true;
  op.activation = activation;
  op.negative_slope = checked_slope(activation, negative_slope);
  return append(op);
}

int Graph::add_max_pool2x2() { return append(Op{OpKind::MaxPool2x2}); }
int Graph::add_flatten() { return append(Op{OpKind::Flatten}); }

int Graph::add_global_pool(GlobalPoolMode mode) {
  Op op{OpKind::GlobalPool};
  op.pool_mode = mode;
  return append(op);
}

int Graph::add_dense(int in_features, int units, Activation activation, float negative_slope) {
  require(positive("in_features", in_features, kMaxFeatures));
  require(positive("units", units, kMaxChannels));
  Op op{OpKind::Dense};
  op.in_channels = in_features;
  op.out_channels = units;
  op.activation = activation;
  op.negative_slope = checked_slope(activation, negative_slope);
  return append(op);
}

int Graph::add_conv(int kernel_size, int filters, bool same_padding, Activation activation,
                    float negative_slope) {
  if (kernel_size != 1 && kernel_size != 3)
    throw std::invalid_argument("kernel_size must be 1 or 3, got " + std::to_string(kernel_size));
  require(positive("filters", filters, kMaxChannels));
  Op op{OpKind::Conv};
  op.in_channels = current_channels();
  op.out_channels = filters;
  op.kernel_size = kernel_size;
  op.same_padding = kernel_size == 1 || same_padding;  // the two are the same for a 1x1 kernel
  op.activation = activation;
  op.negative_slope = checked_slope(activation, negative_slope);
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

int Graph::add_activation(Activation activation, float negative_slope) {
  if (activation == Activation::L2Normalize)
    throw std::invalid_argument("l2_normalize needs its max_inverse_norm: use add_l2_normalize");
  Op op{OpKind::Elementwise};
  op.activation = activation;
  op.negative_slope = checked_slope(activation, negative_slope);
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
    case OpKind::Conv3x3: return channels_agree(add_conv3x3(op.out_channels, op.activation, op.negative_slope));
    case OpKind::MaxPool2x2: return add_max_pool2x2();
    case OpKind::Flatten: return add_flatten();
    case OpKind::GlobalPool: return add_global_pool(op.pool_mode);
    case OpKind::Dense: return add_dense(op.in_channels, op.out_channels, op.activation, op.negative_slope);
    case OpKind::Conv:
      return channels_agree(
          add_conv(op.kernel_size, op.out_channels, op.same_padding, op.activation, op.negative_slope));
    case OpKind::Pool2x2: return add_pool2x2(op.pool_mode, op.same_padding);
    case OpKind::Affine: return add_affine(op.out_channels);
    case OpKind::Elementwise:
      return op.activation == Activation::L2Normalize ? add_l2_normalize(op.max_inverse_norm)
                                                       : add_activation(op.activation, op.negative_slope);
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
        if (op.kind == OpKind::Affine && (op.on_image ? c : features) != op.out_channels)
          throw std::invalid_argument("affine layer " + std::to_string(i) + " has " + std::to_string(op.out_channels) +
                                      " channels but an input of " + std::to_string(height) + "x" + std::to_string(width) +
                                      " gives it " + std::to_string(op.on_image ? c : features));
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
