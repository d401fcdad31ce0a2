// Picks the OpsTable that matches a KernelTable: both are compiled for the same instruction
// sets, so the kernel table the CPU chose (cpu_features.cpp) names the ops table too.
#include <cstring>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace fastvgg {

const OpsTable& ops_for(const KernelTable& kernels) {
#if FASTVGG_HAVE_AVX512
  if (std::strcmp(kernels.isa_name, avx512::ops_table.isa_name) == 0) return avx512::ops_table;
#endif
#if FASTVGG_HAVE_AVX2
  if (std::strcmp(kernels.isa_name, avx2::ops_table.isa_name) == 0) return avx2::ops_table;
#endif
  if (std::strcmp(kernels.isa_name, generic::ops_table.isa_name) == 0) return generic::ops_table;
  throw std::logic_error(std::string("no ops table for instruction set '") + kernels.isa_name + "'");
}

}  // namespace fastvgg
