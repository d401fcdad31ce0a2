// Host side of the CUDA backend: device memory, the executor's stream, pinned staging and the
// launches. Compiled by nvcc for fastvgg._cuda, and by g++ (-x c++ -DFASTVGG_CUDA_EMULATE) for
// the tests' emulated module, where device memory is host memory and launches run on the CPU
// grid emulator. Everything specific to one of the two sits in the `device` namespace below.
#include "executor.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>

#include "kernels/activation.cuh"
#include "kernels/affine.cuh"
#include "kernels/prelu.cuh"
#include "kernels/upsample.cuh"
#include "kernels/conv3x3.cuh"
#include "kernels/dense.cuh"
#include "kernels/layout.cuh"
#include "kernels/pool.cuh"
#include "kernels/softmax.cuh"

#if defined(FASTVGG_CUDA_EMULATE) == defined(__CUDACC__)
#error "compile executor.cu either with nvcc, or with g++ -x c++ -DFASTVGG_CUDA_EMULATE"
#endif

namespace fastvgg::cuda {
namespace device {

#if defined(__CUDACC__)
using Stream = cudaStream_t;

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")");
}

float* allocate(std::size_t count) {
  void* p = nullptr;
  if (count) check(cudaMalloc(&p, count * sizeof(float)), "cudaMalloc");
  return static_cast<float*>(p);
}
void release(float* p) { cudaFree(p); }  // never throws: runs in destructors
float* allocate_pinned(std::size_t count) {
  void* p = nullptr;
  if (count) check(cudaMallocHost(&p, count * sizeof(float)), "cudaMallocHost");
  return static_cast<float*>(p);
}
void release_pinned(float* p) { cudaFreeHost(p); }
void to_device(float* dst, const float* src, std::size_t count, Stream s) {
  check(cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyHostToDevice, s), "copy to the GPU");
}
void to_host(float* dst, const float* src, std::size_t count, Stream s) {
  check(cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyDeviceToHost, s), "copy from the GPU");
}
void synchronize(Stream s) { check(cudaStreamSynchronize(s), "cudaStreamSynchronize"); }
Stream create_stream() {
  Stream s;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  return s;
}
void destroy_stream(Stream s) { cudaStreamDestroy(s); }
int current_device() {
  int d = 0;
  check(cudaGetDevice(&d), "cudaGetDevice");
  return d;
}
void use_device(int d) { check(cudaSetDevice(d), "cudaSetDevice"); }

#define FASTVGG_LAUNCH(kernel, geometry, stream, ...)                                 \
  do {                                                                                \
    const LaunchGeometry launch_geometry_ = (geometry);                               \
    kernel<<<launch_geometry_.grid, launch_geometry_.block, 0, stream>>>(__VA_ARGS__); \
    device::check(cudaGetLastError(), #kernel);                                       \
  } while (0)

#else  // the emulator: device memory is host memory, a stream is nothing
using Stream = int;
float* allocate(std::size_t count) { return count ? new float[count] : nullptr; }
void release(float* p) { delete[] p; }
float* allocate_pinned(std::size_t count) { return allocate(count); }
void release_pinned(float* p) { release(p); }
void to_device(float* dst, const float* src, std::size_t count, Stream) { std::memcpy(dst, src, count * sizeof(float)); }
void to_host(float* dst, const float* src, std::size_t count, Stream) { std::memcpy(dst, src, count * sizeof(float)); }
void synchronize(Stream) {}
Stream create_stream() { return 0; }
void destroy_stream(Stream) {}
int current_device() { return 0; }
void use_device(int) {}

#define FASTVGG_LAUNCH(kernel, geometry, stream, ...)                                                   \
  do {                                                                                                  \
    const LaunchGeometry launch_geometry_ = (geometry);                                                 \
    (void)(stream);                                                                                     \
    fastvgg::emulator::launch(launch_geometry_.grid, launch_geometry_.block, [&] { kernel(__VA_ARGS__); }); \
  } while (0)
#endif

// A growable device (or pinned host) buffer of floats that frees itself.
template <float* (*Allocate)(std::size_t), void (*Release)(float*)>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::size_t count) { reserve(count); }
  ~Buffer() { Release(data_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& other) noexcept : data_(other.data_), capacity_(other.capacity_) {
    other.data_ = nullptr;
    other.capacity_ = 0;
  }
  // Grows (contents lost) to hold at least count floats.
  void reserve(std::size_t count) {
    if (count <= capacity_) return;
    Release(data_);
    data_ = nullptr;
    capacity_ = 0;
    data_ = Allocate(count);
    capacity_ = count;
  }
  float* data() const { return data_; }
  std::size_t capacity() const { return capacity_; }

 private:
  float* data_ = nullptr;
  std::size_t capacity_ = 0;
};
using DeviceBuffer = Buffer<allocate, release>;
using PinnedBuffer = Buffer<allocate_pinned, release_pinned>;

}  // namespace device

using device::DeviceBuffer;
using device::PinnedBuffer;

