// The executor interface: prepares a graph's weights for its kernels and runs batches.
//
// The graph (graph.h) says what to compute; an executor owns everything about how: the
// weights packed in the layouts its kernel sets choose, its workspace, its threads. The CPU
// executor (cpu_executor.h) is one; the CUDA module builds another from the graph's
// description. Python talks to executors only through these calls.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "graph.h"

namespace fastvgg {

// How exactly the arithmetic follows a plain float32 network. The algorithm of each layer is
// the executor's choice within it.
enum class Precision {
  // float32 arithmetic, transforms allowed where they pay (Winograd F(4x4,3x3): ~3e-6
  // relative error per layer).
  Fast,
  // float32 sums in the order of a direct convolution everywhere.
  Highest,
  // bfloat16 weights and products summed in float32 (dense layers, the first convolution),
  // Winograd with 14-bit integer products elsewhere: ~2e-3 relative error on block5_pool.
  // get_weights gives the weights as the kernels use them (rounded), not as loaded.
  Bf16,
  // CPUs with AMX-BF16: every 3x3 convolution from 16 input channels on AMX tiles, activations
  // and weights each carried as two bf16 values (hi + lo), three exact products summed in
  // float32 (~5e-6 relative error per layer, ~1.2e-5 on block5_pool: about 4x fast's, while
  // running VGG16's convolutions ~1.5x faster on the Xeon of bench/results-xeon-amx.md).
  // Everything else as fast; get_weights gives the weights as loaded.
  Bf16x3,
};
const char* precision_name(Precision precision);
Precision parse_precision(const std::string& name);  // throws std::invalid_argument naming the choices

// One output a caller asked for: an op's output, or a convolution's output before its
// activation (perceptual losses want those; Keras has no way to give them).
struct OutputRequest {
  int op = 0;
  bool before_activation = false;
  float* destination = nullptr;  // count x the op's shape, NHWC or flat, caller-owned
};

class Executor {
 public:
  virtual ~Executor() = default;
  virtual const Graph& graph() const = 0;

  // Weights arrive in Keras's layouts; an executor packs them as its kernels want. Every
  // call checks the op index and kind and throws std::invalid_argument / std::out_of_range.
  virtual void set_conv3x3_weights(int op, const float* kernel_hwio, const float* bias) = 0;
  // Dense kernels are large (fc1 is 411 MB): they arrive in row slices so the loader never
  // holds a second full copy. The layer counts as loaded once every row and the bias arrived.
  virtual void set_dense_kernel_rows(int op, int first_row, int row_count, const float* rows) = 0;
  virtual void set_dense_bias(int op, const float* bias) = 0;
  virtual bool weights_loaded(int op) const = 0;
  // The weights as loaded, bit for bit, in Keras's layouts.
  virtual void get_weights(int op, float* kernel, float* bias) const = 0;

  // Runs `count` images (NHWC float32, height x width x the graph's input channels each)
  // through the ops up to the deepest one requested, writing each requested output for all
  // images straight to its destination.
  virtual void forward(const float* images, int count, int height, int width,
                       const std::vector<OutputRequest>& outputs) = 0;

  virtual std::size_t weights_bytes() const = 0;
};

// Checks a forward call against a graph before anything runs: indices, pre-activation
// requests, destinations, and that no op is requested twice. Returns the deepest op needed.
int check_output_requests(const Graph& graph, const std::vector<OutputRequest>& outputs);

}  // namespace fastvgg
