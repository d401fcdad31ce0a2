#include "cpu_executor.h"

#include "cpu_features.h"
#include "ops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fastvgg {

// ---------------------------------------------------------------------------------------------
// Shared by every executor

const char* precision_name(Precision precision) {
  switch (precision) {
    case Precision::Fast: return "fast";
    case Precision::Highest: return "highest";
    case Precision::Bf16: return "bf16";
    case Precision::Bf16x3: return "bf16x3";
  }
  return "?";
}

Precision parse_precision(const std::string& name) {
  for (Precision p : {Precision::Fast, Precision::Highest, Precision::Bf16, Precision::Bf16x3})
    if (name == precision_name(p)) return p;
  throw std::invalid_argument("unknown precision '" + name + "'; expected 'fast', 'highest', 'bf16' or 'bf16x3'");
}

int check_output_requests(const Graph& graph, const std::vector<OutputRequest>& outputs) {
  int last = -1;
  for (std::size_t k = 0; k < outputs.size(); ++k) {
    const OutputRequest& request = outputs[k];
    const Op& op = graph.op(request.op);  // throws for an index out of range
    if (request.before_activation && !op.is_convolution())
      throw std::invalid_argument("layer " + std::to_string(request.op) +
                                  " is not a convolution: only convolutions have a pre-activation output");
    if (request.destination == nullptr) throw std::invalid_argument("an output request has no destination");
    for (std::size_t j = 0; j < k; ++j)
      if (outputs[j].op == request.op && outputs[j].before_activation == request.before_activation)
        throw std::invalid_argument("the output of layer " + std::to_string(request.op) +
                                    (request.before_activation ? " before its activation" : "") +
                                    " is requested twice; ask for it once and copy the array");
    last = std::max(last, request.op);
  }
  return last;
}

namespace {
std::atomic<int> g_default_threads{0};
}  // namespace

void set_default_threads(int threads) {
  if (threads < 0) throw std::invalid_argument("the number of threads must be at least 1");
  g_default_threads.store(threads);
}

int default_threads() {
  const int n = g_default_threads.load();
  return n > 0 ? n : omp_get_max_threads();
}

// ---------------------------------------------------------------------------------------------
// WeightBlob

void WeightBlob::allocate(std::size_t bytes, bool zeroed) {
  external_ = nullptr;
  keepalive_.reset();
  owned_.resize((bytes + sizeof(float) - 1) / sizeof(float), zeroed);
  bytes_ = bytes;
}

void WeightBlob::adopt(const void* data, std::size_t bytes, std::shared_ptr<const void> keepalive) {
  if (reinterpret_cast<std::uintptr_t>(data) % kAlignment != 0)
    throw std::invalid_argument("a packed weight region must be aligned to " + std::to_string(kAlignment) + " bytes");
  owned_.resize(0);
  external_ = data;
  keepalive_ = std::move(keepalive);
  bytes_ = bytes;
}

void* WeightBlob::writable() {
  if (external_) throw std::logic_error("packed weights that live in a mapped cache file are read-only");
  return owned_.data();
}

// ---------------------------------------------------------------------------------------------
// CpuExecutor

namespace {
// Pointwise: a 1x1 convolution, weights in the fp32 dense layout (ops.h's conv1x1 reads it).
enum class ConvChoice { None, Direct, Winograd, Pointwise };

// Winograd's GEMM depth is the input channel count: with 3 channels (block1_conv1) the
// transforms cost more than they save (bench/conv_layers.py: 1.7-2.1 ms direct against
// 2.7-4.6 ms Winograd on that layer); from one full channel block on it wins 2-2.8x.
// bf16: the AVX512_BF16 set's Winograd is F(4x4) with int14 products, chosen from the same depth
// on; the AMX set has none (its Winograd slot's run is nullptr) and runs every layer directly.
// bf16x3: the slot holds the bf16x3 AMX direct kernel (amx_bf16x3_kernel_table), chosen from
// the same depth on.
ConvChoice choose_conv(const Op& op, Precision precision, const KernelTable& kernels) {
  if (!op.is_convolution()) return ConvChoice::None;
  if (op.kernel_size == 1) return ConvChoice::Pointwise;
  const bool winograd = precision != Precision::Highest && op.in_channels >= kChannelBlock &&
                        kernels.conv3x3_winograd.run != nullptr;
  return winograd ? ConvChoice::Winograd : ConvChoice::Direct;
}

const Conv3x3Method& conv_method(const KernelTable& kernels, ConvChoice choice) {
  return choice == ConvChoice::Winograd ? kernels.conv3x3_winograd : kernels.conv3x3_direct;
}

// Two kernel sets can run each other's packed weights when their layouts have the same names.
bool same_layouts(const KernelTable& a, const KernelTable& b) {
  return std::strcmp(a.conv3x3_direct.name, b.conv3x3_direct.name) == 0 &&
         std::strcmp(a.conv3x3_winograd.name, b.conv3x3_winograd.name) == 0 &&
         std::strcmp(a.dense.name, b.dense.name) == 0;
}

// Only used when a pre-activation output was asked for; `x < 0 ? 0 : x` keeps NaN as the
// fused kernels do. The zero border stays zero.
void relu_in_place(const BlockedImage& image) {
  float* data = image.data;
  const std::size_t size = image.size();
  for (std::size_t i = 0; i < size; ++i) data[i] = data[i] < 0.0f ? 0.0f : data[i];
}

std::size_t conv_weight_count(const Op& op) {
  return std::size_t(op.kernel_size) * op.kernel_size * op.in_channels * op.out_channels;
}

// A 1x1 convolution's weights, in the fp32 dense layout whatever the kernel set.
std::size_t pointwise_bytes(const Op& op) { return packed_dense_size(op.in_channels, op.out_channels) * sizeof(float); }
// An affine map's scale, padded to whole blocks with zeros (so padding channels stay zero).
std::size_t affine_bytes(const Op& op) { return std::size_t(round_up_to_block(op.out_channels)) * sizeof(float); }
// A prelu's alpha, blocked as [blocks][alpha_height][alpha_width][16] with zero padding channels.
std::size_t prelu_bytes(const Op& op) {
  return prelu_packed_floats(op.alpha_height, op.alpha_width, op.out_channels) * sizeof(float);
}

// The element-wise kernels' name for an activation.
Elementwise elementwise_of(Activation a) {
  switch (a) {
    case Activation::Relu: return Elementwise::Relu;
    case Activation::Sigmoid: return Elementwise::Sigmoid;
    case Activation::Tanh: return Elementwise::Tanh;
    case Activation::Elu: return Elementwise::Elu;
    case Activation::Selu: return Elementwise::Selu;
    case Activation::Gelu: return Elementwise::Gelu;
    case Activation::Swish: return Elementwise::Swish;
    case Activation::Softplus: return Elementwise::Softplus;
    case Activation::LeakyRelu: return Elementwise::LeakyRelu;
    case Activation::ClippedRelu: return Elementwise::ClippedRelu;
    case Activation::Softsign: return Elementwise::Softsign;
    case Activation::Exponential: return Elementwise::Exponential;
    case Activation::Mish: return Elementwise::Mish;
    case Activation::HardSigmoid: return Elementwise::HardSigmoid;
    case Activation::HardSigmoidKeras2: return Elementwise::HardSigmoidKeras2;
    case Activation::HardSilu: return Elementwise::HardSilu;
    default: return Elementwise::Linear;
  }
}

// Whether an op's activation runs as an element-wise pass of its own (the kernels fuse only
// ReLU; softmax runs over rows or pixels, l2_normalize over rows).
bool activation_pass(Activation a) {
  return a != Activation::Linear && a != Activation::Relu && a != Activation::Softmax && a != Activation::L2Normalize;
}

// Op `op`'s activation on `count` flat rows of `cols` values, `stride` floats apart.
void activate_rows(const OpsTable& ops, const Op& op, float* rows, int count, int cols, std::ptrdiff_t stride) {
  if (op.activation == Activation::Softmax) {
    softmax_rows(rows, count, cols, stride);
  } else if (op.activation == Activation::L2Normalize) {
    l2_normalize_rows(rows, count, cols, stride, op.max_inverse_norm);
  } else if (op.activation != Activation::Linear) {
    for (int r = 0; r < count; ++r)
      ops.activation_rows(rows + r * stride, std::size_t(cols), elementwise_of(op.activation), op.activation_params());
  }
}
}  // namespace