// Launch wrappers: the one place each op's problem becomes a launch.
namespace {

void run_conv3x3(const Conv3x3Problem& p, device::Stream stream) {
  if (p.pool && p.preactivation) throw std::logic_error("conv3x3: a fused pool has no pre-activation output");
  if (conv3x3_gemm_rows(p) > 0) FASTVGG_LAUNCH(conv3x3_kernel, conv3x3_geometry(p), stream, p);
}

void run_max_pool2x2(const MaxPool2x2Problem& p, device::Stream stream) {
  if (max_pool2x2_outputs(p) > 0) FASTVGG_LAUNCH(max_pool2x2_kernel, max_pool2x2_geometry(p), stream, p);
}

void run_global_pool(const GlobalPoolProblem& p, device::Stream stream) {
  FASTVGG_LAUNCH(global_pool_kernel, global_pool_geometry(p), stream, p);
}

bool gemv_pays(int rows) { return rows <= kGemvMaxRows; }

void run_dense(const DenseProblem& p, bool bandwidth_path, DeviceBuffer& workspace, device::Stream stream) {
  if (bandwidth_path) {
    if (p.rows > kGemvMaxRows) throw std::logic_error("dense: the bandwidth-bound path takes at most 4 rows");
    workspace.reserve(gemv_workspace_floats(p));
    float* partial = workspace.data();
    FASTVGG_LAUNCH(dense_gemv_partial_kernel, dense_gemv_partial_geometry(p), stream, p, partial);
    FASTVGG_LAUNCH(dense_gemv_finish_kernel, dense_gemv_finish_geometry(p), stream, p, partial);
  } else {
    FASTVGG_LAUNCH(dense_gemm_kernel, dense_gemm_geometry(p), stream, p);
  }
}

void run_softmax(const SoftmaxProblem& p, device::Stream stream) {
  FASTVGG_LAUNCH(softmax_kernel, softmax_geometry(p), stream, p);
}

void run_l2_normalize(const L2NormalizeProblem& p, device::Stream stream) {
  if (p.rows > 0) FASTVGG_LAUNCH(l2_normalize_kernel, l2_normalize_geometry(p), stream, p);
}

void run_transpose(const TransposeProblem& p, device::Stream stream) {
  FASTVGG_LAUNCH(transpose_kernel, transpose_geometry(p), stream, p);
}

void run_window_pool(const Pool2x2Problem& p, device::Stream stream) {
  if (window_pool_outputs(p) > 0) FASTVGG_LAUNCH(window_pool_kernel, window_pool_geometry(p), stream, p);
}

// max_blocks: 0 for the default grid; the tests pass a few to run the grid-stride loops.
void run_affine(const AffineProblem& p, device::Stream stream, long long max_blocks = 0) {
  if (affine_count(p) > 0) FASTVGG_LAUNCH(affine_kernel, affine_geometry(p, max_blocks), stream, p);
}

void run_upsample(const UpsampleProblem& p, device::Stream stream, long long max_blocks = 0) {
  if (upsample_outputs(p) > 0) FASTVGG_LAUNCH(upsample_kernel, upsample_geometry(p, max_blocks), stream, p);
}

void run_prelu(const PReluProblem& p, device::Stream stream, long long max_blocks = 0) {
  if (p.count > 0) FASTVGG_LAUNCH(prelu_kernel, prelu_geometry(p, max_blocks), stream, p);
}

void run_activation(const ActivationProblem& p, device::Stream stream, long long max_blocks = 0) {
  if (p.activation == kSoftmax || p.activation == kL2Normalize)
    throw std::logic_error("softmax and l2_normalize are not element-wise");
  if (p.activation != kLinear && p.count > 0)
    FASTVGG_LAUNCH(activation_kernel, activation_geometry(p, max_blocks), stream, p);
}

// The activations the GEMM epilogues apply (see kernels/activation.cuh for why only these);
// the others run after the GEMM, on its linear output.
bool fused_activation(int activation) { return activation == kLinear || activation == kRelu; }
int kernel_activation(int activation) { return activation == kRelu ? kRelu : kLinear; }

constexpr long long kMaxGemmRows = 2147483647;  // DenseProblem::rows is an int

// A 1x1 convolution on NHWC data is a dense layer applied to every pixel: the (1, 1, in, out)
// kernel is the (in, out) matrix the dense kernels read, and the pixels are the rows.
DenseProblem conv1x1_problem(const float* input, const float* kernel, const float* bias, float* output,
                             float* preactivation, long long pixels, int in_channels, int out_channels, int activation) {
  if (pixels > kMaxGemmRows) throw std::invalid_argument("too many pixels for one call; split the batch");
  return DenseProblem{input, kernel, bias, output, preactivation, int(pixels), in_channels, out_channels,
                      kernel_activation(activation)};
}

}  // namespace

// ------------------------------------------------------------------------------------------
namespace {
bool has_weights(OpSpec::Kind kind) {
  return kind == OpSpec::Kind::Conv3x3 || kind == OpSpec::Kind::Conv || kind == OpSpec::Kind::Dense ||
         kind == OpSpec::Kind::Affine || kind == OpSpec::Kind::PRelu;
}
bool is_convolution(OpSpec::Kind kind) { return kind == OpSpec::Kind::Conv3x3 || kind == OpSpec::Kind::Conv; }
}  // namespace

struct Executor::Impl {
  struct Layer {
    OpSpec spec;
    DeviceBuffer kernel, bias;  // an affine map: scale and shift; a prelu: alpha, and a zero bias
    bool kernel_loaded = false, bias_loaded = false;
  };
  int input_channels = 0;
  int device_id = 0;
  std::vector<Layer> layers;
  device::Stream stream{};
  // Workspace and weights, guarded by run_mutex: activations ping-pong between two buffers.
  // Recursive: a thread inside begin_update()/end_update() still calls set_* and forward.
  std::recursive_mutex run_mutex;
  DeviceBuffer activations[2], preactivation, input, dense_workspace;
  PinnedBuffer staging;

  ~Impl() { device::destroy_stream(stream); }

  std::size_t kernel_count(const OpSpec& s) const {
    switch (s.kind) {
      case OpSpec::Kind::Conv3x3: return std::size_t(9) * s.in_channels * s.out_channels;
      case OpSpec::Kind::Conv: return std::size_t(s.kernel_size) * s.kernel_size * s.in_channels * s.out_channels;
      case OpSpec::Kind::Affine: return std::size_t(s.out_channels);
      case OpSpec::Kind::PRelu: return std::size_t(s.alpha_height) * s.alpha_width * s.out_channels;
      default: return std::size_t(s.in_channels) * s.out_channels;
    }
  }
  Layer& at(int index) {
    if (index < 0 || index >= int(layers.size())) throw std::out_of_range("layer index out of range");
    return layers[std::size_t(index)];
  }
  Layer& weighted(int index, OpSpec::Kind kind, const char* what) {
    Layer& layer = at(index);
    if (layer.spec.kind != kind)
      throw std::invalid_argument(std::string("layer ") + std::to_string(index) + " is not a " + what + " layer");
    return layer;
  }
  Layer& convolution(int index, int kernel_size) {
    Layer& layer = at(index);
    const OpSpec& s = layer.spec;
    if (!is_convolution(s.kind) || (kernel_size && s.kernel_size != kernel_size))
      throw std::invalid_argument("layer " + std::to_string(index) + " is not a " +
                                  (kernel_size == 3 ? "3x3 convolution" : "convolution") + " layer");
    return layer;
  }
};

