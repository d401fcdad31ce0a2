// This instruction set's table of the ops fine-tuned models add (ops.h), compiled per ISA.
#include "ops.h"

namespace fastvgg {
namespace FASTVGG_ISA {

#define FASTVGG_OPS_STRINGIFY2(x) #x
#define FASTVGG_OPS_STRINGIFY(x) FASTVGG_OPS_STRINGIFY2(x)

const OpsTable ops_table = {
    FASTVGG_OPS_STRINGIFY(FASTVGG_ISA), conv1x1, crop_border, pool2x2, affine_blocked, affine_rows, activation_blocked,
    activation_rows, prelu_blocked, prelu_rows, upsample_nearest,
};

}  // namespace FASTVGG_ISA
}  // namespace fastvgg