struct CpuExecutor::PreparedOp {
  ConvChoice conv = ConvChoice::None;
  WeightBlob packed;
  AlignedBuffer bias;  // padded to a whole channel block with zeros
  // For a method whose unpack only approximates (Winograd): what makes get_weights exact.
  KernelCorrection correction;
  std::vector<std::uint8_t> dense_row_loaded;
  int dense_rows_missing = 0;
  bool kernel_loaded = false;
  bool bias_loaded = false;
  // Set when the next op's affine map (a BatchNormalization) is folded into this convolution:
  // its scale and shift, and the bias as loaded (`bias` then holds bias * scale + shift).
  std::vector<float> fold_scale, fold_shift, loaded_bias;
  bool folded() const { return !fold_scale.empty() && !fold_shift.empty() && !loaded_bias.empty(); }
  // Whether get_weights needs `correction` to give the loaded kernel back: a folded layer, or a
  // method whose unpack only approximates (fp32 Winograd; bf16 returns what it computes with).
  bool corrected(const Op& op, const KernelTable& kernels, Precision precision) const {
    if (!op.is_convolution()) return false;
    if (folded()) return true;
    return conv != ConvChoice::Pointwise && !conv_method(kernels, conv).unpack_is_exact && precision != Precision::Bf16;
  }
  void clear_fold() {
    fold_scale.clear();
    fold_shift.clear();
    loaded_bias.clear();
  }
};

struct CpuExecutor::Workspace {
  AlignedBuffer ping, pong;         // blocked activations of one image
  AlignedBuffer flat_in, flat_out;  // rows of the flat part, one per image, padded to the block
  AlignedBuffer uncropped;          // a 'valid' 3x3 convolution's 'same' output before the crop
  AlignedBuffer batch_ping, batch_pong;  // blocked activations of every image, for the batched layers
  KernelScratch scratch;

  std::size_t bytes() const {
    return (ping.size() + pong.size() + flat_in.size() + flat_out.size() + uncropped.size() + batch_ping.size() +
            batch_pong.size()) * sizeof(float) +
           scratch.bytes();
  }
};

class CpuExecutor::UpdateScope {
 public:
  explicit UpdateScope(CpuExecutor& executor) : executor_(executor) { executor_.begin_update(); }
  // Never settles (a destructor must not throw): the setters call settle_if_outermost themselves.
  ~UpdateScope() { executor_.leave_update(); }
  UpdateScope(const UpdateScope&) = delete;
  UpdateScope& operator=(const UpdateScope&) = delete;

 private:
  CpuExecutor& executor_;
};

CpuExecutor::CpuExecutor(Graph graph, Precision precision, const KernelTable& kernels)
    : graph_(std::move(graph)), precision_(precision), kernels_(&kernels) {
  for (const Op& op : graph_.ops()) {
    auto p = std::make_unique<PreparedOp>();
    p->conv = choose_conv(op, precision_, kernels);
    if (op.has_weights()) p->bias.resize(std::size_t(round_up_to_block(op.out_channels)));
    prepared_.push_back(std::move(p));
  }
}

CpuExecutor::~CpuExecutor() = default;

const char* CpuExecutor::method_name(int op) const {
  const Op& o = graph_.op(op);
  if (o.is_convolution() && prepared(op).conv == ConvChoice::Pointwise) return "pointwise_f32";
  if (o.is_convolution()) return conv_method(*kernels_, prepared(op).conv).name;
  if (o.kind == OpKind::Affine) return op > 0 && prepared(op - 1).folded() ? "folded" : "affine_f32";
  if (o.kind == OpKind::PRelu) return "prelu_f32";
  if (o.kind == OpKind::Dense) return kernels_->dense.name;
  return "";
}

void CpuExecutor::set_threads(int threads) {
  if (threads < 0) throw std::invalid_argument("the number of threads must be at least 1 (or 0 for the default)");
  threads_.store(threads);
}

int CpuExecutor::threads() const {
  const int n = threads_.load();
  return n > 0 ? n : default_threads();
}

CpuExecutor::PreparedOp& CpuExecutor::prepared(int op, OpKind expected) {
  const Op& o = graph_.op(op);
  if (o.kind != expected)
    throw std::invalid_argument("layer " + std::to_string(op) + " is a " + op_kind_name(o.kind) + ", not a " +
                                op_kind_name(expected));
  return *prepared_[std::size_t(op)];
}

const CpuExecutor::PreparedOp& CpuExecutor::prepared(int op) const {
  graph_.op(op);  // range check
  return *prepared_[std::size_t(op)];
}

void CpuExecutor::begin_update() {
  if (updater_.load() == std::this_thread::get_id()) {
    ++update_depth_;
    return;
  }
  weights_mutex_.lock();
  updater_.store(std::this_thread::get_id());
  update_depth_ = 1;
}

void CpuExecutor::end_update() {
  if (updater_.load() != std::this_thread::get_id())
    throw std::logic_error("end_update without a matching begin_update on this thread");
  // The outermost update settles the folds, so that a loaded model is final (method(),
  // packed_sections) before anyone predicts.
  if (update_depth_ == 1) {
    try {
      settle_folds();
    } catch (...) {
      leave_update();
      throw;
    }
  }
  leave_update();
}

void CpuExecutor::leave_update() noexcept {
  if (--update_depth_ == 0) {
    updater_.store(std::thread::id{});
    weights_mutex_.unlock();
  }
}

void CpuExecutor::settle_if_outermost() {
  if (update_depth_ == 1) settle_folds();
}