namespace {
constexpr int kMaxGridY = 65535;  // CUDA's limit on gridDim.y and gridDim.z
constexpr int kMaxFeatures = 1 << 28;  // csrc/graph.h's limit on flat rows

std::vector<OpSpec> validated(int input_channels, std::vector<OpSpec> ops) {
  if (input_channels < 1 || input_channels > (1 << 16)) throw std::invalid_argument("input_channels must be in [1, 65536]");
  int channels = input_channels;
  bool flat = false;
  for (std::size_t i = 0; i < ops.size(); ++i) {
    OpSpec& op = ops[i];
    const std::string where = "op " + std::to_string(i) + ": ";
    if (op.activation < 0 || op.activation >= kActivationCount) throw std::invalid_argument(where + "unknown activation");
    if (!std::isfinite(op.negative_slope) ||
        (op.negative_slope != 0.0f && op.activation != kLeakyRelu && op.activation != kClippedRelu))
      throw std::invalid_argument(where + "negative_slope must be finite, and 0 unless the activation is leaky_relu or "
                                          "clipped_relu");
    if (std::isnan(op.max_value) || op.max_value < 0.0f || !std::isfinite(op.threshold) ||
        (op.activation != kClippedRelu && (op.max_value != INFINITY || op.threshold != 0.0f)))
      throw std::invalid_argument(where + "max_value must be >= 0 (infinity: no cap) and threshold finite, both only "
                                          "for clipped_relu");
    if (op.activation == kL2Normalize ? !(std::isfinite(op.max_inverse_norm) && op.max_inverse_norm > 0.0f)
                                      : op.max_inverse_norm != 0.0f)
      throw std::invalid_argument(where + "max_inverse_norm must be finite and above 0 for l2_normalize, 0 otherwise");
    if (op.activation == kL2Normalize && op.kind != OpSpec::Kind::Elementwise)
      throw std::invalid_argument(where + "l2_normalize is an op of its own on flat rows, not a layer's activation");
    switch (op.kind) {
      case OpSpec::Kind::Conv3x3:
      case OpSpec::Kind::Conv:
        if (flat) throw std::invalid_argument(where + "a convolution cannot follow a flat output");
        if (op.out_channels < 1 || op.out_channels > (1 << 16)) throw std::invalid_argument(where + "filters out of range");
        if (op.padding != 0 && op.padding != 1) throw std::invalid_argument(where + "padding must be 'same' or 'valid'");
        if (op.kind == OpSpec::Kind::Conv3x3) op.kernel_size = 3;
        if (op.kernel_size != 1 && op.kernel_size != 3) throw std::invalid_argument(where + "kernel_size must be 1 or 3");
        if (op.kernel_size == 1) op.padding = 1;  // 'same' and 'valid' are one thing for a 1x1 kernel
        op.in_channels = channels;
        channels = op.out_channels;
        break;
      case OpSpec::Kind::Upsample:
        if (flat) throw std::invalid_argument(where + "an upsampling cannot follow a flat output");
        if (op.size_height < 1 || op.size_width < 1 || op.size_height > (1 << 15) || op.size_width > (1 << 15))
          throw std::invalid_argument(where + "size_height and size_width must be in [1, 32768]");
        if (op.activation != kLinear) throw std::invalid_argument(where + "an upsampling has no activation");
        op.in_channels = op.out_channels = channels;
        break;
      case OpSpec::Kind::MaxPool2x2:
      case OpSpec::Kind::Pool2x2:
        if (flat) throw std::invalid_argument(where + "a pooling cannot follow a flat output");
        if (op.kind == OpSpec::Kind::Pool2x2 &&
            ((op.pool_mode != 0 && op.pool_mode != 1) || (op.padding != 0 && op.padding != 1)))
          throw std::invalid_argument(where + "pool_mode must be 'avg' or 'max' and padding 'same' or 'valid'");
        op.in_channels = op.out_channels = channels;
        break;
      case OpSpec::Kind::Flatten:
      case OpSpec::Kind::GlobalPool:
        if (flat) throw std::invalid_argument(where + "the output is already flat");
        op.in_channels = op.out_channels = channels;
        flat = true;
        break;
      case OpSpec::Kind::Dense:
        if (!flat) throw std::invalid_argument(where + "a dense layer needs a flat input (flatten or global pool first)");
        // Grid limits: units in 64-wide tiles on grid.y, depth in 256-long slices on grid.y.
        if (op.in_channels < 1 || op.in_channels > kMaxGridY * kGemvSlice || op.out_channels < 1 ||
            op.out_channels > kMaxGridY * kGemmTileCols)
          throw std::invalid_argument(where + "dense sizes out of range");
        break;
      case OpSpec::Kind::Affine:
      case OpSpec::Kind::PRelu: {  // per-channel maps, in place
        const std::string what = op.kind == OpSpec::Kind::Affine ? "an affine map" : "a prelu";
        // The features of flat rows depend on the input size: output_shapes checks them.
        op.on_image = !flat;
        if (op.out_channels < 1 || op.out_channels > kMaxFeatures) throw std::invalid_argument(where + "channels out of range");
        if (op.on_image && op.out_channels != channels)
          throw std::invalid_argument(where + what + " of " + std::to_string(op.out_channels) +
                                      " channels cannot follow a layer of " + std::to_string(channels) + " channels");
        if (op.kind == OpSpec::Kind::PRelu &&
            (op.alpha_height < 1 || op.alpha_width < 1 || op.alpha_height > (1 << 15) || op.alpha_width > (1 << 15) ||
             (!op.on_image && (op.alpha_height != 1 || op.alpha_width != 1))))
          throw std::invalid_argument(where + "a prelu's alpha_height and alpha_width must be 1 or the image's (1 on "
                                              "flat rows)");
        if (op.activation != kLinear) throw std::invalid_argument(where + what + " has no activation");
        op.in_channels = op.out_channels;
        break;
      }
      case OpSpec::Kind::Elementwise:
        op.on_image = !flat;
        if (op.on_image && op.activation == kL2Normalize)
          throw std::invalid_argument(where + "l2_normalize on an image is not supported: it applies to flat rows");
        op.in_channels = op.out_channels = op.on_image ? channels : 0;
        break;
      default:
        throw std::invalid_argument(where + "unknown op kind");
    }
  }
  return ops;
}
}  // namespace

