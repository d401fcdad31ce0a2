// Picks the OpsTable that matches a KernelTable: both are compiled for the same instruction
// sets, so the kernel table the CPU chose (cpu_features.cpp) names the ops table too.
#include <cstring>

#include "ops.h"

namespace fastvgg {

const OpsTable& ops_for(const KernelTable& kernels) {
  // By name: "avx512" (and any other kernel set for that CPU, a bf16 one say, whose name begins
  // with it), "avx2", else the plain C++ table.
#if FASTVGG_HAVE_AVX512
  if (std::strncmp(kernels.isa_name, "avx512", 6) == 0) return avx512::ops_table;
#endif
#if FASTVGG_HAVE_AVX2
  if (std::strncmp(kernels.isa_name, "avx2", 4) == 0) return avx2::ops_table;
#endif
  return generic::ops_table;
}

}  // namespace fastvgg