void CpuExecutor::set_conv3x3_weights(int op, const float* kernel_hwio, const float* bias) {
  UpdateScope scope(*this);
  const Op& o = graph_.op(op);
  // A 'valid' 3x3 convolution packs as VGG's 'same' one does (it runs by the same kernels).
  prepared(op, o.kind == OpKind::Conv && o.kernel_size == 3 ? OpKind::Conv : OpKind::Conv3x3);
  pack_conv(op, kernel_hwio, bias, nullptr, nullptr);
  folds_pending_.store(true);
  settle_if_outermost();
}

void CpuExecutor::set_conv_weights(int op, const float* kernel_hwio, const float* bias) {
  const Op& o = graph_.op(op);
  if (o.kernel_size == 3 || o.kind == OpKind::Conv3x3) return set_conv3x3_weights(op, kernel_hwio, bias);
  UpdateScope scope(*this);
  prepared(op, OpKind::Conv);
  pack_conv(op, kernel_hwio, bias, nullptr, nullptr);
  folds_pending_.store(true);
  settle_if_outermost();
}

// Packs a convolution's kernel and bias as loaded, or with an affine map folded in (scale and
// shift given): kernel * scale and bias * scale + shift, per output channel. A folded layer
// keeps a correction against the loaded kernel, so get_weights stays exact.
void CpuExecutor::pack_conv(int op, const float* kernel_hwio, const float* bias, const float* fold_scale,
                            const float* fold_shift) {
  const Op& o = graph_.op(op);
  PreparedOp& p = *prepared_[std::size_t(op)];
  const int threads = this->threads();
  const std::size_t count = conv_weight_count(o);
  const int filters = o.out_channels;
  p.kernel_loaded = p.bias_loaded = false;
  p.clear_fold();
  std::vector<float> folded;
  const float* packed_from = kernel_hwio;
  if (fold_scale) {
    folded.resize(count);
    // HWIO: the output channel is the fastest index.
    for (std::size_t k = 0; k < count; ++k) folded[k] = kernel_hwio[k] * fold_scale[k % std::size_t(filters)];
    packed_from = folded.data();
  }
  std::vector<float> recovered;
  if (p.conv == ConvChoice::Pointwise) {
    const std::size_t bytes = pointwise_bytes(o);
    if (p.packed.is_adopted() || p.packed.bytes() != bytes) p.packed.allocate(bytes, /*zeroed=*/true);
    // A 1x1 kernel (1, 1, in, out) is an (in, out) matrix.
    pack_dense_rows(packed_from, 0, o.in_channels, o.in_channels, filters, static_cast<float*>(p.packed.writable()),
                    threads);
    if (fold_scale) {
      recovered.resize(count);
      unpack_dense(static_cast<const float*>(p.packed.data()), o.in_channels, filters, recovered.data(), threads);
    }
  } else {
    const Conv3x3Method& method = conv_method(*kernels_, p.conv);
    const std::size_t bytes = method.packed_bytes(o.in_channels, filters);
    if (p.packed.is_adopted() || p.packed.bytes() != bytes) p.packed.allocate(bytes, /*zeroed=*/false);
    method.pack(packed_from, o.in_channels, filters, p.packed.writable(), threads);
    // bf16 keeps no correction: get_weights gives what the kernels compute with (a byte or more
    // a weight to restore the loaded values would cost most of what bf16 saves). bf16 never folds.
    if (fold_scale || (!method.unpack_is_exact && precision_ != Precision::Bf16)) {
      recovered.resize(count);
      method.unpack(p.packed.data(), o.in_channels, filters, recovered.data(), threads);
    }
  }
  if (fold_scale)
    for (std::size_t k = 0; k < count; ++k) recovered[k] /= fold_scale[k % std::size_t(filters)];
  p.correction = recovered.empty() ? KernelCorrection{} : correction_to(kernel_hwio, recovered.data(), count, threads);
  if (fold_scale) {
    p.fold_scale.assign(fold_scale, fold_scale + filters);
    p.fold_shift.assign(fold_shift, fold_shift + filters);
    p.loaded_bias.assign(bias, bias + filters);
    for (int c = 0; c < filters; ++c) p.bias.data()[c] = bias[c] * fold_scale[c] + fold_shift[c];
  } else {
    std::copy(bias, bias + filters, p.bias.data());
  }
  p.kernel_loaded = p.bias_loaded = true;
}

void CpuExecutor::set_affine(int op, const float* scale, const float* shift) {
  UpdateScope scope(*this);
  PreparedOp& p = prepared(op, OpKind::Affine);
  const Op& o = graph_.op(op);
  p.kernel_loaded = p.bias_loaded = false;
  if (p.packed.is_adopted() || p.packed.bytes() != affine_bytes(o)) p.packed.allocate(affine_bytes(o), /*zeroed=*/true);
  // A convolution that folded the previous values goes back to its loaded weights first.
  if (op > 0 && prepared_[std::size_t(op) - 1]->folded()) {
    std::vector<float> kernel(conv_weight_count(graph_.op(op - 1))), bias(std::size_t(graph_.op(op - 1).out_channels));
    unpack_conv(op - 1, kernel.data(), bias.data());
    pack_conv(op - 1, kernel.data(), bias.data(), nullptr, nullptr);
  }
  std::copy(scale, scale + o.out_channels, static_cast<float*>(p.packed.writable()));
  std::copy(shift, shift + o.out_channels, p.bias.data());
  p.kernel_loaded = p.bias_loaded = true;
  folds_pending_.store(true);
  settle_if_outermost();
}

void CpuExecutor::set_prelu(int op, const float* alpha) {
  UpdateScope scope(*this);
  PreparedOp& p = prepared(op, OpKind::PRelu);
  const Op& o = graph_.op(op);
  if (p.packed.is_adopted() || p.packed.bytes() != prelu_bytes(o)) p.packed.allocate(prelu_bytes(o), /*zeroed=*/true);
  pack_prelu_alpha(alpha, o.alpha_height, o.alpha_width, o.out_channels, static_cast<float*>(p.packed.writable()));
  p.kernel_loaded = p.bias_loaded = true;  // the bias stays zero: PReLU has none
}

void CpuExecutor::set_dense_kernel_rows(int op, int first_row, int row_count, const float* rows) {
  UpdateScope scope(*this);
  PreparedOp& p = prepared(op, OpKind::Dense);
  const Op& o = graph_.op(op);
  // In 64 bits: first_row + row_count must not wrap around to pass the check.
  if (first_row < 0 || row_count < 0 || static_cast<long long>(first_row) + row_count > o.in_channels)
    throw std::out_of_range("dense kernel rows [" + std::to_string(first_row) + ", " +
                            std::to_string(static_cast<long long>(first_row) + row_count) + ") are outside the " +
                            std::to_string(o.in_channels) + " rows of layer " + std::to_string(op));
  const DenseMethod& method = kernels_->dense;
  const std::size_t bytes = method.packed_bytes(o.in_channels, o.out_channels);
  if (p.packed.is_adopted() || p.packed.bytes() != bytes || p.dense_row_loaded.empty()) {
    // The layout's padding must read as zero: allocate zeroed, and count the rows anew.
    p.packed.allocate(bytes, /*zeroed=*/true);
    p.dense_row_loaded.assign(std::size_t(o.in_channels), 0);
    p.dense_rows_missing = o.in_channels;
    p.kernel_loaded = false;
  }
  method.pack_rows(rows, first_row, row_count, o.in_channels, o.out_channels, p.packed.writable(), threads());
  for (int r = first_row; r < first_row + row_count; ++r)
    if (!p.dense_row_loaded[std::size_t(r)]) {
      p.dense_row_loaded[std::size_t(r)] = 1;
      --p.dense_rows_missing;
    }
  p.kernel_loaded = p.dense_rows_missing == 0;
}