Executor::Executor(int input_channels, std::vector<OpSpec> ops) : impl_(new Impl) {
  std::vector<OpSpec> checked = validated(input_channels, std::move(ops));
  const auto [usable, reason] = device_status();
  if (!usable) throw std::runtime_error("the CUDA executor cannot start: " + reason);
  impl_->input_channels = input_channels;
  impl_->device_id = device::current_device();
  impl_->stream = device::create_stream();
  impl_->layers.resize(checked.size());
  for (std::size_t i = 0; i < checked.size(); ++i) {
    Impl::Layer& layer = impl_->layers[i];
    layer.spec = checked[i];
    if (has_weights(layer.spec.kind)) {
      layer.kernel.reserve(impl_->kernel_count(layer.spec));
      layer.bias.reserve(std::size_t(layer.spec.out_channels));
    }
  }
}

Executor::~Executor() = default;

int Executor::layer_count() const { return int(impl_->layers.size()); }
int Executor::input_channels() const { return impl_->input_channels; }
const OpSpec& Executor::op(int index) const {
  if (index < 0 || index >= layer_count()) throw std::out_of_range("layer index out of range");
  return impl_->layers[std::size_t(index)].spec;
}

std::vector<std::vector<int>> Executor::output_shapes(int height, int width) const {
  if (height < 1 || width < 1) throw std::invalid_argument("the input must be at least 1x1");
  std::vector<std::vector<int>> shapes;
  int h = height, w = width, c = impl_->input_channels;
  long long features = -1;  // set once the output is flat
  for (std::size_t i = 0; i < impl_->layers.size(); ++i) {
    const OpSpec& op = impl_->layers[i].spec;
    const std::string where = "op " + std::to_string(i) + ": ";
    switch (op.kind) {
      case OpSpec::Kind::Conv3x3:
      case OpSpec::Kind::Conv:
        if (op.padding == 0 && op.kernel_size == 3) {
          h -= 2;
          w -= 2;
          if (h < 1 || w < 1) throw std::invalid_argument(where + "the image is too small for a 'valid' 3x3 convolution");
        }
        c = op.out_channels;
        shapes.push_back({h, w, c});
        break;
      case OpSpec::Kind::Upsample:
        if (static_cast<long long>(h) * op.size_height > (1 << 15) || static_cast<long long>(w) * op.size_width > (1 << 15))
          throw std::invalid_argument(where + "the upsampled image would be larger than 32768 pixels a side");
        h *= op.size_height;
        w *= op.size_width;
        shapes.push_back({h, w, c});
        break;
      case OpSpec::Kind::MaxPool2x2:
      case OpSpec::Kind::Pool2x2: {
        const bool same = op.kind == OpSpec::Kind::Pool2x2 && op.padding == 1;
        h = same ? (h + 1) / 2 : h / 2;
        w = same ? (w + 1) / 2 : w / 2;
        if (h < 1 || w < 1) throw std::invalid_argument(where + "the image is too small for another 2x2 pooling");
        shapes.push_back({h, w, c});
        break;
      }
      case OpSpec::Kind::Flatten:
        features = static_cast<long long>(h) * w * c;
        if (features > (1 << 30)) throw std::invalid_argument(where + "too many features");
        shapes.push_back({int(features)});
        break;
      case OpSpec::Kind::GlobalPool:
        features = c;
        shapes.push_back({c});
        break;
      case OpSpec::Kind::Dense:
        if (features != op.in_channels)
          throw std::invalid_argument(where + "the dense layer expects " + std::to_string(op.in_channels) +
                                      " input features, but this input size gives " + std::to_string(features));
        features = op.out_channels;
        shapes.push_back({op.out_channels});
        break;
      case OpSpec::Kind::Affine:
      case OpSpec::Kind::Elementwise:
      case OpSpec::Kind::PRelu:
        if (op.on_image) {
          if (op.kind == OpSpec::Kind::PRelu &&
              ((op.alpha_height != 1 && op.alpha_height != h) || (op.alpha_width != 1 && op.alpha_width != w)))
            throw std::invalid_argument(where + "the prelu has an alpha for " + std::to_string(op.alpha_height) + "x" +
                                        std::to_string(op.alpha_width) + " images, but this input size gives " +
                                        std::to_string(h) + "x" + std::to_string(w));
          shapes.push_back({h, w, c});
          break;
        }
        if (op.kind != OpSpec::Kind::Elementwise && features != op.out_channels)
          throw std::invalid_argument(where + (op.kind == OpSpec::Kind::Affine ? "the affine map" : "the prelu") +
                                      " has " + std::to_string(op.out_channels) +
                                      " features, but this input size gives " + std::to_string(features));
        shapes.push_back({int(features)});
        break;
    }
  }
  return shapes;
}

void Executor::set_conv3x3_weights(int index, const float* kernel_hwio, const float* bias) {
  impl_->convolution(index, 3);
  set_conv_weights(index, kernel_hwio, bias);
}

void Executor::set_conv_weights(int index, const float* kernel_hwio, const float* bias) {
  Impl::Layer& layer = impl_->convolution(index, 0);
  std::lock_guard<std::recursive_mutex> lock(impl_->run_mutex);
  device::use_device(impl_->device_id);
  device::to_device(layer.kernel.data(), kernel_hwio, impl_->kernel_count(layer.spec), impl_->stream);
  device::to_device(layer.bias.data(), bias, std::size_t(layer.spec.out_channels), impl_->stream);
  device::synchronize(impl_->stream);  // the caller's arrays may go away after we return
  layer.kernel_loaded = layer.bias_loaded = true;
}

void Executor::set_affine(int index, const float* scale, const float* shift) {
  Impl::Layer& layer = impl_->weighted(index, OpSpec::Kind::Affine, "affine map");
  std::lock_guard<std::recursive_mutex> lock(impl_->run_mutex);
  device::use_device(impl_->device_id);
  device::to_device(layer.kernel.data(), scale, std::size_t(layer.spec.out_channels), impl_->stream);
  device::to_device(layer.bias.data(), shift, std::size_t(layer.spec.out_channels), impl_->stream);
  device::synchronize(impl_->stream);
  layer.kernel_loaded = layer.bias_loaded = true;
}

