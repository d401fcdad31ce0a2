// Scratch memory that kernels borrow from their caller.
//
// Kernels keep no memory between calls (no statics, no thread_local): a caller (an executor,
// a test binding) owns a KernelScratch, sized by the kernels as they need it, and frees it
// with itself. One scratch must not be used by two calls at the same time.
#pragma once

#include <cstddef>

#include "tensor.h"

namespace fastvgg {

struct KernelScratch {
  // Winograd: transformed inputs (V) and products (M) of one block of tiles per thread.
  AlignedBuffer transformed_input;
  AlignedBuffer products;

  FASTVGG_PER_ISA std::size_t bytes() const { return (transformed_input.size() + products.size()) * sizeof(float); }
};

}  // namespace fastvgg
