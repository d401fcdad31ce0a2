// The CPU executor: a graph's weights packed for one CPU kernel set, and the loop that runs it.
//
// Convolution and pooling run one image at a time (activations of one image stay small and
// warm in cache); the flat part (dense layers) then runs on the whole batch, so the weights
// are streamed from memory once per batch instead of once per image.
//
// Threads and memory belong to the executor: each forward borrows a workspace from the
// executor's pool (one is kept for the next call, the rest are freed), so concurrent calls
// each get their own and everything is freed with the executor. Weight updates take an
// exclusive lock and forwards a shared one, so set_weights while another thread predicts
// waits instead of racing; `begin_update`/`end_update` hold it across many calls (a whole
// model's load).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <vector>

#include "executor.h"
#include "kernels.h"

namespace fastvgg {

// Packed weights: owned memory, or a read-only region someone else owns (a mapped cache
// file), kept alive by `keepalive` for as long as the executor uses it.
class WeightBlob {
 public:
  void allocate(std::size_t bytes, bool zeroed);
  void adopt(const void* data, std::size_t bytes, std::shared_ptr<const void> keepalive);
  void* writable();  // owned memory only; throws for an adopted region
  const void* data() const { return external_ ? external_ : owned_.data(); }
  std::size_t bytes() const { return bytes_; }
  bool is_adopted() const { return external_ != nullptr; }

 private:
  AlignedBuffer owned_;
  const void* external_ = nullptr;
  std::shared_ptr<const void> keepalive_;
  std::size_t bytes_ = 0;
};

class CpuExecutor final : public Executor {
 public:
  // `kernels` decides the weight layouts; threads = 0 follows the process default.
  CpuExecutor(Graph graph, Precision precision, const KernelTable& kernels);
  ~CpuExecutor() override;
  CpuExecutor(const CpuExecutor&) = delete;
  CpuExecutor& operator=(const CpuExecutor&) = delete;

  const Graph& graph() const override { return graph_; }
  Precision precision() const { return precision_; }
  const KernelTable& kernels() const { return *kernels_; }
  // The method an op runs by ("winograd_f4x4_f32", "direct_f32", "dense_f32"), or "" for an op
  // without weights; "folded" for an affine map folded into the convolution before it.
  const char* method_name(int op) const;

  void set_threads(int threads);  // 0: the process default (set_default_threads)
  int threads() const;

  void set_conv3x3_weights(int op, const float* kernel_hwio, const float* bias) override;
  void set_dense_kernel_rows(int op, int first_row, int row_count, const float* rows) override;
  void set_dense_bias(int op, const float* bias) override;
  // Any convolution's weights, HWIO (1x1 or 3x3); a 3x3 packs as set_conv3x3_weights does.
  void set_conv_weights(int op, const float* kernel_hwio, const float* bias);
  // An affine op's per-channel scale and shift (get_weights returns them as kernel and bias).
  void set_affine(int op, const float* scale, const float* shift);
  // A prelu op's alpha, alpha_height x alpha_width x channels (get_weights returns it as the
  // kernel, and a zero bias).
  void set_prelu(int op, const float* alpha);
  bool weights_loaded(int op) const override;
  void get_weights(int op, float* kernel, float* bias) const override;
  void forward(const float* images, int count, int height, int width,
               const std::vector<OutputRequest>& outputs) override;
  std::size_t weights_bytes() const override;
  // Bytes of workspace kept between calls (freed with the executor).
  std::size_t idle_workspace_bytes() const;

  // An exclusive hold on the weights for a sequence of set_* calls from this thread;
  // re-entrant; forwards wait until the matching end_update.
  void begin_update();
  void end_update();

  // Packed sections as the kernels read them, for a cache file: name, data, bytes.
  struct Section {
    std::string name;
    const void* data;
    std::size_t bytes;
  };
  // Settles pending folds first (cpu_executor.cpp, "Folding"), which needs the weights exclusively.
  std::vector<Section> packed_sections();
  // Uses a region instead of the packed weights of `name` (as packed_sections() names them),
  // without copying. The region must hold exactly what packed_sections() gave for the same
  // graph, precision and kernel set; `keepalive` owns it.
  void adopt_section(const std::string& name, const void* data, std::size_t bytes,
                     std::shared_ptr<const void> keepalive);

 private:
  struct PreparedOp;
  struct Workspace;
  class UpdateScope;

  PreparedOp& prepared(int op, OpKind expected);
  const PreparedOp& prepared(int op) const;
  std::unique_ptr<Workspace> borrow_workspace();
  void return_workspace(std::unique_ptr<Workspace> workspace);
  struct SpatialRun;
  // BatchNormalization folding (see "Folding" in cpu_executor.cpp).
  bool may_fold(int conv) const;
  void pack_conv(int op, const float* kernel_hwio, const float* bias, const float* fold_scale, const float* fold_shift);
  void unpack_conv(int op, float* kernel_hwio, float* bias) const;
  void settle_folds();
  void settle_if_outermost();  // by a setter, while it holds the weights
  void leave_update() noexcept;
  bool runs_batched(const Op& op, const PreparedOp& p, const KernelTable& kernels) const;
  bool run_spatial_op(const SpatialRun& run, int i, BlockedImage& current, BlockedImage& next, int n) const;
  void finish_spatial_op(const SpatialRun& run, int i, const BlockedImage& next, int n) const;
  // `shapes` are the graph's shapes for height x width, which forward computed to check the input.
  void run(const float* images, int count, int height, int width, const std::vector<OpShape>& shapes,
           const std::vector<OutputRequest>& outputs, int last, Workspace& workspace, const KernelTable& kernels,
           int threads) const;

  Graph graph_;
  Precision precision_;
  const KernelTable* kernels_;
  std::vector<std::unique_ptr<PreparedOp>> prepared_;
  std::atomic<int> threads_{0};
  // A convolution or affine map changed since the folds were last settled.
  std::atomic<bool> folds_pending_{false};

  mutable std::shared_mutex weights_mutex_;
  std::atomic<std::thread::id> updater_{};
  int update_depth_ = 0;

  mutable std::mutex pool_mutex_;
  std::unique_ptr<Workspace> idle_workspace_;
};

// The process-wide default thread count (FASTVGG_NUM_THREADS / set_num_threads); 0 = all cores.
void set_default_threads(int threads);
int default_threads();

}  // namespace fastvgg