void Executor::set_prelu(int index, const float* alpha) {
  Impl::Layer& layer = impl_->weighted(index, OpSpec::Kind::PRelu, "prelu");
  std::lock_guard<std::recursive_mutex> lock(impl_->run_mutex);
  device::use_device(impl_->device_id);
  const std::vector<float> zeros(std::size_t(layer.spec.out_channels), 0.0f);  // PReLU has no bias
  device::to_device(layer.kernel.data(), alpha, impl_->kernel_count(layer.spec), impl_->stream);
  device::to_device(layer.bias.data(), zeros.data(), zeros.size(), impl_->stream);
  device::synchronize(impl_->stream);
  layer.kernel_loaded = layer.bias_loaded = true;
}

void Executor::set_dense_kernel_rows(int index, int first_row, int row_count, const float* rows) {
  Impl::Layer& layer = impl_->weighted(index, OpSpec::Kind::Dense, "dense");
  if (first_row < 0 || row_count < 0 || first_row + row_count > layer.spec.in_channels)
    throw std::invalid_argument("dense kernel rows out of range");
  std::lock_guard<std::recursive_mutex> lock(impl_->run_mutex);
  device::use_device(impl_->device_id);
  const std::size_t units = std::size_t(layer.spec.out_channels);
  device::to_device(layer.kernel.data() + std::size_t(first_row) * units, rows, std::size_t(row_count) * units,
                    impl_->stream);
  device::synchronize(impl_->stream);
  if (first_row + row_count == layer.spec.in_channels) layer.kernel_loaded = true;
}

void Executor::set_dense_bias(int index, const float* bias) {
  Impl::Layer& layer = impl_->weighted(index, OpSpec::Kind::Dense, "dense");
  std::lock_guard<std::recursive_mutex> lock(impl_->run_mutex);
  device::use_device(impl_->device_id);
  device::to_device(layer.bias.data(), bias, std::size_t(layer.spec.out_channels), impl_->stream);
  device::synchronize(impl_->stream);
  layer.bias_loaded = true;
}

void Executor::get_weights(int index, float* kernel, float* bias) const {
  if (index < 0 || index >= layer_count()) throw std::out_of_range("layer index out of range");
  Impl::Layer& layer = impl_->layers[std::size_t(index)];
  if (!has_weights(layer.spec.kind)) throw std::invalid_argument("layer " + std::to_string(index) + " has no weights");
  std::lock_guard<std::recursive_mutex> lock(impl_->run_mutex);
  device::use_device(impl_->device_id);
  device::to_host(kernel, layer.kernel.data(), impl_->kernel_count(layer.spec), impl_->stream);
  device::to_host(bias, layer.bias.data(), std::size_t(layer.spec.out_channels), impl_->stream);
  device::synchronize(impl_->stream);
}

bool Executor::weights_loaded(int index) const {
  const OpSpec& spec = op(index);
  if (!has_weights(spec.kind)) return true;
  const Impl::Layer& layer = impl_->layers[std::size_t(index)];
  std::lock_guard<std::recursive_mutex> lock(impl_->run_mutex);
  return layer.kernel_loaded && layer.bias_loaded;
}

void Executor::begin_update() { impl_->run_mutex.lock(); }
void Executor::end_update() { impl_->run_mutex.unlock(); }

std::size_t Executor::weights_nbytes() const {
  std::size_t total = 0;
  for (const Impl::Layer& layer : impl_->layers)
    total += (layer.kernel.capacity() + layer.bias.capacity()) * sizeof(float);
  return total;
}

std::string Executor::device_name() const {
#if defined(__CUDACC__)
  cudaDeviceProp properties{};
  device::check(cudaGetDeviceProperties(&properties, impl_->device_id), "cudaGetDeviceProperties");
  return std::string(properties.name) + " (device " + std::to_string(impl_->device_id) + ", sm_" +
         std::to_string(properties.major) + std::to_string(properties.minor) + ")";
#else
  return "CPU grid emulator";
#endif
}