void CpuExecutor::set_dense_bias(int op, const float* bias) {
  UpdateScope scope(*this);
  PreparedOp& p = prepared(op, OpKind::Dense);
  std::copy(bias, bias + graph_.op(op).out_channels, p.bias.data());
  p.bias_loaded = true;
}

bool CpuExecutor::weights_loaded(int op) const {
  std::shared_lock lock(weights_mutex_, std::defer_lock);
  if (updater_.load() != std::this_thread::get_id()) lock.lock();
  const PreparedOp& p = prepared(op);
  return !graph_.op(op).has_weights() || (p.kernel_loaded && p.bias_loaded);
}

void CpuExecutor::get_weights(int op, float* kernel, float* bias) const {
  std::shared_lock lock(weights_mutex_, std::defer_lock);
  if (updater_.load() != std::this_thread::get_id()) lock.lock();
  const Op& o = graph_.op(op);
  const PreparedOp& p = prepared(op);
  if (!o.has_weights()) throw std::invalid_argument("layer " + std::to_string(op) + " has no weights");
  if (!p.kernel_loaded || !p.bias_loaded)
    throw std::logic_error("layer " + std::to_string(op) + " has no weights loaded");
  if (o.is_convolution()) return unpack_conv(op, kernel, bias);
  if (o.kind == OpKind::Affine) {
    const float* scale = static_cast<const float*>(p.packed.data());
    std::copy(scale, scale + o.out_channels, kernel);
  } else if (o.kind == OpKind::PRelu) {
    unpack_prelu_alpha(static_cast<const float*>(p.packed.data()), o.alpha_height, o.alpha_width, o.out_channels, kernel);
  } else {
    kernels_->dense.unpack(p.packed.data(), o.in_channels, o.out_channels, kernel, this->threads());
  }
  std::copy(p.bias.data(), p.bias.data() + o.out_channels, bias);
}

// A convolution's weights as loaded (the caller holds the weights, shared or exclusive).
void CpuExecutor::unpack_conv(int op, float* kernel, float* bias) const {
  const Op& o = graph_.op(op);
  const PreparedOp& p = *prepared_[std::size_t(op)];
  const int threads = this->threads();
  const std::size_t count = conv_weight_count(o);
  if (p.conv == ConvChoice::Pointwise)
    unpack_dense(static_cast<const float*>(p.packed.data()), o.in_channels, o.out_channels, kernel, threads);
  else
    conv_method(*kernels_, p.conv).unpack(p.packed.data(), o.in_channels, o.out_channels, kernel, threads);
  if (p.folded())
    for (std::size_t k = 0; k < count; ++k) kernel[k] /= p.fold_scale[k % std::size_t(o.out_channels)];
  if (p.corrected(o, *kernels_, precision_)) {
    if (p.correction.ulps.size() != count || p.correction.exact_index.size() != p.correction.exact_value.size())
      throw std::logic_error("layer " + std::to_string(op) + ": the correction that makes get_weights exact is "
                             "incomplete (a packed cache missing sections?)");
    apply_correction(p.correction, kernel, count, threads);
  }
  const float* loaded_bias = p.folded() ? p.loaded_bias.data() : p.bias.data();
  std::copy(loaded_bias, loaded_bias + o.out_channels, bias);
}

std::size_t CpuExecutor::weights_bytes() const {
  std::shared_lock lock(weights_mutex_);
  std::size_t total = 0;
  for (const auto& p : prepared_)
    total += p->packed.bytes() + p->bias.size() * sizeof(float) + p->correction.bytes() +
             (p->fold_scale.size() + p->fold_shift.size() + p->loaded_bias.size()) * sizeof(float);
  return total;
}

std::size_t CpuExecutor::idle_workspace_bytes() const {
  std::lock_guard<std::mutex> lock(pool_mutex_);
  return idle_workspace_ ? idle_workspace_->bytes() : 0;
}

std::unique_ptr<CpuExecutor::Workspace> CpuExecutor::borrow_workspace() {
  std::lock_guard<std::mutex> lock(pool_mutex_);
  if (idle_workspace_) return std::move(idle_workspace_);
  return std::make_unique<Workspace>();
}

void CpuExecutor::return_workspace(std::unique_ptr<Workspace> workspace) {
  // One workspace is kept (fresh buffers would cost page faults and zeroing of tens of MB on
  // every call); those of concurrent calls beyond it are freed here.
  std::lock_guard<std::mutex> lock(pool_mutex_);
  if (!idle_workspace_) idle_workspace_ = std::move(workspace);
}

std::vector<CpuExecutor::Section> CpuExecutor::packed_sections() {
  settle_folds();  // the file keeps the folded weights, so a load from it needs no refolding
  std::shared_lock lock(weights_mutex_, std::defer_lock);
  if (updater_.load() != std::this_thread::get_id()) lock.lock();
  std::vector<Section> sections;
  for (int i = 0; i < graph_.op_count(); ++i) {
    const PreparedOp& p = *prepared_[std::size_t(i)];
    if (!graph_.op(i).has_weights()) continue;
    if (!p.kernel_loaded || !p.bias_loaded)
      throw std::logic_error("layer " + std::to_string(i) + " has no weights loaded");
    const std::string prefix = "op" + std::to_string(i) + ".";
    sections.push_back({prefix + "packed", p.packed.data(), p.packed.bytes()});
    sections.push_back({prefix + "bias", p.bias.data(), p.bias.size() * sizeof(float)});
    // After packed and bias, before the correction: adopting them in this order rebuilds the fold.
    if (p.folded()) {
      sections.push_back({prefix + "fold.scale", p.fold_scale.data(), p.fold_scale.size() * sizeof(float)});
      sections.push_back({prefix + "fold.shift", p.fold_shift.data(), p.fold_shift.size() * sizeof(float)});
      sections.push_back({prefix + "fold.loaded_bias", p.loaded_bias.data(), p.loaded_bias.size() * sizeof(float)});
    }
    if (p.corrected(graph_.op(i), *kernels_, precision_)) {
      sections.push_back({prefix + "correction.ulps", p.correction.ulps.data(), p.correction.ulps.size()});
      sections.push_back({prefix + "correction.index", p.correction.exact_index.data(),
                          p.correction.exact_index.size() * sizeof(std::uint32_t)});
      sections.push_back({prefix + "correction.value", p.correction.exact_value.data(),
                          p.correction.exact_value.size() * sizeof(float)});
    }
  }
  return sections;
}

