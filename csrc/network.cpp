#include "network.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fastvgg {

namespace {

struct Workspace {
  AlignedBuffer ping, pong;          // blocked activations of one image
  AlignedBuffer flat_in, flat_out;   // rows of the dense part, one per image
};

bool is_spatial(LayerKind kind) { return kind == LayerKind::Conv3x3 || kind == LayerKind::MaxPool2x2; }

std::string describe(const LayerShape& shape) {
  std::string text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + ")";
}

// Only used when a pre-activation output was asked for; `x < 0 ? 0 : x` keeps NaN as the
// fused kernels do. The zero border stays zero.
void relu_in_place(BlockedImage& image) {
  float* data = image.data;
  const std::size_t size = image.size();
  for (std::size_t i = 0; i < size; ++i) data[i] = data[i] < 0.0f ? 0.0f : data[i];
}

std::size_t elements(const LayerShape& shape) {
  std::size_t n = 1;
  for (int d : shape) n *= std::size_t(d);
  return n;
}

}  // namespace

Network::Network(int input_channels, ConvAlgorithm algorithm) : input_channels_(input_channels), algorithm_(algorithm) {
  if (input_channels <= 0) throw std::invalid_argument("input_channels must be positive");
}

int Network::add_layer(Layer layer) {
  const bool flat_so_far = std::any_of(layers_.begin(), layers_.end(), [](const Layer& l) { return !is_spatial(l.kind); });
  if (is_spatial(layer.kind) && flat_so_far)
    throw std::invalid_argument("a convolution or pooling layer cannot follow a flatten, global pooling or dense layer");
  if ((layer.kind == LayerKind::Flatten || layer.kind == LayerKind::GlobalPool) && flat_so_far)
    throw std::invalid_argument("the network is already flat");
  if (layer.kind == LayerKind::Dense && !flat_so_far)
    throw std::invalid_argument("a dense layer needs a flatten or global pooling layer before it");
  layers_.push_back(std::move(layer));
  return int(layers_.size()) - 1;
}

int Network::add_conv3x3(int filters, Activation activation) {
  if (filters <= 0) throw std::invalid_argument("filters must be positive");
  if (activation == Activation::Softmax) throw std::invalid_argument("softmax is only supported after a dense layer");
  Layer layer{LayerKind::Conv3x3};
  // Pooling keeps the channel count, so the input is whatever the last convolution made.
  layer.in_channels = input_channels_;
  for (auto it = layers_.rbegin(); it != layers_.rend(); ++it)
    if (it->kind == LayerKind::Conv3x3) {
      layer.in_channels = it->out_channels;
      break;
    }
  layer.out_channels = filters;
  layer.activation = activation;
  if (runs_winograd(layer))
    layer.winograd_weights.resize(packed_winograd_size(layer.in_channels, filters), /*zeroed=*/false);
  else
    layer.weights.resize(packed_conv3x3_size(layer.in_channels, filters), /*zeroed=*/false);
  layer.bias.resize(std::size_t(round_up_to_block(filters)));
  return add_layer(std::move(layer));
}

int Network::add_max_pool2x2() { return add_layer(Layer{LayerKind::MaxPool2x2}); }
int Network::add_flatten() { return add_layer(Layer{LayerKind::Flatten}); }

int Network::add_global_pool(GlobalPoolMode mode) {
  Layer layer{LayerKind::GlobalPool};
  layer.pool_mode = mode;
  return add_layer(std::move(layer));
}

int Network::add_dense(int in_features, int units, Activation activation) {
  if (in_features <= 0 || units <= 0) throw std::invalid_argument("dense sizes must be positive");
  Layer layer{LayerKind::Dense};
  layer.in_channels = in_features;
  layer.out_channels = units;
  layer.activation = activation;
  // Not zeroed here: set_dense_kernel_rows fills every row, and padding columns are zeroed below.
  layer.weights.resize(packed_dense_size(in_features, units), /*zeroed=*/units % kChannelBlock != 0);
  layer.bias.resize(std::size_t(round_up_to_block(units)));
  return add_layer(std::move(layer));
}

const Layer& Network::layer(int index) const {
  if (index < 0 || index >= layer_count()) throw std::out_of_range("layer index " + std::to_string(index) + " out of range");
  return layers_[std::size_t(index)];
}

void Network::check_index(int index, LayerKind expected) const {
  if (layer(index).kind != expected) throw std::invalid_argument("layer " + std::to_string(index) + " has another kind");
}

