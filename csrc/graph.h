// The graph: what a network computes, apart from how and where it runs.
//
// A chain of ops with their sizes, the shapes they produce for an input size, and the checks
// that keep a chain meaningful (a dense layer needs flat input, a convolution spatial input).
// It holds no weights and no memory for activations: an executor (cpu_executor.h, the CUDA
// module) prepares its own weights for a graph and runs it. Any chain of the ops below runs,
// not only VGG's order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels.h"

namespace fastvgg {

// Conv: a 1x1 or 'valid' 3x3 convolution (Conv3x3 is VGG's 'same' one); Pool2x2: 2x2 average
// pooling, or max pooling with 'same' padding; Affine: per-channel x * scale + shift
// (BatchNormalization, Rescaling, Normalization); Elementwise: an activation on its own; PRelu:
// Keras's PReLU, x < 0 ? alpha * x : x with a learned alpha per channel, or per pixel and
// channel (prelu.cpp); Upsample: Keras's UpSampling2D, nearest, each pixel repeated
// size_height x size_width times (upsample.cpp). Affine, Elementwise and PRelu work in place,
// on images or on flat rows, wherever they stand in the chain.
enum class OpKind { Conv3x3, MaxPool2x2, Flatten, GlobalPool, Dense, Conv, Pool2x2, Affine, Elementwise, PRelu, Upsample };
constexpr int kOpKindCount = 11;
// Keras's activations; softmax over the last axis (an image's channels, a row's features). LeakyRelu is x < 0 ? negative_slope * x : x
// with the op's negative_slope (Keras's LeakyReLU layer, ReLU(negative_slope=...) and the
// "leaky_relu" activation). L2Normalize is Keras's UnitNormalization layer, on flat rows only
// and only as an op of its own (add_l2_normalize): each row times min(1 / ||row||_2,
// max_inverse_norm), where the cap is how Keras 3 (1e12) and tf.keras (1e6) keep a zero row finite.
// ClippedRelu is Keras's ReLU layer with a max_value or a threshold (and Keras 3's "relu6"):
// above the threshold x, clipped to [0, max_value] when there is a cap; at or below it
// -(negative_slope * (threshold - x)) (activation.cpp gives the rounding).
// HardSigmoid is Keras 3's, relu6(x + 3) / 6; HardSigmoidKeras2 tf.keras's (Keras 2's),
// clip(0.2 x + 0.5, 0, 1): the same name meant another function before Keras 3.
enum class Activation {
  Linear, Relu, Softmax, Sigmoid, Tanh, Elu, Selu, Gelu, Swish, Softplus, LeakyRelu, L2Normalize, ClippedRelu,
  Softsign, Exponential, Mish, HardSigmoid, HardSigmoidKeras2, HardSilu
};
constexpr int kActivationCount = 19;

struct Op {
  OpKind kind;
  int in_channels = 0;   // conv: input channels; dense: input features; others: 0
  int out_channels = 0;  // conv: filters; dense: units; others: 0
  Activation activation = Activation::Linear;
  GlobalPoolMode pool_mode = GlobalPoolMode::Average;  // GlobalPool, Pool2x2
  int kernel_size = 3;        // Conv: 1 or 3
  bool same_padding = false;  // Conv (3x3 only) and Pool2x2: Keras's 'same', else 'valid'
  bool on_image = false;      // Affine, Elementwise: set by the graph, true before the chain turns flat
  float negative_slope = 0.0f;  // LeakyRelu's and ClippedRelu's slope, a finite float; 0 for the others
  float max_inverse_norm = 0.0f;  // L2Normalize's cap on 1 / ||row||, finite and > 0; 0 for the others
  float max_value = kNoCap;  // ClippedRelu's cap, >= 0; infinity (kNoCap) for the others
  float threshold = 0.0f;  // ClippedRelu's, finite; 0 for the others

  // PRelu's alpha: its height and width, each 1 (shared by every row or column of the image, as
  // Keras's shared_axes makes it) or the image's own, which the graph then requires; 1 on flat rows.
  int alpha_height = 1;
  int alpha_width = 1;
  // Upsample's factors: each pixel becomes size_height x size_width pixels; 1 for the others.
  int size_height = 1;
  int size_width = 1;

