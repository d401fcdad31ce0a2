// This instruction set's fp32 kernel set, filled from the op families compiled beside it.
// The fp32 weight layouts are the same on every ISA; only the run functions differ.
#include "kernels.h"
#include "winograd_batch.h"

namespace fastvgg {
namespace FASTVGG_ISA {

#define FASTVGG_STRINGIFY2(x) #x
#define FASTVGG_STRINGIFY(x) FASTVGG_STRINGIFY2(x)

const KernelTable kernel_table = {
    FASTVGG_STRINGIFY(FASTVGG_ISA),
    fp32_direct_method(conv3x3),
    fp32_winograd_method(conv3x3_winograd, conv3x3_winograd_batch, conv3x3_winograd_batch_max_pool),
    fp32_dense_method(dense),
    max_pool2x2,
    global_pool,
    nhwc_to_blocked,
    blocked_to_nhwc,
};

}  // namespace FASTVGG_ISA
}  // namespace fastvgg