void Executor::forward(const float* images, int count, int height, int width, const std::vector<OutputRequest>& outputs) {
  if (count < 1) throw std::invalid_argument("forward needs at least one image");
  // Global pooling puts images on grid.y; predict() splits larger inputs into batches anyway.
  if (count > kMaxGridY) throw std::invalid_argument("forward takes at most 65535 images per call; split the batch");
  if (outputs.empty()) return;
  const std::vector<std::vector<int>> shapes = output_shapes(height, width);
  int deepest = -1;
  for (const OutputRequest& r : outputs) {
    if (r.layer < 0 || r.layer >= layer_count()) throw std::out_of_range("requested layer index out of range");
    deepest = std::max(deepest, r.layer);
  }
  auto elements = [&](int layer) {  // per image
    std::size_t n = 1;
    for (int d : shapes[std::size_t(layer)]) n *= std::size_t(d);
    return n;
  };
  auto requested = [&](int layer, bool before) {
    for (const OutputRequest& r : outputs)
      if (r.layer == layer && r.before_activation == before) return true;
    return false;
  };
  for (int i = 0; i <= deepest; ++i) {
    const Impl::Layer& layer = impl_->layers[std::size_t(i)];
    if (has_weights(layer.spec.kind) && !(layer.kernel_loaded && layer.bias_loaded))
      throw std::runtime_error("layer " + std::to_string(i) + " has no weights loaded yet");
    // A 1x1 convolution's pixels are the rows of a dense GEMM, an int there.
    if (layer.spec.kind == OpSpec::Kind::Conv && layer.spec.kernel_size == 1 &&
        static_cast<long long>(count) * shapes[std::size_t(i)][0] * shapes[std::size_t(i)][1] > kMaxGemmRows)
      throw std::invalid_argument("op " + std::to_string(i) + ": too many pixels for one call; split the batch");
  }

  const std::size_t input_floats = std::size_t(count) * height * width * impl_->input_channels;
  std::size_t largest = 0, largest_output = 0;
  for (int i = 0; i <= deepest; ++i) largest = std::max(largest, elements(i) * std::size_t(count));
  for (const OutputRequest& r : outputs) largest_output = std::max(largest_output, elements(r.layer) * std::size_t(count));

  std::lock_guard<std::recursive_mutex> lock(impl_->run_mutex);
  device::use_device(impl_->device_id);
  const device::Stream stream = impl_->stream;
  impl_->input.reserve(input_floats);
  impl_->activations[0].reserve(largest);
  impl_->activations[1].reserve(largest);
  impl_->preactivation.reserve(largest);
  impl_->staging.reserve(std::max(input_floats, largest_output));

  std::memcpy(impl_->staging.data(), images, input_floats * sizeof(float));
  device::to_device(impl_->input.data(), impl_->staging.data(), input_floats, stream);

  // Copies a device tensor into every request for it, through the pinned staging buffer.
  auto deliver = [&](int layer, bool before, const float* source) {
    const std::size_t n = elements(layer) * std::size_t(count);
    bool copied = false;
    for (const OutputRequest& r : outputs) {
      if (r.layer != layer || r.before_activation != before) continue;
      if (!copied) {
        device::to_host(impl_->staging.data(), source, n, stream);
        device::synchronize(stream);
        copied = true;
      }
      std::memcpy(r.destination, impl_->staging.data(), n * sizeof(float));
    }
  };
  // Layer i's activation (op: its spec) as a pass of its own, in place on its `rows` x `cols` values; the
  // values before it go to whoever asked for layer i's pre-activation output.
  auto activation_pass = [&](int i, const OpSpec& op, float* values, long long rows, int cols) {
    if (op.activation == kLinear) return;
    if (requested(i, true)) deliver(i, true, values);
    if (op.activation == kSoftmax) {
      // One block a row: a pixel's channels on an image (Keras's softmax over the last axis).
      if (rows > std::numeric_limits<int>::max())
        throw std::invalid_argument("softmax over more than 2^31 - 1 rows (pixels of the batch); use smaller batches");
      run_softmax(SoftmaxProblem{values, int(rows), cols}, stream);
    }
    else if (op.activation == kL2Normalize)
      run_l2_normalize(L2NormalizeProblem{values, int(rows), cols, op.max_inverse_norm}, stream);
    else
      run_activation(ActivationProblem{values, values, rows * cols, op.activation,
                                       ActivationNumbers{op.negative_slope, op.max_value, op.threshold}},
                     stream);
  };

  const float* current = impl_->input.data();
  int h = height, w = width, c = impl_->input_channels;
  int next_buffer = 0;
  for (int i = 0; i <= deepest; ++i) {
    const Impl::Layer& layer = impl_->layers[std::size_t(i)];
    const OpSpec& op = layer.spec;
    float* out = impl_->activations[next_buffer].data();
    const bool fused = fused_activation(op.activation);
    // The epilogue writes the pre-activation output beside the ReLU's; a pass activation
    // delivers it from the GEMM's linear output before it runs.
    float* preactivation = requested(i, true) && op.activation == kRelu ? impl_->preactivation.data() : nullptr;
    int produced = i;  // the last layer whose output `out` holds
    switch (op.kind) {
      case OpSpec::Kind::Conv3x3:
      case OpSpec::Kind::Conv: {
        const std::vector<int>& shape = shapes[std::size_t(i)];
        if (op.kernel_size == 1) {
          run_dense(conv1x1_problem(current, layer.kernel.data(), layer.bias.data(), out, preactivation,
                                    static_cast<long long>(count) * h * w, c, op.out_channels, op.activation),
                    gemv_pays(count * h * w), impl_->dense_workspace, stream);
        } else {
          Conv3x3Problem p{};
          p.input = current;
          p.kernel = layer.kernel.data();
          p.bias = layer.bias.data();
          p.output = out;
          p.preactivation = preactivation;
          p.images = count;
          p.in_height = h;
          p.in_width = w;
          p.in_channels = c;
          p.out_channels = op.out_channels;
          p.padding = op.padding;
          p.out_height = shape[0];
          p.out_width = shape[1];
          p.activation = kernel_activation(op.activation);
          // Fuse the following max pool unless someone wants this convolution's own output. Only
          // after a linear or ReLU epilogue: max-then-activate equals activate-then-max for a
          // monotone function, and gelu and swish are not monotone.
          const bool pool_next =
              fused && i + 1 <= deepest && impl_->layers[std::size_t(i) + 1].spec.kind == OpSpec::Kind::MaxPool2x2;
          p.pool = pool_next && !requested(i, false) && !requested(i, true);
          run_conv3x3(p, stream);
          if (p.pool) produced = i + 1;
        }
        if (preactivation) deliver(i, true, preactivation);
        if (!fused) activation_pass(i, op, out, static_cast<long long>(count) * shape[0] * shape[1], shape[2]);
        break;
      }
      case OpSpec::Kind::MaxPool2x2: {
        run_max_pool2x2(MaxPool2x2Problem{current, out, count, h, w, c}, stream);
        break;
      }
      case OpSpec::Kind::Upsample: {
        run_upsample(UpsampleProblem{current, out, count, h, w, c, op.size_height, op.size_width}, stream);
        break;
      }
      case OpSpec::Kind::Pool2x2: {
        const std::vector<int>& shape = shapes[std::size_t(i)];
        run_window_pool(Pool2x2Problem{current, out, count, h, w, c, shape[0], shape[1],
                                       op.pool_mode == 1 ? kGlobalMax : kGlobalAverage},
                        stream);
        break;
      }
      case OpSpec::Kind::Flatten:
        out = const_cast<float*>(current);  // NHWC is already Keras's flatten order
        break;
      case OpSpec::Kind::GlobalPool:
        run_global_pool(GlobalPoolProblem{current, out, count, h, w, c, op.pool_mode == 1 ? kGlobalMax : kGlobalAverage},
                        stream);
        break;
      case OpSpec::Kind::Dense: {
        DenseProblem p{current, layer.kernel.data(), layer.bias.data(), out, preactivation,
                       count, op.in_channels, op.out_channels, kernel_activation(op.activation)};
        run_dense(p, gemv_pays(count), impl_->dense_workspace, stream);
        if (preactivation) deliver(i, true, preactivation);
        if (!fused) activation_pass(i, op, out, count, op.out_channels);
        break;
      }
      case OpSpec::Kind::Affine: {
        out = const_cast<float*>(current);  // in place: the buffer is the executor's own
        const long long rows = op.on_image ? static_cast<long long>(count) * h * w : count;
        run_affine(AffineProblem{out, layer.kernel.data(), layer.bias.data(), rows, op.out_channels}, stream);
        break;
      }
      case OpSpec::Kind::PRelu: {
        out = const_cast<float*>(current);  // in place: the buffer is the executor's own
        const std::vector<int>& shape = shapes[std::size_t(i)];
        const int ph = op.on_image ? shape[0] : 1, pw = op.on_image ? shape[1] : 1;
        run_prelu(PReluProblem{out, layer.kernel.data(), static_cast<long long>(count) * ph * pw * op.out_channels, ph, pw,
                               op.out_channels, op.alpha_height, op.alpha_width},
                  stream);
        break;
      }
      case OpSpec::Kind::Elementwise: {
        out = const_cast<float*>(current);
        const std::vector<int>& shape = shapes[std::size_t(i)];
        if (op.on_image)
          activation_pass(i, op, out, static_cast<long long>(count) * shape[0] * shape[1], shape[2]);
        else
          activation_pass(i, op, out, count, shape[0]);
        break;
      }
    }
    if (requested(i, true) && op.activation == kLinear) deliver(i, true, out);  // linear: before = after
    deliver(produced, false, out);
    const std::vector<int>& shape = shapes[std::size_t(produced)];
    if (shape.size() == 3) {
      h = shape[0];
      w = shape[1];
      c = shape[2];
    }
    if (out != current) next_buffer ^= 1;
    current = out;
    i = produced;
  }
  device::synchronize(stream);
}

