// This instruction set's kernel table, filled from the op families compiled beside it.
#include "kernels.h"

namespace fastvgg {
namespace FASTVGG_ISA {

#define FASTVGG_STRINGIFY2(x) #x
#define FASTVGG_STRINGIFY(x) FASTVGG_STRINGIFY2(x)

const KernelTable kernel_table = {
    FASTVGG_STRINGIFY(FASTVGG_ISA), conv3x3, conv3x3_winograd, max_pool2x2, global_pool, dense, nhwc_to_blocked, blocked_to_nhwc,
};

}  // namespace FASTVGG_ISA
}  // namespace fastvgg
