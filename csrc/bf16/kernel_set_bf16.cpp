// The bf16 kernel set's methods (packers beside run functions, as kernels.h's), and its choice
// from what this build has and what the CPU reports.
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bf16/kernels_bf16.h"
#include "cpu_features.h"

namespace fastvgg {

namespace {

// kernels.h's methods count bytes and take untyped buffers; the bf16 layouts count uint16.
std::size_t direct_bytes(int in_c, int out_c) { return packed_conv3x3_bf16_size(in_c, out_c) * sizeof(std::uint16_t); }
void direct_pack(const float* kernel, int in_c, int out_c, void* packed, int threads) {
  pack_conv3x3_bf16(kernel, in_c, out_c, static_cast<std::uint16_t*>(packed), threads);
}
void direct_unpack(const void* packed, int in_c, int out_c, float* kernel, int threads) {
  unpack_conv3x3_bf16(static_cast<const std::uint16_t*>(packed), in_c, out_c, kernel, threads);
}
std::size_t winograd_bytes(int in_c, int out_c) {
  return packed_winograd_int14_size(in_c, out_c) * sizeof(std::uint16_t);
}
void winograd_pack(const float* kernel, int in_c, int out_c, void* packed, int threads) {
  pack_winograd_int14(kernel, in_c, out_c, static_cast<std::uint16_t*>(packed), threads);
}
void winograd_unpack(const void* packed, int in_c, int out_c, float* kernel, int threads) {
  unpack_winograd_int14(static_cast<const std::uint16_t*>(packed), in_c, out_c, kernel, threads);
}
std::size_t dense_bytes(int depth, int cols) { return packed_dense_bf16_size(depth, cols) * sizeof(std::uint16_t); }
void dense_pack_rows(const float* rows, int first_row, int row_count, int depth, int cols, void* packed, int threads) {
  pack_dense_rows_bf16(rows, first_row, row_count, depth, cols, static_cast<std::uint16_t*>(packed), threads);
}
void dense_unpack(const void* packed, int depth, int cols, float* kernel, int threads) {
  unpack_dense_bf16(static_cast<const std::uint16_t*>(packed), depth, cols, kernel, threads);
}

#if FASTVGG_HAVE_AVX512BF16
const Bf16KernelSet kAvx512Bf16Set = {
    "avx512_bf16",
    {"direct_bf16", direct_bytes, direct_pack, direct_unpack, false, avx512bf16::conv3x3},
    {"winograd_f4x4_int14", winograd_bytes, winograd_pack, winograd_unpack, false, avx512bf16::conv3x3_winograd_int14,
     /*run_batch=*/nullptr, avx512bf16::conv3x3_winograd_int14_max_pool},
    {"dense_bf16", dense_bytes, dense_pack_rows, dense_unpack, avx512bf16::dense},
    avx512bf16::round_floats,
};

// Every CPU with AVX512_BF16 so far (Cooper Lake, Sapphire Rapids, Zen 4) also has AVX512_VNNI,
// which the int14 Winograd kernel uses; both are required rather than assumed.
bool cpu_runs_set() {
#if defined(__x86_64__) || defined(_M_X64)
  return cpu_has_avx512_bf16() && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}
#endif

}  // namespace

const Bf16KernelSet* bf16_kernel_set() {
#if FASTVGG_HAVE_AVX512BF16
  if (cpu_runs_set()) return &kAvx512Bf16Set;
#endif
  return nullptr;
}

const char* bf16_unavailable_reason() {
#if FASTVGG_HAVE_AVX512BF16
  if (cpu_runs_set()) return "";
  return "this CPU does not report AVX512_BF16 and AVX512_VNNI (with AVX-512F/BW/DQ/VL and OS support), which the "
         "bf16 kernel set needs";
#else
  return "this build of fastvgg has no AVX512_BF16 kernels (the compiler lacked -mavx512bf16, or the target is not x86-64)";
#endif
}

const KernelTable& bf16_kernel_table(const KernelTable& fp32) {
  const Bf16KernelSet* set = bf16_kernel_set();
  if (!set) throw std::runtime_error(std::string("bf16 kernels unavailable: ") + bf16_unavailable_reason());
  // One table per fp32 table (there are at most three), never freed: executors point at them.
  static std::mutex mutex;
  static std::vector<std::pair<const KernelTable*, std::unique_ptr<KernelTable>>> tables;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const auto& entry : tables)
    if (entry.first == &fp32) return *entry.second;
  auto table = std::make_unique<KernelTable>(fp32);
  table->isa_name = set->name;
  table->conv3x3_direct = set->conv3x3_direct;
  table->conv3x3_winograd = set->conv3x3_winograd;
  table->dense = set->dense;
  tables.emplace_back(&fp32, std::move(table));
  return *tables.back().second;
}

}  // namespace fastvgg
