// Chooses the bf16 kernel set from what this build has and what the CPU reports.
#include "bf16/kernels_bf16.h"
#include "cpu_features.h"

namespace fastvgg {

#if FASTVGG_HAVE_AVX512BF16
namespace {
const Bf16KernelSet kAvx512Bf16Set = {
    "avx512_bf16",      packed_conv3x3_bf16_size, pack_conv3x3_bf16, avx512bf16::conv3x3,
    packed_dense_bf16_size, pack_dense_rows_bf16, avx512bf16::dense,
    packed_winograd_int14_size, pack_winograd_int14, avx512bf16::conv3x3_winograd_int14, avx512bf16::round_floats,
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
}  // namespace
#endif

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

}  // namespace fastvgg
