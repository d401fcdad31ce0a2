// The CUDA executor: a graph's weights on the GPU and a whole batch run on the model's own
// stream. It runs every op kind and activation of csrc/graph.h, as the CPU executor does:
// VGG's ops and those fine-tuned models add (1x1 and 'valid' 3x3 convolutions, 2x2 average and
// 'same' pooling, per-channel affine maps, activations on their own or after any layer). Plain C++: no CUDA type appears here, so the pybind11 module
// (module.cpp) is compiled by the host compiler and only executor.cu needs nvcc.
//
// executor.cu is also compiled by g++ with FASTVGG_CUDA_EMULATE, where "device" memory is host
// memory and every launch runs on the CPU grid emulator (emulator.h): the tests then run this
// same executor, kernel for kernel, without a GPU.
#pragma once

#include <cmath>
#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fastvgg::cuda {

// One op of the graph, as _core.Graph.describe() lists it (csrc/graph.h's Op, field for field).
// New fields go last: code builds OpSpecs by aggregate initialisation.
struct OpSpec {
  // Conv3x3: VGG's 3x3 convolution ('same', or 'valid'); Conv: a 1x1 convolution, or a 3x3 one;
  // Pool2x2: 2x2 average pooling, or max pooling with 'same' padding; Affine: per-channel
  // x * scale + shift; Elementwise: an activation on its own. The last two work in place.
  enum class Kind {
    Conv3x3, MaxPool2x2, Flatten, GlobalPool, Dense, Conv, Pool2x2, Affine, Elementwise, PRelu, Upsample
  } kind;
  int in_channels = 0;   // conv: input channels; dense: input features; affine: = out_channels
  int out_channels = 0;  // conv: filters; dense: units; affine: channels (on an image) or features
  int activation = 0;    // graph.h's Activation: 0 linear, 1 relu, 2 softmax, 3 sigmoid, 4 tanh,
                         // 5 elu, 6 selu, 7 gelu, 8 swish, 9 softplus, 10 leaky_relu, 11 l2_normalize,
                         // 12 clipped_relu, 13 softsign, 14 exponential, 15 mish, 16 hard_sigmoid,
                         // 17 hard_sigmoid_keras2, 18 hard_silu
  int pool_mode = 0;     // global pool, Pool2x2: 0 average, 1 max
  int padding = 1;       // convolutions, Pool2x2: 1 'same', 0 'valid'
  int kernel_size = 3;   // Conv: 1 or 3
  bool on_image = false; // Affine, Elementwise: set by the executor, true before the chain turns flat
  float negative_slope = 0.0f;  // leaky_relu's and clipped_relu's slope, finite; 0 for the other activations
  float max_inverse_norm = 0.0f;  // l2_normalize's cap on 1 / ||row||, finite and > 0; 0 for the others
  float max_value = INFINITY;  // clipped_relu's cap, >= 0 (infinity: none); infinity for the others
  float threshold = 0.0f;  // clipped_relu's, finite; 0 for the others
  int alpha_height = 1;  // PRelu's alpha: 1 (shared) or the image's height; 1 on flat rows
  int alpha_width = 1;   // likewise the width
  int size_height = 1;   // Upsample's factors (nearest neighbour); 1 for the others
  int size_width = 1;
};

struct OutputRequest {
  int layer = 0;
  bool before_activation = false;
  float* destination = nullptr;  // count x the layer's shape, NHWC or flat, host memory
};

// Whether a GPU can be used, and if not why (the CUDA runtime's own words).
std::pair<bool, std::string> device_status();
// "emulator" in the test build, "cuda" in the real one.
const char* backend_name();

class Executor {
 public:
  Executor(int input_channels, std::vector<OpSpec> ops);
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  int layer_count() const;
  int input_channels() const;
  const OpSpec& op(int index) const;
  // {h, w, c} for spatial outputs, {features} for flat ones; throws std::invalid_argument.
  std::vector<std::vector<int>> output_shapes(int height, int width) const;

