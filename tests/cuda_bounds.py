"""Error bounds for the CUDA tests of the ops fine-tuned models add (tests/test_cuda_ops_kernels.py,
tests/test_cuda_finetuned.py), derived from the arithmetic:

- a convolution or dense layer sums K products with fmaf from zero, then adds the bias: within
  gamma(K + 1) * sum|terms| of the exact sum (Higham), plus one rounding per extra partial sum.
- an activation f after it moves that error by at most L_f (its Lipschitz constant) and adds
  its own: |f~(y~) - f(y)| <= L_f * bound + r_f * u * (|f(y)| + L_f * bound), r_f the
  activation's own relative error in units of u = 2^-24.
- an activation's own error: r_f = 8 covers the 1 to 4 ulp of the C library's and CUDA's
  expf, expm1f, log1pf, tanhf and erfcf plus the few roundings around them; gelu's erfc is
  evaluated at a rounded argument -x/sqrt(2) (relative error 2u), where erfc's relative
  condition number is at most 2 z^2 + 2 (z = |x|/sqrt 2): r_gelu = 2 x^2 + 16. linear and relu
  are exact.
"""

import numpy as np

from kernel_checks import UNIT_ROUNDOFF, gamma
from numpy_chain import activation as numpy_activation
from numpy_chain import conv as numpy_conv

U = UNIT_ROUNDOFF
# Lipschitz constants: sup |f'| (selu: scale * alpha on the negative side; gelu and swish peak
# a little above 1, at x = sqrt(2) and x = 2.4).
LIPSCHITZ = {"linear": 1.0, "relu": 1.0, "sigmoid": 0.25, "tanh": 1.0, "elu": 1.0, "selu": 1.7581, "gelu": 1.13,
             "swish": 1.1, "softplus": 1.0, "softsign": 1.0, "mish": 1.1, "hard_sigmoid": 1 / 6,
             "hard_sigmoid_keras2": 0.2, "hard_silu": 1.5}
# Added to |f(x)| in an activation's own rounding bound: tf.keras's hard sigmoid rounds 0.2 x
# before adding 0.5, an absolute error where the sum cancels.
FLOOR = {"hard_sigmoid_keras2": 1.0}
# An activation's own relative rounding, in units of U (gelu's grows with x, see own_error):
# a few libm calls each within an ulp or two; mish composes four.
ULPS = {"mish": 16}


def own_error(name, x, slack=0.0):
    """r_f * u * (|f(x)| + slack), plus a floor for results that underflow: the activation's own
    rounding at an argument within slack / L_f of x (where |f| is at most |f(x)| + slack)."""
    x = np.asarray(x, dtype=np.float64)
    if name in ("linear", "relu"):
        return np.zeros_like(x)
    ulps = 2 * (np.abs(x) + slack) ** 2 + 16 if name == "gelu" else ULPS.get(name, 8)
    return ulps * U * (np.abs(numpy_activation(x, name)) + slack + FLOOR.get(name, 0.0)) + 1e-37


def activated_bound(name, pre, sum_bound):
    """The bound on f~(y~) for y~ within sum_bound of the exact pre-activation `pre`."""
    lipschitz = LIPSCHITZ[name]
    return lipschitz * sum_bound + own_error(name, pre, lipschitz * sum_bound)


def conv_exact_and_bound(x, kernel, bias, padding, activation, extra_additions=0):
    """(exact sums, their bound, exact output, its bound) of a 1x1 or 3x3 convolution of x;
    extra_additions: roundings beyond the K products and the bias (the bandwidth-bound dense
    path's partial sums)."""
    same = padding == "same" or kernel.shape[0] == 1
    pre = numpy_conv(x, kernel, bias, same)
    depth = kernel.shape[0] ** 2 * x.shape[3]
    sum_bound = gamma(depth + 1 + extra_additions) * numpy_conv(np.abs(x), np.abs(kernel), np.abs(bias), same)
    return pre, sum_bound, numpy_activation(pre, activation), activated_bound(activation, pre, sum_bound)