void CpuExecutor::adopt_section(const std::string& name, const void* data, std::size_t bytes,
                                std::shared_ptr<const void> keepalive) {
  UpdateScope scope(*this);
  // "op<index>.<part>"
  std::size_t dot = name.find('.');
  if (name.compare(0, 2, "op") != 0 || dot == std::string::npos || dot == 2 || dot > 12)
    throw std::invalid_argument("unknown packed section '" + name + "'");
  const std::string digits = name.substr(2, dot - 2);
  if (digits.find_first_not_of("0123456789") != std::string::npos)
    throw std::invalid_argument("unknown packed section '" + name + "'");
  const int op = std::stoi(digits);
  const std::string part = name.substr(dot + 1);
  const Op& o = graph_.op(op);
  if (!o.has_weights()) throw std::invalid_argument("packed section '" + name + "' names a layer without weights");
  PreparedOp& p = *prepared_[std::size_t(op)];
  auto require_bytes = [&](std::size_t expected) {
    if (bytes != expected)
      throw std::invalid_argument("packed section '" + name + "' has " + std::to_string(bytes) + " bytes, expected " +
                                  std::to_string(expected));
  };
  const bool conv = o.is_convolution() && p.conv != ConvChoice::Pointwise;
  const bool corrected = p.corrected(o, *kernels_, precision_);
  const std::size_t count = o.is_convolution() ? conv_weight_count(o) : 0;
  folds_pending_.store(true);
  // An affine map folded into the convolution before it must be the one it folded.
  if (o.kind == OpKind::Affine && op > 0 && prepared_[std::size_t(op) - 1]->folded()) {
    const PreparedOp& conv = *prepared_[std::size_t(op) - 1];
    const std::vector<float>& folded = part == "packed" ? conv.fold_scale : conv.fold_shift;
    if (bytes < folded.size() * sizeof(float) || std::memcmp(data, folded.data(), folded.size() * sizeof(float)) != 0)
      throw std::invalid_argument("packed section '" + name + "' disagrees with the affine map layer " +
                                  std::to_string(op - 1) + " folded; adopt sections into a fresh executor");
  }
  if (part == "packed") {
    require_bytes(conv                              ? conv_method(*kernels_, p.conv).packed_bytes(o.in_channels, o.out_channels)
                  : p.conv == ConvChoice::Pointwise ? pointwise_bytes(o)
                  : o.kind == OpKind::Affine        ? affine_bytes(o)
                  : o.kind == OpKind::PRelu         ? prelu_bytes(o)
                                                    : kernels_->dense.packed_bytes(o.in_channels, o.out_channels));
    p.packed.adopt(data, bytes, std::move(keepalive));
    p.clear_fold();  // until the fold's own sections follow
    p.correction = KernelCorrection{};
    p.dense_row_loaded.clear();
    p.dense_rows_missing = 0;
    p.kernel_loaded = true;
  } else if (part == "bias") {
    require_bytes(p.bias.size() * sizeof(float));
    std::memcpy(p.bias.data(), data, bytes);
    p.bias_loaded = true;
  } else if (part.compare(0, 5, "fold.") == 0 && o.is_convolution() && may_fold(op)) {
    const std::size_t filters = std::size_t(o.out_channels);
    require_bytes(filters * sizeof(float));
    const auto* values = static_cast<const float*>(data);
    std::vector<float>* target = part == "fold.scale"         ? &p.fold_scale
                                 : part == "fold.shift"       ? &p.fold_shift
                                 : part == "fold.loaded_bias" ? &p.loaded_bias
                                                              : nullptr;
    if (!target) throw std::invalid_argument("unknown packed section '" + name + "'");
    if (part == "fold.scale")
      for (std::size_t c = 0; c < filters; ++c)
        if (!std::isfinite(values[c]) || values[c] == 0.0f)
          throw std::invalid_argument("packed section '" + name + "' holds a scale that cannot have been folded");
    target->assign(values, values + filters);
  } else if (corrected && part == "correction.ulps") {
    require_bytes(count);
    const auto* ulps = static_cast<const std::int8_t*>(data);
    p.correction.ulps.assign(ulps, ulps + count);
  } else if (corrected && part == "correction.index") {
    if (bytes % sizeof(std::uint32_t) != 0) require_bytes(bytes - bytes % sizeof(std::uint32_t));
    const auto* index = static_cast<const std::uint32_t*>(data);
    const std::size_t n = bytes / sizeof(std::uint32_t);
    for (std::size_t k = 0; k < n; ++k)
      if (index[k] >= count) throw std::invalid_argument("packed section '" + name + "' points outside the kernel");
    p.correction.exact_index.assign(index, index + n);
  } else if (corrected && part == "correction.value") {
    if (bytes % sizeof(float) != 0) require_bytes(bytes - bytes % sizeof(float));
    const auto* value = static_cast<const float*>(data);
    p.correction.exact_value.assign(value, value + bytes / sizeof(float));
  } else {
    throw std::invalid_argument("unknown packed section '" + name + "'");
  }
}

// ---------------------------------------------------------------------------------------------
// Folding
//
// A convolution without activation followed by an affine map on its image (Keras's
// Conv2D -> BatchNormalization) runs as one convolution with kernel * scale and
// bias * scale + shift: the affine map's pass over the image disappears, and a ReLU after it
// fuses into the convolution's kernel when nobody asked for the outputs in between. The
// products differ from Keras's order by one rounding of each folded weight (relative 2^-24).
// Asking for the convolution's own output gives (y - shift) / scale, whose error is a few
// ulps of (|y| + |shift|) / |scale|. fp32 only: bf16 keeps the two apart (its weights would
// round twice). An affine map with a zero or non-finite scale or a non-finite shift is
// applied as a pass of its own.

bool CpuExecutor::may_fold(int conv) const {
  if (conv < 0 || conv + 1 >= graph_.op_count() || precision_ == Precision::Bf16) return false;
  const Op& op = graph_.ops()[std::size_t(conv)];
  const Op& next = graph_.ops()[std::size_t(conv) + 1];
  return op.is_convolution() && op.activation == Activation::Linear && next.kind == OpKind::Affine && next.on_image &&
         next.out_channels == op.out_channels;
}

void CpuExecutor::settle_folds() {
  if (!folds_pending_.load()) return;
  const bool held_here = updater_.load() == std::this_thread::get_id();
  std::unique_lock<std::shared_mutex> lock(weights_mutex_, std::defer_lock);
  if (!held_here) lock.lock();
  if (!folds_pending_.load()) return;
  for (int i = 0; i + 1 < graph_.op_count(); ++i) {
    PreparedOp& conv = *prepared_[std::size_t(i)];
    const PreparedOp& affine = *prepared_[std::size_t(i) + 1];
    if (!may_fold(i) || conv.folded() || !conv.kernel_loaded || !conv.bias_loaded || !affine.kernel_loaded ||
        !affine.bias_loaded)
      continue;
    const int filters = graph_.op(i).out_channels;
    const float* scale = static_cast<const float*>(affine.packed.data());
    const float* shift = affine.bias.data();
    bool foldable = true;
    for (int c = 0; c < filters; ++c)
      foldable = foldable && std::isfinite(scale[c]) && scale[c] != 0.0f && std::isfinite(shift[c]);
    if (!foldable) continue;
    std::vector<float> kernel(conv_weight_count(graph_.op(i)));
    std::vector<float> bias(static_cast<std::size_t>(filters));
    unpack_conv(i, kernel.data(), bias.data());
    pack_conv(i, kernel.data(), bias.data(), scale, shift);
  }
  folds_pending_.store(false);
}

