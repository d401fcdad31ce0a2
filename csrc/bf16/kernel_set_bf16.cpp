// The bf16 kernel set's methods (packers beside run functions, as kernels.h's), and its choice
// from what this build has and what the CPU reports.
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bf16/kernels_bf16.h"
#include "cpu_features.h"

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastvgg {

namespace {

// kernels.h's methods count bytes and take untyped buffers; the bf16 layouts count uint16.
// One adapter per 3x3 layout: its size, packer and unpacker over uint16 elements.
template <std::size_t (*Size)(int, int), void (*Pack)(const float*, int, int, std::uint16_t*, int),
          void (*Unpack)(const std::uint16_t*, int, int, float*, int)>
struct Uint16Conv {
  static std::size_t bytes(int in_c, int out_c) { return Size(in_c, out_c) * sizeof(std::uint16_t); }
  static void pack(const float* kernel, int in_c, int out_c, void* packed, int threads) {
    Pack(kernel, in_c, out_c, static_cast<std::uint16_t*>(packed), threads);
  }
  static void unpack(const void* packed, int in_c, int out_c, float* kernel, int threads) {
    Unpack(static_cast<const std::uint16_t*>(packed), in_c, out_c, kernel, threads);
  }
};
using DirectLayout = Uint16Conv<packed_conv3x3_bf16_size, pack_conv3x3_bf16, unpack_conv3x3_bf16>;
using WinogradLayout = Uint16Conv<packed_winograd_int14_size, pack_winograd_int14, unpack_winograd_int14>;
std::size_t dense_bytes(int depth, int cols) { return packed_dense_bf16_size(depth, cols) * sizeof(std::uint16_t); }
void dense_pack_rows(const float* rows, int first_row, int row_count, int depth, int cols, void* packed, int threads) {
  pack_dense_rows_bf16(rows, first_row, row_count, depth, cols, static_cast<std::uint16_t*>(packed), threads);
}
void dense_unpack(const void* packed, int depth, int cols, float* kernel, int threads) {
  unpack_dense_bf16(static_cast<const std::uint16_t*>(packed), depth, cols, kernel, threads);
}

#if FASTVGG_HAVE_AMXBF16
using AmxLayout = Uint16Conv<packed_conv3x3_amx_size, pack_conv3x3_amx, unpack_conv3x3_amx>;
using AmxX3Layout = Uint16Conv<packed_conv3x3_amx_x3_size, pack_conv3x3_amx_x3, unpack_conv3x3_amx_x3>;
// precision="bf16x3"'s 3x3 convolution on AMX. Its unpack gives hi + lo, within 2^-16 of each
// weight: not exact, so the executor keeps the correction get_weights needs (as for Winograd).
const Conv3x3Method kAmxX3Conv = {"direct_bf16x3_amx", AmxX3Layout::bytes, AmxX3Layout::pack, AmxX3Layout::unpack,
                                  false, amxbf16::conv3x3_x3, amxbf16::conv3x3_x3_batch,
                                  amxbf16::conv3x3_x3_batch_max_pool};
#endif

#if FASTVGG_HAVE_AVX512BF16
const Bf16KernelSet kAvx512Bf16Set = {
    "avx512_bf16",
    {"direct_bf16", DirectLayout::bytes, DirectLayout::pack, DirectLayout::unpack, false, avx512bf16::conv3x3},
    {"winograd_f4x4_int14", WinogradLayout::bytes, WinogradLayout::pack, WinogradLayout::unpack, false,
     avx512bf16::conv3x3_winograd_int14,
     /*run_batch=*/nullptr, avx512bf16::conv3x3_winograd_int14_max_pool},
    {"dense_bf16", dense_bytes, dense_pack_rows, dense_unpack, avx512bf16::dense},
    avx512bf16::round_floats,
};

#if FASTVGG_HAVE_AMXBF16
// No Winograd: at AMX's rate the direct products cost less than Winograd's transforms, and
// bf16 products inside Winograd lose an order of magnitude of accuracy (kernels_bf16.h). Its
// convolution takes a chunk of images in one call (one parallel region, image after image) and
// fuses a following 2x2 max pool, as the fp32 Winograd one does.
const Bf16KernelSet kAmxBf16Set = {
    "amx_bf16",
    {"direct_bf16_amx", AmxLayout::bytes, AmxLayout::pack, AmxLayout::unpack, false, amxbf16::conv3x3,
     amxbf16::conv3x3_batch, amxbf16::conv3x3_batch_max_pool},
    {"none", nullptr, nullptr, nullptr, false, nullptr},
    {"dense_bf16", dense_bytes, dense_pack_rows, dense_unpack, avx512bf16::dense},
    avx512bf16::round_floats,
};
#endif

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

// AMX needs three things: the CPU's AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22),
// the OS saving the tile state (XCR0 bits 17 and 18), and on Linux a per-process permission
// for the tile data, asked once (without it the first tile instruction raises SIGILL).
// Returns "" or why not; computed once.
std::string find_amx_unavailable_reason() {
#if FASTVGG_HAVE_AMXBF16 && defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
  if (!cpu_runs_set()) return "the AVX512_BF16 kernels it builds on cannot run on this CPU";
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 22)))
    return "this CPU does not report AMX-TILE and AMX-BF16";
  unsigned xcr0_low = 0, xcr0_high = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  if ((xcr0_low & (3u << 17)) != (3u << 17)) return "the operating system does not enable the AMX tile state (XCR0)";
  constexpr long kArchRequestXcompPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kXfeatureTileData = 18;                // XFEATURE_XTILEDATA
  if (syscall(SYS_arch_prctl, kArchRequestXcompPermission, kXfeatureTileData) != 0)
    return "Linux refused this process the AMX tile data permission (arch_prctl ARCH_REQ_XCOMP_PERM)";
  return "";