// ------------------------------------------------------------------------------------------
namespace testing {
namespace {
struct Scratch {  // device copies of host arrays for one call
  device::Stream stream = device::create_stream();
  std::vector<DeviceBuffer*> owned;
  ~Scratch() {
    for (DeviceBuffer* b : owned) delete b;
    device::destroy_stream(stream);
  }
  float* upload(const float* host, std::size_t count) {
    float* d = empty(count);
    device::to_device(d, host, count, stream);
    return d;
  }
  float* empty(std::size_t count) {
    owned.push_back(new DeviceBuffer(std::max<std::size_t>(count, 1)));
    return owned.back()->data();
  }
  void download(float* host, const float* d, std::size_t count) {
    device::to_host(host, d, count, stream);
    device::synchronize(stream);
  }
};

// After a convolution's GEMM, as the executor does it: the pre-activation output (from the
// epilogue's, or from the linear output before a pass activation runs on it), then the pass.
void finish_convolution(Scratch& s, float* output, const float* epilogue_preactivation, std::size_t outputs,
                        int activation, float* y, float* preactivation) {
  if (preactivation) s.download(preactivation, epilogue_preactivation ? epilogue_preactivation : output, outputs);
  if (!fused_activation(activation))
    run_activation(ActivationProblem{output, output, static_cast<long long>(outputs), activation}, s.stream);
  s.download(y, output, outputs);
}
}  // namespace

void conv3x3(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio,
             const float* bias, int out_channels, int padding, int activation, bool pool, float* y, float* preactivation) {
  if (activation == kSoftmax) throw std::invalid_argument("softmax on a convolution is not supported");
  if (pool && !fused_activation(activation))
    throw std::logic_error("conv3x3: a fused pool follows a linear or ReLU epilogue only");
  Scratch s;
  Conv3x3Problem p{};
  p.images = images;
  p.in_height = height;
  p.in_width = width;
  p.in_channels = in_channels;
  p.out_channels = out_channels;
  p.padding = padding;
  p.out_height = padding ? height : height - 2;
  p.out_width = padding ? width : width - 2;
  p.activation = kernel_activation(activation);
  p.pool = pool;
  const std::size_t outputs = std::size_t(images) * (pool ? (p.out_height / 2) * (p.out_width / 2) : p.out_height * p.out_width) *
                              std::size_t(out_channels);
  p.input = s.upload(x, std::size_t(images) * height * width * in_channels);
  p.kernel = s.upload(kernel_hwio, std::size_t(9) * in_channels * out_channels);
  p.bias = s.upload(bias, std::size_t(out_channels));
  p.output = s.empty(outputs);
  p.preactivation = preactivation && fused_activation(activation) ? s.empty(outputs) : nullptr;
  run_conv3x3(p, s.stream);
  finish_convolution(s, p.output, p.preactivation, outputs, activation, y, preactivation);
}

void conv(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio, int kernel_size,
          const float* bias, int out_channels, int padding, int activation, float* y, float* preactivation) {
  if (kernel_size == 3)
    return conv3x3(x, images, height, width, in_channels, kernel_hwio, bias, out_channels, padding, activation, false, y,
                   preactivation);
  if (kernel_size != 1) throw std::invalid_argument("kernel_size must be 1 or 3");
  if (activation == kSoftmax) throw std::invalid_argument("softmax on a convolution is not supported");
  Scratch s;
  const long long pixels = static_cast<long long>(images) * height * width;
  const std::size_t outputs = std::size_t(pixels) * std::size_t(out_channels);
  DenseProblem p = conv1x1_problem(s.upload(x, std::size_t(pixels) * std::size_t(in_channels)),
                                   s.upload(kernel_hwio, std::size_t(in_channels) * std::size_t(out_channels)),
                                   s.upload(bias, std::size_t(out_channels)), s.empty(outputs),
                                   preactivation && fused_activation(activation) ? s.empty(outputs) : nullptr, pixels,
                                   in_channels, out_channels, activation);
  DeviceBuffer workspace;
  run_dense(p, gemv_pays(p.rows), workspace, s.stream);
  finish_convolution(s, p.output, p.preactivation, outputs, activation, y, preactivation);
}

void pool2x2(const float* x, int images, int height, int width, int channels, int mode, int padding, float* y) {
  Scratch s;
  Pool2x2Problem p{s.upload(x, std::size_t(images) * height * width * channels), nullptr, images, height, width, channels,
                   padding ? (height + 1) / 2 : height / 2, padding ? (width + 1) / 2 : width / 2,
                   mode == 1 ? kGlobalMax : kGlobalAverage};
  const std::size_t outputs = std::size_t(window_pool_outputs(p));
  p.output = s.empty(outputs);
  run_window_pool(p, s.stream);
  s.download(y, p.output, outputs);
}

void affine(float* values, long long rows, int channels, const float* scale, const float* shift, int max_blocks) {
  Scratch s;
  const std::size_t count = std::size_t(rows) * std::size_t(channels);
  AffineProblem p{s.upload(values, count), s.upload(scale, std::size_t(channels)), s.upload(shift, std::size_t(channels)),
                  rows, channels};
  run_affine(p, s.stream, max_blocks);
  s.download(values, p.values, count);
}

void upsample(const float* x, int images, int height, int width, int channels, int size_height, int size_width,
              float* y, int max_blocks) {
  Scratch s;
  UpsampleProblem p{s.upload(x, std::size_t(images) * height * width * channels), nullptr, images, height, width,
                    channels, size_height, size_width};
  const std::size_t outputs = std::size_t(upsample_outputs(p));
  p.output = s.empty(outputs);
  run_upsample(p, s.stream, max_blocks);
  s.download(y, p.output, outputs);
}

void prelu(float* values, long long count, int height, int width, int channels, const float* alpha, int alpha_height,
           int alpha_width, int max_blocks) {
  Scratch s;
  const std::size_t alphas = std::size_t(alpha_height) * alpha_width * channels;
  PReluProblem p{s.upload(values, std::size_t(count)), s.upload(alpha, alphas), count, height, width, channels,
                 alpha_height, alpha_width};
  run_prelu(p, s.stream, max_blocks);
  s.download(values, p.values, std::size_t(count));
}

void activation(const float* x, long long count, int activation, float* y, int max_blocks, float negative_slope,
                float max_value, float threshold) {
  Scratch s;
  float* values = s.upload(x, std::size_t(count));
  run_activation(ActivationProblem{values, values, count, activation, ActivationNumbers{negative_slope, max_value, threshold}},
                 s.stream, max_blocks);
  s.download(y, values, std::size_t(count));
}

void max_pool2x2(const float* x, int images, int height, int width, int channels, float* y) {
  Scratch s;
  MaxPool2x2Problem p{s.upload(x, std::size_t(images) * height * width * channels), nullptr, images, height, width, channels};
  const std::size_t outputs = std::size_t(max_pool2x2_outputs(p));
  p.output = s.empty(outputs);
  run_max_pool2x2(p, s.stream);
  s.download(y, p.output, outputs);
}

void global_pool(const float* x, int images, int height, int width, int channels, int mode, float* y) {
  Scratch s;
  GlobalPoolProblem p{s.upload(x, std::size_t(images) * height * width * channels), s.empty(std::size_t(images) * channels),
                      images, height, width, channels, mode};
  run_global_pool(p, s.stream);
  s.download(y, p.output, std::size_t(images) * channels);
}

void dense(const float* x, int rows, int depth, const float* kernel, const float* bias, int units, int activation,
           int path, float* y) {
  Scratch s;
  DenseProblem p{s.upload(x, std::size_t(rows) * depth), s.upload(kernel, std::size_t(depth) * units),
                 s.upload(bias, std::size_t(units)), s.empty(std::size_t(rows) * units), nullptr,
                 rows, depth, units, kernel_activation(activation)};
  DeviceBuffer workspace;
  run_dense(p, path == 0 ? gemv_pays(rows) : path == 2, workspace, s.stream);
  if (activation == kSoftmax)
    run_softmax(SoftmaxProblem{p.output, rows, units}, s.stream);
  else if (!fused_activation(activation))
    run_activation(ActivationProblem{p.output, p.output, static_cast<long long>(rows) * units, activation}, s.stream);
  s.download(y, p.output, std::size_t(rows) * units);
}

void softmax(float* values, int rows, int cols) {
  Scratch s;
  float* d = s.upload(values, std::size_t(rows) * cols);
  run_softmax(SoftmaxProblem{d, rows, cols}, s.stream);
  s.download(values, d, std::size_t(rows) * cols);
}

void transpose(const float* x, int batch, int rows, int cols, float* y) {
  Scratch s;
  const std::size_t n = std::size_t(batch) * rows * cols;
  TransposeProblem p{s.upload(x, n), s.empty(n), batch, rows, cols};
  run_transpose(p, s.stream);
  s.download(y, p.output, n);
}

void set_block_order_seed(unsigned long long seed) {
#if !defined(__CUDACC__)
  fastvgg::emulator::block_order_seed() = seed;
#else
  (void)seed;
#endif
}
}  // namespace testing