std::vector<LayerShape> Network::shapes(int height, int width) const {
  std::vector<LayerShape> result;
  int h = height, w = width, c = input_channels_;
  int features = 0;
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    const Layer& l = layers_[i];
    switch (l.kind) {
      case LayerKind::Conv3x3:
        c = l.out_channels;
        result.push_back({h, w, c});
        break;
      case LayerKind::MaxPool2x2:
        h /= 2;
        w /= 2;
        if (h < 1 || w < 1)
          throw std::invalid_argument("input " + std::to_string(height) + "x" + std::to_string(width) +
                                      " is too small: layer " + std::to_string(i) + " would pool it to nothing");
        result.push_back({h, w, c});
        break;
      case LayerKind::Flatten:
        features = h * w * c;
        result.push_back({features});
        break;
      case LayerKind::GlobalPool:
        features = c;
        result.push_back({features});
        break;
      case LayerKind::Dense:
        if (features != l.in_channels)
          throw std::invalid_argument("dense layer " + std::to_string(i) + " expects " + std::to_string(l.in_channels) +
                                      " input features but an input of " + std::to_string(height) + "x" +
                                      std::to_string(width) + " gives " + std::to_string(features));
        features = l.out_channels;
        result.push_back({features});
        break;
    }
  }
  return result;
}

void Network::set_conv3x3_weights(int index, const float* kernel_hwio, const float* bias) {
  check_index(index, LayerKind::Conv3x3);
  Layer& l = layers_[std::size_t(index)];
  if (runs_winograd(l)) {
    pack_winograd_f4x4(kernel_hwio, l.in_channels, l.out_channels, l.winograd_weights.data());
    const std::size_t count = std::size_t(9) * l.in_channels * l.out_channels;
    std::vector<float> recovered(count);
    unpack_winograd_f4x4(l.winograd_weights.data(), l.in_channels, l.out_channels, recovered.data());
    l.winograd_correction = correction_to(kernel_hwio, recovered.data(), count);
  } else {
    pack_conv3x3(kernel_hwio, l.in_channels, l.out_channels, l.weights.data());
  }
  std::copy(bias, bias + l.out_channels, l.bias.data());
  l.weights_loaded = true;
}

void Network::set_dense_kernel_rows(int index, int first_row, int row_count, const float* rows) {
  check_index(index, LayerKind::Dense);
  Layer& l = layers_[std::size_t(index)];
  if (first_row < 0 || row_count < 0 || first_row + row_count > l.in_channels)
    throw std::out_of_range("dense kernel rows out of range");
  pack_dense_rows(rows, first_row, row_count, l.in_channels, l.out_channels, l.weights.data());
  // Loaders write rows in order; the last slice completes the kernel.
  if (first_row + row_count == l.in_channels) l.weights_loaded = true;
}

void Network::set_dense_bias(int index, const float* bias) {
  check_index(index, LayerKind::Dense);
  Layer& l = layers_[std::size_t(index)];
  std::copy(bias, bias + l.out_channels, l.bias.data());
}

void Network::get_weights(int index, float* kernel, float* bias) const {
  const Layer& l = layer(index);
  if (l.has_weights() && !l.weights_loaded)
    throw std::logic_error("layer " + std::to_string(index) + " has no weights loaded");
  if (l.kind == LayerKind::Conv3x3 && runs_winograd(l)) {
    unpack_winograd_f4x4(l.winograd_weights.data(), l.in_channels, l.out_channels, kernel);
    apply_correction(l.winograd_correction, kernel, std::size_t(9) * l.in_channels * l.out_channels);
  } else if (l.kind == LayerKind::Conv3x3)
    unpack_conv3x3(l.weights.data(), l.in_channels, l.out_channels, kernel);
  else if (l.kind == LayerKind::Dense)
    unpack_dense(l.weights.data(), l.in_channels, l.out_channels, kernel);
  else
    throw std::invalid_argument("layer " + std::to_string(index) + " has no weights");
  std::copy(l.bias.data(), l.bias.data() + l.out_channels, bias);
}