#elif FASTVGG_HAVE_AMXBF16
  return "AMX is only enabled on Linux";
#else
  return "this build of fastvgg has no AMX kernels (the compiler lacked -mamx-tile -mamx-bf16, or the target is not "
         "x86-64)";
#endif
}

const std::string& amx_reason() {
  static const std::string reason = find_amx_unavailable_reason();
  return reason;
}

// FASTVGG_BF16_KERNELS, or "" when unset.
std::string requested_set_name() {
  const char* name = std::getenv("FASTVGG_BF16_KERNELS");
  return name ? std::string(name) : std::string();
}

// `fp32`'s table with `adapt` applied, one per (fp32 table, variant) pair (a bf16 set or the
// bf16x3 method: at most nine), made once and never freed: executors point at their table.
template <typename Adapt>
const KernelTable& derived_table(const KernelTable& fp32, const void* variant, Adapt adapt) {
  static std::mutex mutex;
  static std::vector<std::tuple<const KernelTable*, const void*, std::unique_ptr<KernelTable>>> tables;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const auto& entry : tables)
    if (std::get<0>(entry) == &fp32 && std::get<1>(entry) == variant) return *std::get<2>(entry);
  auto table = std::make_unique<KernelTable>(fp32);
  adapt(*table);
  tables.emplace_back(&fp32, variant, std::move(table));
  return *std::get<2>(tables.back());
}

}  // namespace

std::vector<const Bf16KernelSet*> bf16_kernel_sets() {
  std::vector<const Bf16KernelSet*> sets;
#if FASTVGG_HAVE_AMXBF16
  if (amx_reason().empty()) sets.push_back(&kAmxBf16Set);
#endif
#if FASTVGG_HAVE_AVX512BF16
  if (cpu_runs_set()) sets.push_back(&kAvx512Bf16Set);
#endif
  return sets;
}

const Bf16KernelSet* bf16_kernel_set() {
  const std::vector<const Bf16KernelSet*> sets = bf16_kernel_sets();
  const std::string requested = requested_set_name();
  if (requested.empty()) return sets.empty() ? nullptr : sets.front();
  for (const Bf16KernelSet* set : sets)
    if (requested == set->name) return set;
  return nullptr;
}

std::string amx_unavailable_reason() { return amx_reason(); }

std::string bf16_unavailable_reason() {
  if (bf16_kernel_set()) return "";
#if FASTVGG_HAVE_AVX512BF16
  if (cpu_runs_set())
    return "FASTVGG_BF16_KERNELS='" + requested_set_name() +
           "' names no bf16 kernel set that runs here (expected 'amx_bf16' or 'avx512_bf16'; amx_bf16: " +
           (amx_reason().empty() ? std::string("available") : amx_reason()) + ")";
  return "this CPU does not report AVX512_BF16 and AVX512_VNNI (with AVX-512F/BW/DQ/VL and OS support), which the "
         "bf16 kernel set needs";
#else
  return "this build of fastvgg has no AVX512_BF16 kernels (the compiler lacked -mavx512bf16, or the target is not x86-64)";
#endif
}

const Conv3x3Method* amx_x3_conv_method() {
#if FASTVGG_HAVE_AMXBF16
  if (amx_reason().empty()) return &kAmxX3Conv;
#endif
  return nullptr;
}

const KernelTable* amx_bf16x3_kernel_table(const KernelTable& fp32) {
  const Conv3x3Method* conv = amx_x3_conv_method();
  if (!conv) return nullptr;
  return &derived_table(fp32, conv, [conv](KernelTable& table) {
    table.isa_name = "amx_bf16x3";
    // In the slot of the fp32 Winograd, which "fast" and "bf16x3" pick from one full channel
    // block on; the first layer (3 channels) keeps the fp32 direct kernel, exact and faster
    // there (0.84 against 1.15 ms at 224x224 on the Xeon of bench/results-xeon-amx.md).
    table.conv3x3_winograd = *conv;
  });
}

const KernelTable& bf16_kernel_table(const KernelTable& fp32) {
  const Bf16KernelSet* set = bf16_kernel_set();
  if (!set) throw std::runtime_error(std::string("bf16 kernels unavailable: ") + bf16_unavailable_reason());
  return bf16_kernel_table(fp32, *set);
}

const KernelTable& bf16_kernel_table(const KernelTable& fp32, const Bf16KernelSet& set) {
  return derived_table(fp32, &set, [&set](KernelTable& table) {
    table.isa_name = set.name;
    table.conv3x3_direct = set.conv3x3_direct;
    table.conv3x3_winograd = set.conv3x3_winograd;
    table.dense = set.dense;
  });
}

}  // namespace fastvgg