void CpuExecutor::forward(const float* images, int count, int height, int width,
                          const std::vector<OutputRequest>& outputs) {
  if (updater_.load() == std::this_thread::get_id())
    throw std::logic_error("forward called while this thread holds the weights for an update; end the update first");
  if (count < 0) throw std::invalid_argument("the batch size must not be negative");
  const int last = check_output_requests(graph_, outputs);
  const std::vector<OpShape> shapes = graph_.shapes(height, width);  // checks the input size
  if (last < 0 || count == 0) return;
  if (images == nullptr) throw std::invalid_argument("no input images");
  settle_folds();
  std::shared_lock lock(weights_mutex_);
  for (int i = 0; i <= last; ++i)
    if (graph_.op(i).has_weights() && !(prepared_[std::size_t(i)]->kernel_loaded && prepared_[std::size_t(i)]->bias_loaded))
      throw std::logic_error("layer " + std::to_string(i) + " has no weights loaded");
  // set_isa switches every executor whose layouts the new kernel set shares (all fp32 ones do).
  const KernelTable& active = active_kernels();
  const KernelTable& kernels = same_layouts(active, *kernels_) ? active : *kernels_;
  std::unique_ptr<Workspace> workspace = borrow_workspace();
  try {
    run(images, count, height, width, shapes, outputs, last, *workspace, kernels, threads());
  } catch (...) {
    return_workspace(std::move(workspace));
    throw;
  }
  return_workspace(std::move(workspace));
}

// What the spatial steps of one forward share.
struct CpuExecutor::SpatialRun {
  const OpsTable& ops_table;
  const KernelTable& kernels;
  const std::vector<OpShape>& shapes;
  const std::vector<float*>& wanted;
  const std::vector<float*>& wanted_before;
  // absorbed[i]: op i's work was done by an earlier kernel (a folded affine map, a fused ReLU);
  // fused_relu[i]: convolution i applies that ReLU.
  const std::vector<char>& absorbed;
  const std::vector<char>& fused_relu;
  // pooled_by[i] >= 0: convolution i writes that max-pool op's output (the pool runs inside
  // its kernel); else -1.
  const std::vector<int>& pooled_by;
  Workspace& workspace;
  int threads;

  bool relu_in_kernel(const Op& op, int i) const {
    return (op.activation == Activation::Relu && wanted_before[std::size_t(i)] == nullptr) || fused_relu[std::size_t(i)];
  }
};

namespace {
// A folded convolution's own output from the folded one, in place on `count` NHWC values.
void unfold_nhwc(float* values, std::size_t count, const std::vector<float>& scale, const std::vector<float>& shift) {
  const std::size_t channels = scale.size();
  for (std::size_t k = 0; k < count; ++k) values[k] = (values[k] - shift[k % channels]) / scale[k % channels];
}
}  // namespace

// Layers with weights this large run layer by layer over a chunk of images instead of image by
// image, where their method has a batch form (the Winograd ones, the AMX direct one).
// Block4/block5's Winograd U (19-38 MB) come from memory on every read; block3's (4.7-9.4
// MB) fit the L3 but not beside every other layer's, so image by image each image read them from
// memory once more: run over 8 images at a time, block3_conv2/conv3 took 0.2-0.3 ms less per
// image (VGG16 fp32, batch 32, 2 threads; 2026-11-29) than with block3 image by image.
bool CpuExecutor::runs_batched(const Op& op, const PreparedOp& p, const KernelTable& kernels) const {
  constexpr std::size_t kBatchedWeightBytes = std::size_t(4) << 20;
  return op.is_convolution() && op.same_padding && p.conv != ConvChoice::Pointwise &&
         conv_method(kernels, p.conv).run_batch != nullptr && p.packed.bytes() >= kBatchedWeightBytes;
}

// After an op wrote `next` for image n: the pre-activation output, the activation kernels do
// not fuse, the requested output.
void CpuExecutor::finish_spatial_op(const SpatialRun& run, int i, const BlockedImage& next, int n) const {
  const Op& op = graph_.ops()[std::size_t(i)];
  const PreparedOp& p = *prepared_[std::size_t(i)];
  const std::size_t elements = shape_elements(run.shapes[std::size_t(i)]);
  if (float* before_activation = run.wanted_before[std::size_t(i)]) {
    run.kernels.blocked_to_nhwc(next, before_activation + n * elements);
    if (p.folded()) unfold_nhwc(before_activation + n * elements, elements, p.fold_scale, p.fold_shift);
    if (op.activation == Activation::Relu) relu_in_place(next);
  }
  if (activation_pass(op.activation))
    run.ops_table.activation_blocked(next, elementwise_of(op.activation), op.activation_params(), run.threads);
  else if (op.activation == Activation::Softmax)
    softmax_pixels(next, run.threads);
  if (float* dst = run.wanted[std::size_t(i)]) {
    run.kernels.blocked_to_nhwc(next, dst + n * elements);
    if (p.folded()) unfold_nhwc(dst + n * elements, elements, p.fold_scale, p.fold_shift);
  }
}