void Network::forward(const float* images, int count, int height, int width,
                      const std::vector<OutputRequest>& outputs, int threads, const KernelTable& kernels) const {
  if (outputs.empty()) return;
  const std::vector<LayerShape> shapes = this->shapes(height, width);
  int last = -1;
  for (const OutputRequest& request : outputs) {
    const Layer& l = layer(request.layer);
    if (request.before_activation && l.kind != LayerKind::Conv3x3)
      throw std::invalid_argument("layer " + std::to_string(request.layer) +
                                  " is not a convolution: only convolutions have a pre-activation output");
    if (request.destination == nullptr) throw std::invalid_argument("an output request has no destination");
    last = std::max(last, request.layer);
  }
  for (int i = 0; i <= last; ++i)
    if (layers_[std::size_t(i)].has_weights() && !layers_[std::size_t(i)].weights_loaded)
      throw std::logic_error("layer " + std::to_string(i) + " has no weights loaded");

  // Destinations of layer i's output and of its pre-activation output, or nullptr.
  std::vector<float*> wanted(std::size_t(last) + 1, nullptr), wanted_before(std::size_t(last) + 1, nullptr);
  for (const OutputRequest& request : outputs)
    (request.before_activation ? wanted_before : wanted)[std::size_t(request.layer)] = request.destination;

  int spatial_end = 0;  // layers [0, spatial_end) run per image
  while (spatial_end <= last && is_spatial(layers_[std::size_t(spatial_end)].kind)) ++spatial_end;

  std::size_t scratch_size = blocked_image_size(input_channels_, height, width);
  for (int i = 0; i < spatial_end; ++i)
    scratch_size = std::max(scratch_size, blocked_image_size(shapes[i][2], shapes[i][0], shapes[i][1]));
  const bool has_flat_part = last >= spatial_end;
  std::size_t widest_flat = 0;
  for (int i = spatial_end; i <= last; ++i) widest_flat = std::max(widest_flat, std::size_t(round_up_to_block(shapes[i][0])));

  // Scratch is kept per calling thread: fresh buffers would cost page faults and kernel
  // zeroing of tens of MB on every call, a few percent of a batch-1 prediction.
  thread_local Workspace workspace;
  workspace.ping.ensure_capacity(scratch_size);
  workspace.pong.ensure_capacity(scratch_size);
  workspace.flat_in.ensure_capacity(std::size_t(count) * widest_flat);
  workspace.flat_out.ensure_capacity(std::size_t(count) * widest_flat);
  // Every kernel writes whole vectors and zero_border clears the border, so stale contents
  // never leak into a result.
  float* flat_in = workspace.flat_in.data();
  float* flat_out = workspace.flat_out.data();

  const std::size_t input_image = std::size_t(height) * width * input_channels_;
  for (int n = 0; n < count; ++n) {
    BlockedImage current{workspace.ping.data(), input_channels_, height, width};
    BlockedImage next{workspace.pong.data()};
    kernels.nhwc_to_blocked(images + n * input_image, current);
    for (int i = 0; i < spatial_end; ++i) {
      const Layer& l = layers_[std::size_t(i)];
      next.channels = shapes[i][2];
      next.height = shapes[i][0];
      next.width = shapes[i][1];
      zero_border(next);
      float* before_activation = wanted_before[std::size_t(i)];
      // The pre-activation output needs the sums before ReLU: run the kernel without it and
      // apply it afterwards, only when somebody asked.
      const bool relu = l.activation == Activation::Relu && before_activation == nullptr;
      if (l.kind == LayerKind::Conv3x3 && runs_winograd(l))
        kernels.conv3x3_winograd(current, l.winograd_weights.data(), l.bias.data(), relu, next, threads);
      else if (l.kind == LayerKind::Conv3x3)
        kernels.conv3x3(current, l.weights.data(), l.bias.data(), relu, next, threads);
      else
        kernels.max_pool2x2(current, next, threads);
      if (before_activation) {
        kernels.blocked_to_nhwc(next, before_activation + n * elements(shapes[i]));
        if (l.activation == Activation::Relu) relu_in_place(next);
      }
      if (float* dst = wanted[std::size_t(i)]) kernels.blocked_to_nhwc(next, dst + n * elements(shapes[i]));
      std::swap(current, next);
    }
    if (has_flat_part) {
      const Layer& l = layers_[std::size_t(spatial_end)];
      float* row = flat_in + std::size_t(n) * std::size_t(shapes[spatial_end][0]);
      // Flatten in Keras's (h, w, c) order, which is exactly NHWC.
      if (l.kind == LayerKind::Flatten)
        kernels.blocked_to_nhwc(current, row);
      else
        kernels.global_pool(current, l.pool_mode, row);
    }
  }
  if (!has_flat_part) return;

  // Flat rows are packed tightly: row stride = that layer's features.
  auto copy_out = [&](int i, const float* rows) {
    if (float* dst = wanted[std::size_t(i)]) std::memcpy(dst, rows, sizeof(float) * std::size_t(count) * shapes[i][0]);
  };
  copy_out(spatial_end, flat_in);
  for (int i = spatial_end + 1; i <= last; ++i) {
    const Layer& l = layers_[std::size_t(i)];
    const int units = l.out_channels;
    const int padded = round_up_to_block(units);
    kernels.dense(flat_in, count, l.in_channels, l.weights.data(), l.bias.data(), units,
                  l.activation == Activation::Relu, flat_out, threads);
    if (padded != units)  // drop the padding columns so rows are tight for the next layer
      for (int r = 0; r < count; ++r)
        std::memmove(flat_out + std::size_t(r) * units, flat_out + std::size_t(r) * padded,
                     sizeof(float) * std::size_t(units));
    if (l.activation == Activation::Softmax) softmax_rows(flat_out, count, units, units);
    copy_out(i, flat_out);
    std::swap(flat_in, flat_out);
  }
}

}  // namespace fastvgg
