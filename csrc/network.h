// The network: an ordered list of layers with packed weights, run in one call.
//
// Python describes the graph (names, shapes, which outputs to return); this class owns the
// weights in the kernels' layouts and runs a whole batch without returning to Python.
// Convolution and pooling run one image at a time (activations of one image stay small and
// warm in cache); the dense layers then run on the whole batch, so their weights are
// streamed from memory once per batch instead of once per image.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"
#include "tensor.h"

namespace fastvgg {

enum class LayerKind { Conv3x3, MaxPool2x2, Flatten, GlobalPool, Dense };
enum class Activation { Linear, Relu, Softmax };
// Fast: Winograd F(4x4,3x3) where it pays, ~3e-6 relative error per layer. Highest: direct
// convolution everywhere, for users who want the plain float32 sums.
enum class ConvAlgorithm { Fast, Highest };

// Winograd's GEMM depth is the input channel count: with 3 channels (block1_conv1) the
// transforms cost more than they save (bench/conv_layers.py: 1.7-2.1 ms direct against
// 2.7-4.6 ms Winograd on that layer); from one full channel block on it wins 2-2.8x.
inline bool winograd_pays(int in_channels) { return in_channels >= kChannelBlock; }

struct Layer {
  LayerKind kind;
  int in_channels = 0;   // conv: input channels; dense: input features
  int out_channels = 0;  // conv: filters; dense: units
  Activation activation = Activation::Linear;
  GlobalPoolMode pool_mode = GlobalPoolMode::Average;
  AlignedBuffer weights;  // packed (see weights_pack.cpp); empty for a layer that runs by Winograd
  AlignedBuffer winograd_weights;  // conv only, when the layer runs by Winograd (winograd.cpp)
  // With Winograd weights only, get_weights inverts the transform and applies this to return
  // the loaded kernel exactly, for a quarter of the memory of a second float copy.
  KernelCorrection winograd_correction;
  AlignedBuffer bias;     // padded to a whole channel block
  bool weights_loaded = false;

  bool has_weights() const { return kind == LayerKind::Conv3x3 || kind == LayerKind::Dense; }
};

// One output a caller asked for: a layer's output, or a convolution's output before its ReLU
// (perceptual losses want those; Keras has no way to give them).
struct OutputRequest {
  int layer = 0;
  bool before_activation = false;
  float* destination = nullptr;  // count x the layer's shape, NHWC or flat
};

// What a layer produces for one image: spatial layers {height, width, channels}, flat ones {features}.
using LayerShape = std::vector<int>;

class Network {
 public:
  explicit Network(int input_channels, ConvAlgorithm algorithm = ConvAlgorithm::Fast);
  ConvAlgorithm algorithm() const { return algorithm_; }

  int add_conv3x3(int filters, Activation activation);
  int add_max_pool2x2();
  int add_flatten();
  int add_global_pool(GlobalPoolMode mode);
  int add_dense(int in_features, int units, Activation activation);

  int layer_count() const { return int(layers_.size()); }
  const Layer& layer(int index) const;
  int input_channels() const { return input_channels_; }

  // Shapes of every layer's output for an input of height x width. Throws std::invalid_argument
  // when the input is too small or a dense layer's input size does not match.
  std::vector<LayerShape> shapes(int height, int width) const;

  void set_conv3x3_weights(int index, const float* kernel_hwio, const float* bias);
  // Dense kernels are large (fc1 is 411 MB): they arrive in row slices so the loader never
  // holds a second full copy.
  void set_dense_kernel_rows(int index, int first_row, int row_count, const float* rows);
  void set_dense_bias(int index, const float* bias);
  void get_weights(int index, float* kernel, float* bias) const;

  // Runs images (NHWC, float32) through the layers up to the deepest one requested and writes
  // each requested output for all images to its destination.
  void forward(const float* images, int count, int height, int width, const std::vector<OutputRequest>& outputs,
               int threads, const KernelTable& kernels) const;

 private:
  int add_layer(Layer layer);
  void check_index(int index, LayerKind expected) const;

  bool runs_winograd(const Layer& layer) const {
    return algorithm_ == ConvAlgorithm::Fast && winograd_pays(layer.in_channels);
  }

  int input_channels_;
  ConvAlgorithm algorithm_;
  std::vector<Layer> layers_;
};

}  // namespace fastvgg