// Runs spatial op i on image n from `current` into `next`; false when the op worked in place
// (the result is then in `current`).
bool CpuExecutor::run_spatial_op(const SpatialRun& run, int i, BlockedImage& current, BlockedImage& next, int n) const {
  const Op& op = graph_.ops()[std::size_t(i)];
  const PreparedOp& p = *prepared_[std::size_t(i)];
  const std::vector<OpShape>& shapes = run.shapes;
  const int threads = run.threads;
  if (run.absorbed[std::size_t(i)]) {  // done by the convolution before it: the result is in `current`
    if (float* dst = run.wanted[std::size_t(i)]) run.kernels.blocked_to_nhwc(current, dst + n * shape_elements(shapes[i]));
    return false;
  }
  if (op.in_place()) {  // an affine map, a prelu or an activation changes the image where it is
    if (op.kind == OpKind::Affine)
      run.ops_table.affine_blocked(current, static_cast<const float*>(p.packed.data()), p.bias.data(), threads);
    else if (op.kind == OpKind::PRelu)
      run.ops_table.prelu_blocked(current, static_cast<const float*>(p.packed.data()), op.alpha_height, op.alpha_width,
                                  threads);
    else if (op.activation == Activation::Softmax)
      softmax_pixels(current, threads);
    else if (op.activation != Activation::Linear)
      run.ops_table.activation_blocked(current, elementwise_of(op.activation), op.activation_params(), threads);
    if (float* dst = run.wanted[std::size_t(i)]) run.kernels.blocked_to_nhwc(current, dst + n * shape_elements(shapes[i]));
    return false;
  }
  const int pool = run.pooled_by[std::size_t(i)];
  const OpShape& next_shape = shapes[std::size_t(pool >= 0 ? pool : i)];
  next.channels = next_shape[2];
  next.height = next_shape[0];
  next.width = next_shape[1];
  zero_border(next);
  // The pre-activation output needs the sums before ReLU: run the kernel without it and
  // apply it afterwards, only when somebody asked.
  const bool relu = run.relu_in_kernel(op, i);
  if (pool >= 0) {
    conv_method(run.kernels, p.conv).run_batch_max_pool(&current, p.packed.data(), p.bias.data(), relu, &next, 1,
                                                        threads, run.workspace.scratch);
  } else if (p.conv == ConvChoice::Pointwise) {
    run.ops_table.conv1x1(current, static_cast<const float*>(p.packed.data()), p.bias.data(), relu, next, threads);
  } else if (op.is_convolution() && op.same_padding) {
    conv_method(run.kernels, p.conv).run(current, p.packed.data(), p.bias.data(), relu, next, threads,
                                         run.workspace.scratch);
  } else if (op.is_convolution()) {
    // 'valid': only the outer ring of the 'same' output reads the zero padding; the rest is it.
    const BlockedImage uncropped{run.workspace.uncropped.data(), next.channels, current.height, current.width};
    conv_method(run.kernels, p.conv).run(current, p.packed.data(), p.bias.data(), relu, uncropped, threads,
                                         run.workspace.scratch);
    run.ops_table.crop_border(uncropped, next, threads);
  } else if (op.kind == OpKind::Pool2x2) {
    run.ops_table.pool2x2(current, op.pool_mode, next, threads);
  } else if (op.kind == OpKind::Upsample) {
    run.ops_table.upsample_nearest(current, op.size_height, op.size_width, next, threads);
  } else {
    run.kernels.max_pool2x2(current, next, threads);
  }
  finish_spatial_op(run, i, next, n);
  return true;
}