  ActivationParams activation_params() const { return {negative_slope, max_value, threshold}; }

  bool has_weights() const {
    return kind == OpKind::Conv3x3 || kind == OpKind::Dense || kind == OpKind::Conv || kind == OpKind::Affine ||
           kind == OpKind::PRelu;
  }
  bool is_convolution() const { return kind == OpKind::Conv3x3 || kind == OpKind::Conv; }
  bool is_spatial() const {
    return kind == OpKind::Conv3x3 || kind == OpKind::MaxPool2x2 || kind == OpKind::Conv || kind == OpKind::Pool2x2 ||
           kind == OpKind::Upsample || (in_place() && on_image);
  }
  // Affine, Elementwise and PRelu overwrite their input instead of writing a new buffer.
  bool in_place() const { return kind == OpKind::Affine || kind == OpKind::Elementwise || kind == OpKind::PRelu; }
};

const char* op_kind_name(OpKind kind);
const char* activation_name(Activation activation);
const char* pool_mode_name(GlobalPoolMode mode);
// Throw std::invalid_argument naming the choices.
OpKind parse_op_kind(const std::string& name);
Activation parse_activation(const std::string& name);
GlobalPoolMode parse_pool_mode(const std::string& name);

// What an op produces for one image: spatial ops {height, width, channels}, flat ones {features}.
using OpShape = std::vector<int>;

// Largest sizes a graph accepts, so that every product of them fits the index types the
// kernels use (a whole image's floats in a std::ptrdiff_t, one side or channel count in int).
constexpr int kMaxChannels = 1 << 16;
constexpr int kMaxFeatures = 1 << 28;
constexpr int kMaxSide = 1 << 15;

// The add_* functions with an activation take its numbers (LeakyRelu's negative_slope,
// ClippedRelu's three); they refuse numbers that are not finite (a cap may be infinity, meaning
// none), a negative cap, and numbers other than the defaults for an activation that takes none.
class Graph {
 public:
  explicit Graph(int input_channels);

  int add_conv3x3(int filters, Activation activation, const ActivationParams& params = {});
  int add_max_pool2x2();
  int add_flatten();
  int add_global_pool(GlobalPoolMode mode);
  int add_dense(int in_features, int units, Activation activation, const ActivationParams& params = {});
  // A 1x1 convolution (kernel_size 1) or a 3x3 one with 'valid' (or 'same') padding.
  int add_conv(int kernel_size, int filters, bool same_padding, Activation activation,
               const ActivationParams& params = {});
  int add_pool2x2(GlobalPoolMode mode, bool same_padding);
  // x * scale + shift over `channels` channels (an image's) or features (a flat row's).
  int add_affine(int channels);
  int add_activation(Activation activation, const ActivationParams& params = {});
  // Keras's PReLU over `channels` channels (an image's) or features (a flat row's), with an
  // alpha of alpha_height x alpha_width x channels (see Op; both 1 on flat rows).
  int add_prelu(int channels, int alpha_height = 1, int alpha_width = 1);
  // Keras's UpSampling2D with interpolation="nearest".
  int add_upsample(int size_height, int size_width);
  // Keras's UnitNormalization on the flat rows (see Activation::L2Normalize).
  int add_l2_normalize(float max_inverse_norm);
  // Appends an op described by its fields (what describe() gives, what other executors rebuild from).
  int add(const Op& op);

  int op_count() const { return int(ops_.size()); }
  // Throws std::out_of_range for an index outside [0, op_count()).
  const Op& op(int index) const;
  const std::vector<Op>& ops() const { return ops_; }
  int input_channels() const { return input_channels_; }

  // Shapes of every op's output for an input of height x width. Throws std::invalid_argument
  // when the input is too small or too large, or a dense layer's input size does not match.
  std::vector<OpShape> shapes(int height, int width) const;

 private:
  int append(Op op);
  int current_channels() const;  // of an image at the end of the chain so far
  bool flat() const;

  int input_channels_;
  std::vector<Op> ops_;
};

// Elements of one image's output of that shape.
std::size_t shape_elements(const OpShape& shape);

}  // namespace fastvgg
