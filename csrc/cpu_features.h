// Run-time choice of the kernel table from the CPU's features.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace fastvgg {

// Instruction sets this build has kernels for AND this CPU can run, fastest first.
std::vector<const KernelTable*> supported_kernel_tables();
// The table the network uses: the fastest supported one, unless FASTVGG_ISA or
// set_active_kernels chose another.
const KernelTable& active_kernels();
// Throws std::invalid_argument naming the choices when `isa` is unknown or unsupported here.
const KernelTable& kernels_for(const std::string& isa);
void set_active_kernels(const std::string& isa);
// AVX512_BF16 (vdpbf16ps) with everything the avx512 kernels need: the bf16 kernel set's test.
bool cpu_has_avx512_bf16();

}  // namespace fastvgg