  // A 3x3 convolution's (Conv3x3, or Conv of kernel_size 3) HWIO kernel and bias.
  void set_conv3x3_weights(int index, const float* kernel_hwio, const float* bias);
  // Any convolution's: (kernel_size, kernel_size, in, out) HWIO.
  void set_conv_weights(int index, const float* kernel_hwio, const float* bias);
  // An affine op's per-channel scale and shift (get_weights returns them as kernel and bias).
  void set_affine(int index, const float* scale, const float* shift);
  // A PRelu op's alpha, [alpha_height][alpha_width][channels] (get_weights: the kernel, and a zero bias).
  void set_prelu(int index, const float* alpha);
  void set_dense_kernel_rows(int index, int first_row, int row_count, const float* rows);
  void set_dense_bias(int index, const float* bias);
  void get_weights(int index, float* kernel, float* bias) const;
  bool weights_loaded(int index) const;
  std::size_t weights_nbytes() const;
  // Hold off every other thread's calls (forward included) while one thread replaces several
  // layers' weights, so no forward sees half of an update. Re-entrant for the holding thread.
  void begin_update();
  void end_update();
  std::string device_name() const;

  // Runs count NHWC images up to the deepest requested layer; safe to call from several
  // threads at once (they take turns on the executor's stream and workspace).
  void forward(const float* images, int count, int height, int width, const std::vector<OutputRequest>& outputs);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Single ops on host arrays (device buffers allocated, filled and read back per call), for
// the tests on the emulator and on a GPU.
namespace testing {
// activation: any but softmax (a fused pool: linear or relu only); preactivation may be null.
void conv3x3(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio,
             const float* bias, int out_channels, int padding, int activation, bool pool, float* y, float* preactivation);
// A 1x1 (kernel_size 1) or 3x3 convolution as the executor runs a Conv op.
void conv(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio, int kernel_size,
          const float* bias, int out_channels, int padding, int activation, float* y, float* preactivation);
// 2x2 pooling, mode 0 average / 1 max, padding 1 'same' / 0 'valid'.
void pool2x2(const float* x, int images, int height, int width, int channels, int mode, int padding, float* y);
// values[r][c] = values[r][c] * scale[c] + shift[c], in place. max_blocks > 0 caps the grid, so
// that small tensors run the kernels' grid-stride loops too.
void affine(float* values, long long rows, int channels, const float* scale, const float* shift, int max_blocks = 0);
// Nearest-neighbour upsampling of NHWC images by size_height x size_width into y.
void upsample(const float* x, int images, int height, int width, int channels, int size_height, int size_width,
              float* y, int max_blocks = 0);
// PReLU in place on `count` values of NHWC images (height x width x channels; 1 x 1 for flat rows).
void prelu(float* values, long long count, int height, int width, int channels, const float* alpha, int alpha_height,
           int alpha_width, int max_blocks = 0);
// y = activation(x) element-wise (any activation but softmax); negative_slope is leaky_relu's and
// clipped_relu's, max_value (infinity: no cap) and threshold clipped_relu's.
void activation(const float* x, long long count, int activation, float* y, int max_blocks = 0, float negative_slope = 0.0f,
                float max_value = INFINITY, float threshold = 0.0f);
void max_pool2x2(const float* x, int images, int height, int width, int channels, float* y);
void global_pool(const float* x, int images, int height, int width, int channels, int mode, float* y);
// path: 0 chooses as the executor does, 1 forces the batched GEMM, 2 the bandwidth-bound path.
// activation: any (softmax and the element-wise ones run after the GEMM, as in the executor).
void dense(const float* x, int rows, int depth, const float* kernel, const float* bias, int units, int activation,
           int path, float* y);
void softmax(float* values, int rows, int cols);
void transpose(const float* x, int batch, int rows, int cols, float* y);
// Emulator only: the seed of the block order shuffle (a no-op on a GPU).
void set_block_order_seed(unsigned long long seed);
}  // namespace testing

}  // namespace fastvgg::cuda
