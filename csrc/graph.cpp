#include "graph.h"

#include <algorithm>
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
  }
  return "?";
}
static_assert(kOpKindCount == 5, "op_kind_name and parse_op_kind list every OpKind");

const char* activation_name(Activation activation) {
  switch (activation) {
    case Activation::Linear: return "linear";
    case Activation::Relu: return "relu";
    case Activation::Softmax: return "softmax";
  }
  return "?";
}

const char* pool_mode_name(GlobalPoolMode mode) { return mode == GlobalPoolMode::Max ? "max" : "avg"; }

OpKind parse_op_kind(const std::string& name) {
  for (OpKind kind : {OpKind::Conv3x3, OpKind::MaxPool2x2, OpKind::Flatten, OpKind::GlobalPool, OpKind::Dense})
    if (name == op_kind_name(kind)) return kind;
  throw std::invalid_argument("unknown op kind '" + name +
                              "'; expected 'conv3x3', 'max_pool2x2', 'flatten', 'global_pool' or 'dense'");
}

Activation parse_activation(const std::string& name) {
  for (Activation a : {Activation::Linear, Activation::Relu, Activation::Softmax})
    if (name == activation_name(a)) return a;
  throw std::invalid_argument("unknown activation '" + name + "'; expected 'linear', 'relu' or 'softmax'");
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

int Graph::append(Op op) {
  const bool flat_so_far = std::any_of(ops_.begin(), ops_.end(), [](const Op& o) { return !o.is_spatial(); });
  if (op.is_spatial() && flat_so_far)
    throw std::invalid_argument("a convolution or pooling layer cannot follow a flatten, global pooling or dense layer");
  if ((op.kind == OpKind::Flatten || op.kind == OpKind::GlobalPool) && flat_so_far)
    throw std::invalid_argument("the network is already flat");
  if (op.kind == OpKind::Dense && !flat_so_far)
    throw std::invalid_argument("a dense layer needs a flatten or global pooling layer before it");
  if (op.activation == Activation::Softmax && op.kind != OpKind::Dense)
    throw std::invalid_argument("softmax is only supported after a dense layer");
  ops_.push_back(op);
  return int(ops_.size()) - 1;
}

int Graph::add_conv3x3(int filters, Activation activation) {
  require(positive("filters", filters, kMaxChannels));
  Op op{OpKind::Conv3x3};
  // Pooling keeps the channel count, so the input is whatever the last convolution made.
  op.in_channels = input_channels_;
  for (auto it = ops_.rbegin(); it != ops_.rend(); ++it)
    if (it->kind == OpKind::Conv3x3) {
      op.in_channels = it->out_channels;
      break;
    }
  op.out_channels = filters;
  op.activation = activation;
  return append(op);
}

int Graph::add_max_pool2x2() { return append(Op{OpKind::MaxPool2x2}); }
int Graph::add_flatten() { return append(Op{OpKind::Flatten}); }

int Graph::add_global_pool(GlobalPoolMode mode) {
  Op op{OpKind::GlobalPool};
  op.pool_mode = mode;
  return append(op);
}

int Graph::add_dense(int in_features, int units, Activation activation) {
  require(positive("in_features", in_features, kMaxFeatures));
  require(positive("units", units, kMaxChannels));
  Op op{OpKind::Dense};
  op.in_channels = in_features;
  op.out_channels = units;
  op.activation = activation;
  return append(op);
}

int Graph::add(const Op& op) {
  switch (op.kind) {
    case OpKind::Conv3x3: {
      const int index = add_conv3x3(op.out_channels, op.activation);
      if (ops_.back().in_channels != op.in_channels) {
        const int expected = ops_.back().in_channels;
        ops_.pop_back();
        throw std::invalid_argument("convolution " + std::to_string(index) + " would read " + std::to_string(expected) +
                                    " channels, but its description says " + std::to_string(op.in_channels));
      }
      return index;
    }
    case OpKind::MaxPool2x2: return add_max_pool2x2();
    case OpKind::Flatten: return add_flatten();
    case OpKind::GlobalPool: return add_global_pool(op.pool_mode);
    case OpKind::Dense: return add_dense(op.in_channels, op.out_channels, op.activation);
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