void CpuExecutor::run(const float* images, int count, int height, int width, const std::vector<OpShape>& shapes,
                      const std::vector<OutputRequest>& outputs, int last, Workspace& workspace,
                      const KernelTable& kernels, int threads) const {
  const std::vector<Op>& ops = graph_.ops();
  // Destinations of op i's output and of its pre-activation output, or nullptr.
  std::vector<float*> wanted(std::size_t(last) + 1, nullptr), wanted_before(std::size_t(last) + 1, nullptr);
  for (const OutputRequest& request : outputs)
    (request.before_activation ? wanted_before : wanted)[std::size_t(request.op)] = request.destination;

  int spatial_end = 0;  // ops [0, spatial_end) run per image
  while (spatial_end <= last && ops[std::size_t(spatial_end)].is_spatial()) ++spatial_end;

  const int input_channels = graph_.input_channels();
  std::size_t scratch_size = blocked_image_size(input_channels, height, width);
  for (int i = 0; i < spatial_end; ++i)
    scratch_size = std::max(scratch_size, blocked_image_size(shapes[i][2], shapes[i][0], shapes[i][1]));
  const bool has_flat_part = last >= spatial_end;
  std::size_t widest_flat = 0;  // flat rows are padded to the block: the dense kernels write whole vectors
  for (int i = spatial_end; i <= last; ++i)
    widest_flat = std::max(widest_flat, std::size_t(round_up_to_block(shapes[i][0])));

  // A 'valid' 3x3 convolution runs the 'same' kernel on its full input size, then crops.
  std::size_t uncropped_size = 0;
  for (int i = 0; i < spatial_end; ++i) {
    const Op& op = ops[std::size_t(i)];
    if (op.kind == OpKind::Conv && !op.same_padding)
      uncropped_size = std::max(uncropped_size, blocked_image_size(op.out_channels, shapes[i][0] + op.kernel_size - 1,
                                                                   shapes[i][1] + op.kernel_size - 1));
  }
  workspace.uncropped.ensure_capacity(uncropped_size);
  const OpsTable& ops_table = ops_for(kernels);
  workspace.ping.ensure_capacity(scratch_size);
  workspace.pong.ensure_capacity(scratch_size);
  if (has_flat_part) {
    workspace.flat_in.ensure_capacity(std::size_t(count) * widest_flat);
    workspace.flat_out.ensure_capacity(std::size_t(count) * widest_flat);
  }
  // Every kernel writes whole vectors and zero_border clears the border, so stale contents
  // never leak into a result.
  float* flat_in = workspace.flat_in.data();
  float* flat_out = workspace.flat_out.data();
  std::ptrdiff_t in_stride = has_flat_part ? round_up_to_block(shapes[std::size_t(spatial_end)][0]) : 0;

  // From the first layer whose weights are worth reading once per chunk of images on, the
  // spatial layers run layer by layer over the chunk (batched where the method can), the rest
  // image by image.
  int batch_from = spatial_end;
  if (count > 1)
    for (int i = 0; i < spatial_end; ++i)
      if (runs_batched(ops[std::size_t(i)], *prepared_[std::size_t(i)], kernels)) {
        batch_from = i;
        break;
      }
  std::size_t batch_image = 0;  // floats of one image's slot in the batch buffers
  if (batch_from < spatial_end) {
    for (int i = batch_from - 1; i < spatial_end; ++i)
      batch_image = std::max(batch_image, i < 0 ? blocked_image_size(input_channels, height, width)
                                                : blocked_image_size(shapes[i][2], shapes[i][0], shapes[i][1]));
    batch_image = (batch_image + kChannelBlock - 1) / kChannelBlock * kChannelBlock;  // keep slots vector-aligned
  }
  // Images go through in chunks whose activations of one layer take about the L3 (32 MB here):
  // the batch buffers stay that size whatever the batch, and at 224x224 a chunk of 9 images
  // reads block4/block5's U about as rarely as the whole batch would (their shared blocks of
  // tiles hold 2-7 images each).
  constexpr std::size_t kChunkBytes = std::size_t(32) << 20;
  const int chunk = batch_image == 0 ? count
                                     : int(std::clamp<std::size_t>(kChunkBytes / (batch_image * sizeof(float)), 1,
                                                                   std::size_t(count)));
  if (batch_from < spatial_end) {
    workspace.batch_ping.ensure_capacity(std::size_t(chunk) * batch_image);
    workspace.batch_pong.ensure_capacity(std::size_t(chunk) * batch_image);
  }
  std::vector<char> absorbed(std::size_t(last) + 1, 0), fused_relu(std::size_t(last) + 1, 0);
  for (int i = 0; i + 1 <= last; ++i) {
    if (!prepared_[std::size_t(i)]->folded()) continue;
    absorbed[std::size_t(i) + 1] = 1;
    const bool relu_next = i + 2 <= last && ops[std::size_t(i) + 2].kind == OpKind::Elementwise &&
                           ops[std::size_t(i) + 2].activation == Activation::Relu;
    if (relu_next && !wanted[std::size_t(i)] && !wanted_before[std::size_t(i)] && !wanted[std::size_t(i) + 1]) {
      fused_relu[std::size_t(i)] = 1;
      absorbed[std::size_t(i) + 2] = 1;
    }
  }
  // A 2x2 max pool right after a convolution whose method pools (the Winograd ones in their
  // output transform, the AMX one in its epilogue), and what the convolution absorbed, runs
  // inside it when no output in between is asked for: the full-size output never goes through
  // memory (block1_conv2's is 12.8 MB).
  std::vector<int> pooled_by(std::size_t(last) + 1, -1);
  for (int i = 0; i < spatial_end; ++i) {
    const Op& op = ops[std::size_t(i)];
    const PreparedOp& p = *prepared_[std::size_t(i)];
    if (!op.is_convolution() || !op.same_padding || p.conv == ConvChoice::Pointwise ||
        conv_method(kernels, p.conv).run_batch_max_pool == nullptr ||
        (op.activation != Activation::Linear && op.activation != Activation::Relu))
      continue;
    int j = i + 1;
    while (j <= last && absorbed[std::size_t(j)]) ++j;
    if (j > last || ops[std::size_t(j)].kind != OpKind::MaxPool2x2) continue;
    bool asked = false;
    for (int k = i; k < j; ++k) asked = asked || wanted[std::size_t(k)] || wanted_before[std::size_t(k)];
    if (asked) continue;
    pooled_by[std::size_t(i)] = j;
    absorbed[std::size_t(j)] = 1;
  }
  const SpatialRun step{ops_table, kernels,  shapes,    wanted,    wanted_before,
                        absorbed,  fused_relu, pooled_by, workspace, threads};
  auto to_flat_row = [&](const BlockedImage& image, int n) {
    const Op& op = ops[std::size_t(spatial_end)];
    float* row = flat_in + std::size_t(n) * std::size_t(in_stride);
    // Flatten in Keras's (h, w, c) order, which is exactly NHWC.
    if (op.kind == OpKind::Flatten)
      kernels.blocked_to_nhwc(image, row);
    else
      kernels.global_pool(image, op.pool_mode, row);
  };

  const std::size_t input_image = std::size_t(height) * width * input_channels;
  std::vector<BlockedImage> current_batch, next_batch;
  for (int first = 0; first < count; first += chunk) {
    const int in_chunk = std::min(chunk, count - first);
    current_batch.assign(std::size_t(in_chunk), BlockedImage{});
    next_batch.assign(std::size_t(in_chunk), BlockedImage{});
    for (int k = 0; k < in_chunk; ++k) {
      const int n = first + k;
      BlockedImage current{workspace.ping.data(), input_channels, height, width};
      BlockedImage next{workspace.pong.data()};
      kernels.nhwc_to_blocked(images + n * input_image, current);
      for (int i = 0; i < batch_from; ++i)
        if (run_spatial_op(step, i, current, next, n)) std::swap(current, next);
      if (batch_from < spatial_end) {  // park the image in its batch slot
        BlockedImage& slot = current_batch[std::size_t(k)];
        slot = current;
        slot.data = workspace.batch_ping.data() + std::size_t(k) * batch_image;
        std::copy(current.data, current.data + current.size(), slot.data);
        next_batch[std::size_t(k)].data = workspace.batch_pong.data() + std::size_t(k) * batch_image;
      } else if (has_flat_part) {
        to_flat_row(current, n);
      }
    }
    for (int i = batch_from; i < spatial_end; ++i) {
      const Op& op = ops[std::size_t(i)];
      const PreparedOp& p = *prepared_[std::size_t(i)];
      if (runs_batched(op, p, kernels)) {
        const int pool = pooled_by[std::size_t(i)];
        const OpShape& next_shape = shapes[std::size_t(pool >= 0 ? pool : i)];
        for (BlockedImage& next : next_batch) {
          next.channels = next_shape[2];
          next.height = next_shape[0];
          next.width = next_shape[1];
          zero_border(next);
        }
        const bool relu = step.relu_in_kernel(op, i);
        const Conv3x3Method& method = conv_method(kernels, p.conv);
        (pool >= 0 ? method.run_batch_max_pool : method.run_batch)(current_batch.data(), p.packed.data(),
                                                                   p.bias.data(), relu, next_batch.data(), in_chunk,
                                                                   threads, workspace.scratch);
        for (int k = 0; k < in_chunk; ++k) finish_spatial_op(step, i, next_batch[std::size_t(k)], first + k);
        std::swap(current_batch, next_batch);
      } else {
        bool swapped = false;
        for (int k = 0; k < in_chunk; ++k)
          swapped = run_spatial_op(step, i, current_batch[std::size_t(k)], next_batch[std::size_t(k)], first + k);
        if (swapped) std::swap(current_batch, next_batch);
      }
    }
    if (batch_from < spatial_end && has_flat_part)
      for (int k = 0; k < in_chunk; ++k) to_flat_row(current_batch[std::size_t(k)], first + k);
  }
  if (!has_flat_part) return;

  // Flat rows stay padded to the block (stride = the padded width) from layer to layer; only a
  // requested output is copied out, tight.
  auto copy_out = [&](int i, const float* rows, std::ptrdiff_t stride) {
    float* dst = wanted[std::size_t(i)];
    if (!dst) return;
    const std::size_t features = std::size_t(shapes[std::size_t(i)][0]);
    for (int r = 0; r < count; ++r) std::memcpy(dst + r * features, rows + r * stride, sizeof(float) * features);
  };
  copy_out(spatial_end, flat_in, in_stride);
  for (int i = spatial_end + 1; i <= last; ++i) {
    const Op& op = ops[std::size_t(i)];
    const PreparedOp& p = *prepared_[std::size_t(i)];
    if (op.in_place()) {  // on the rows where they are
      const int features = shapes[std::size_t(i)][0];
      if (op.kind == OpKind::Affine) {
        for (int r = 0; r < count; ++r)
          ops_table.affine_rows(flat_in + r * in_stride, 1, features, static_cast<const float*>(p.packed.data()),
                                p.bias.data());
      } else if (op.kind == OpKind::PRelu) {
        ops_table.prelu_rows(flat_in, count, features, in_stride, static_cast<const float*>(p.packed.data()));
      } else {
        activate_rows(ops_table, op, flat_in, count, features, in_stride);
      }
      copy_out(i, flat_in, in_stride);
      continue;
    }
    const std::ptrdiff_t out_stride = round_up_to_block(op.out_channels);
    kernels.dense.run(flat_in, count, op.in_channels, in_stride, p.packed.data(), p.bias.data(), op.out_channels,
                      op.activation == Activation::Relu, flat_out, out_stride, threads);
    if (op.activation != Activation::Relu) activate_rows(ops_table, op, flat_out, count, op.out_channels, out_stride);
    copy_out(i, flat_out, out_stride);
    std::swap(flat_in, flat_out);
    in_stride = out_stride;
  }
}

}  // namespace fastvgg