// ------------------------------------------------------------------------------------------
std::pair<bool, std::string> device_status() {
#if defined(__CUDACC__)
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess)
    return {false, std::string("the CUDA runtime cannot use a GPU: ") + cudaGetErrorName(status) + " (" +
                       cudaGetErrorString(status) + ")"};
  if (devices < 1) return {false, "the CUDA runtime sees no GPU"};
  int device = 0;
  cudaGetDevice(&device);
  cudaDeviceProp properties{};
  if (cudaGetDeviceProperties(&properties, device) != cudaSuccess) return {false, "cannot read the GPU's properties"};
  if (properties.major < 8)
    return {false, std::string(properties.name) + " is sm_" + std::to_string(properties.major) +
                       std::to_string(properties.minor) + "; this build has code for sm_80 and newer only"};
  int driver = 0;
  cudaDriverGetVersion(&driver);
  return {true, std::string(properties.name) + " (device " + std::to_string(device) + " of " + std::to_string(devices) +
                    ", sm_" + std::to_string(properties.major) + std::to_string(properties.minor) + ", driver CUDA " +
                    std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10) + ")"};
#else
  return {true, "CPU grid emulator (tests only; no GPU involved)"};
#endif
}

const char* backend_name() {
#if defined(__CUDACC__)
  return "cuda";
#else
  return "emulator";
#endif
}

}  // namespace fastvgg::cuda
