// The CUDA executor: a VGG-style graph's weights on the GPU and a whole batch run on the
// model's own stream. Plain C++: no CUDA type appears here, so the pybind11 module
// (module.cpp) is compiled by the host compiler and only executor.cu needs nvcc.
//
// executor.cu is also compiled by g++ with FASTVGG_CUDA_EMULATE, where "device" memory is host
// memory and every launch runs on the CPU grid emulator (emulator.h): the tests then run this
// same executor, kernel for kernel, without a GPU.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fastvgg::cuda {

// One op of the graph, as _core.Graph.describe() lists it.
struct OpSpec {
  enum class Kind { Conv3x3, MaxPool2x2, Flatten, GlobalPool, Dense } kind;
  int in_channels = 0;   // conv: input channels; dense: input features
  int out_channels = 0;  // conv: filters; dense: units
  int activation = 0;    // 0 linear, 1 relu, 2 softmax
  int pool_mode = 0;     // 0 average, 1 max
  int padding = 1;       // conv: 1 'same', 0 'valid'
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

  void set_conv3x3_weights(int index, const float* kernel_hwio, const float* bias);
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
void conv3x3(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio,
             const float* bias, int out_channels, int padding, int activation, bool pool, float* y, float* preactivation);
void max_pool2x2(const float* x, int images, int height, int width, int channels, float* y);
void global_pool(const float* x, int images, int height, int width, int channels, int mode, float* y);
// path: 0 chooses as the executor does, 1 forces the batched GEMM, 2 the bandwidth-bound path.
void dense(const float* x, int rows, int depth, const float* kernel, const float* bias, int units, int activation,
           int path, float* y);
void softmax(float* values, int rows, int cols);
void transpose(const float* x, int batch, int rows, int cols, float* y);
// Emulator only: the seed of the block order shuffle (a no-op on a GPU).
void set_block_order_seed(unsigned long long seed);
}  // namespace testing

}  // namespace fastvgg::cuda
