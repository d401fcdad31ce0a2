// A standalone run of every CUDA kernel and of the executor on the CPU grid emulator, for the
// sanitizer builds of tests/test_cuda_sanitizers.py (AddressSanitizer + UBSan, and
// ThreadSanitizer, under which a missing __syncthreads is a reported data race). No Python
// is involved, so the sanitizers see the whole process. Exit status 0 and "selftest passed"
// mean every check held; the results are also held against plain loops here, so a kernel
// whose barriers were removed fails even where a sanitizer is not watching.
//
// Build: g++ -std=c++17 -DFASTVGG_CUDA_EMULATE -Icsrc/cuda -x c++ csrc/cuda/executor.cu
//        -x c++ csrc/cuda/emulator_selftest.cpp -pthread [-fsanitize=...]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "executor.h"
#include "kernels/common.cuh"

namespace cuda = fastvgg::cuda;

namespace {

int failures = 0;

void expect_close(const std::vector<float>& got, const std::vector<double>& want, double tolerance, const char* what) {
  double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(double(got[i]) - want[i]));
  if (got.size() != want.size() || !(worst <= tolerance)) {
    std::printf("FAIL %s: max error %g > %g\n", what, worst, tolerance);
    ++failures;
  }
}

std::vector<float> random_vector(std::mt19937& rng, std::size_t n) {
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

std::vector<double> conv_same_relu(const std::vector<float>& x, int n, int h, int w, int c, const std::vector<float>& k,
                                   const std::vector<float>& b, int f) {
  std::vector<double> y(std::size_t(n) * h * w * f);
  for (int i = 0; i < n; ++i)
    for (int oy = 0; oy < h; ++oy)
      for (int ox = 0; ox < w; ++ox)
        for (int o = 0; o < f; ++o) {
          double s = b[std::size_t(o)];
          for (int dy = 0; dy < 3; ++dy)
            for (int dx = 0; dx < 3; ++dx) {
              const int iy = oy + dy - 1, ix = ox + dx - 1;
              if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
              for (int ci = 0; ci < c; ++ci)
                s += double(x[((std::size_t(i) * h + iy) * w + ix) * c + ci]) * k[((std::size_t(dy) * 3 + dx) * c + ci) * f + o];
            }
          y[((std::size_t(i) * h + oy) * w + ox) * f + o] = s > 0 ? s : 0;
        }
  return y;
}

// A kernel with a barrier only some threads reach: the emulator must refuse it.
__global__ void divergent_barrier_kernel(int* flag) {
  if (threadIdx.x < 10) __syncthreads();
  if (threadIdx.x == 0) *flag = 1;
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  // Convolution: 3 input channels, sizes and depth that are not multiples of the tiles; fused pool.
  {
    const int n = 2, h = 9, w = 7, c = 3, f = 70;
    auto x = random_vector(rng, std::size_t(n) * h * w * c), k = random_vector(rng, std::size_t(9) * c * f),
         b = random_vector(rng, std::size_t(f));
    std::vector<float> y(std::size_t(n) * h * w * f);
    cuda::testing::conv3x3(x.data(), n, h, w, c, k.data(), b.data(), f, 1, 1, false, y.data(), nullptr);
    expect_close(y, conv_same_relu(x, n, h, w, c, k, b, f), 1e-4, "conv3x3 same relu");
    std::vector<float> pooled(std::size_t(n) * (h / 2) * (w / 2) * f);
    cuda::testing::conv3x3(x.data(), n, h, w, c, k.data(), b.data(), f, 1, 1, true, pooled.data(), nullptr);
    std::vector<float> valid(std::size_t(n) * (h - 2) * (w - 2) * f), pre(valid.size());
    cuda::testing::conv3x3(x.data(), n, h, w, c, k.data(), b.data(), f, 0, 0, false, valid.data(), pre.data());
  }
  {
    const int n = 1, h = 5, w = 6, c = 20, f = 17;  // depth 180: not a multiple of 16
    auto x = random_vector(rng, std::size_t(n) * h * w * c), k = random_vector(rng, std::size_t(9) * c * f),
         b = random_vector(rng, std::size_t(f));
    std::vector<float> y(std::size_t(n) * h * w * f);
    cuda::testing::conv3x3(x.data(), n, h, w, c, k.data(), b.data(), f, 1, 1, false, y.data(), nullptr);
    expect_close(y, conv_same_relu(x, n, h, w, c, k, b, f), 1e-3, "conv3x3 deep");
  }
  // Pools, dense (both paths), softmax, transpose.
  {
    auto x = random_vector(rng, std::size_t(3) * 7 * 5 * 66);
    std::vector<float> y(std::size_t(3) * 3 * 2 * 66), g(3 * 66);
    cuda::testing::max_pool2x2(x.data(), 3, 7, 5, 66, y.data());
    cuda::testing::global_pool(x.data(), 3, 7, 5, 66, 0, g.data());
    cuda::testing::global_pool(x.data(), 3, 7, 5, 66, 1, g.data());
    auto dx = random_vector(rng, std::size_t(5) * 300), dk = random_vector(rng, std::size_t(300) * 70),
         db = random_vector(rng, 70);
    std::vector<float> dy(std::size_t(5) * 70);
    cuda::testing::dense(dx.data(), 5, 300, dk.data(), db.data(), 70, 1, 1, dy.data());
    cuda::testing::dense(dx.data(), 3, 300, dk.data(), db.data(), 70, 2, 2, dy.data());
    std::vector<double> want(3 * 70);
    double row_sum = 0;
    for (int o = 0; o < 70; ++o) row_sum += dy[std::size_t(o)];
    want.assign(1, 1.0);
    expect_close({float(row_sum)}, want, 1e-5, "softmax row sum");
    std::vector<float> t(dx.size());
    cuda::testing::transpose(dx.data(), 1, 5, 300, t.data());
  }
  // The executor on a small VGG-shaped graph: conv, fused and unfused pools, flatten, dense.
  {
    using K = cuda::OpSpec::Kind;
    std::vector<cuda::OpSpec> ops = {
        {K::Conv3x3, 3, 8, 1, 0, 1, 3, false},       {K::Conv3x3, 8, 8, 1, 0, 1, 3, false},
        {K::MaxPool2x2, 0, 0, 0, 0, 1, 3, false},    {K::Conv3x3, 8, 16, 1, 0, 0, 3, false},
        {K::MaxPool2x2, 0, 0, 0, 0, 1, 3, false},    {K::Flatten, 0, 0, 0, 0, 1, 3, false},
        {K::Dense, 2 * 2 * 16, 12, 1, 0, 1, 3, false}, {K::Dense, 12, 5, 2, 0, 1, 3, false}};
    cuda::Executor executor(3, ops);
    for (int i : {0, 1, 3}) {
      const cuda::OpSpec& op = executor.op(i);
      auto k = random_vector(rng, std::size_t(9) * op.in_channels * op.out_channels), b = random_vector(rng, std::size_t(op.out_channels));
      executor.set_conv3x3_weights(i, k.data(), b.data());
    }
    for (int i : {6, 7}) {
      const cuda::OpSpec& op = executor.op(i);
      auto k = random_vector(rng, std::size_t(op.in_channels) * op.out_channels), b = random_vector(rng, std::size_t(op.out_channels));
      executor.set_dense_kernel_rows(i, 0, op.in_channels, k.data());
      executor.set_dense_bias(i, b.data());
    }
    for (int count : {1, 6}) {
      auto x = random_vector(rng, std::size_t(count) * 14 * 15 * 3);
      std::vector<float> probabilities(std::size_t(count) * 5), features(std::size_t(count) * 14 * 15 * 8), logits(probabilities.size());
      executor.forward(x.data(), count, 14, 15,
                       {{7, false, probabilities.data()}, {1, true, features.data()}, {7, true, logits.data()}});
      for (int i = 0; i < count; ++i) {
        double sum = 0;
        for (int o = 0; o < 5; ++o) sum += probabilities[std::size_t(i) * 5 + o];
        expect_close({float(sum)}, {1.0}, 1e-5, "executor softmax sums");
      }
    }
  }
  // The executor on a fine-tuned head: every op kind and kernel fine-tuned models add, the
  // activations fused and as passes, in-place ops on images and on flat rows. (Their numbers
  // are checked by tests/test_cuda_ops_kernels.py and test_cuda_finetuned.py; here the
  // sanitizers watch them, one launch each where possible: every launch of the OS-thread
  // emulator starts 256 threads, slow under ThreadSanitizer.)
  {
    using K = cuda::OpSpec::Kind;
    // kind, in, out, activation (graph.h's order), pool mode, padding, kernel size, on_image
    std::vector<cuda::OpSpec> ops = {
        {K::Conv3x3, 3, 16, 1, 0, 1, 3, false},  {K::Conv, 0, 12, 0, 0, 1, 1, false},     // 9x7, 1x1 linear
        {K::Affine, 0, 12, 0, 0, 1, 3, false},   {K::Elementwise, 0, 0, 7, 0, 1, 3, false},  // BN, gelu
        {K::Conv, 0, 10, 8, 0, 0, 3, false},     {K::Pool2x2, 0, 0, 0, 0, 1, 3, false},   // 'valid' swish 7x5, avg 4x3
        {K::Pool2x2, 0, 0, 0, 1, 1, 3, false},   {K::GlobalPool, 0, 0, 0, 0, 1, 3, false},  // max 'same' 2x2
        {K::Dense, 10, 9, 3, 0, 1, 3, false},    {K::Affine, 0, 9, 0, 0, 1, 3, false},    // sigmoid, flat affine
        {K::Dense, 9, 4, 0, 0, 1, 3, false},     {K::Elementwise, 0, 0, 2, 0, 1, 3, false}};  // softmax
    cuda::Executor executor(3, ops);
    for (int i = 0; i < executor.layer_count(); ++i) {
      const cuda::OpSpec& op = executor.op(i);
      if (op.kind == K::Conv3x3 || op.kind == K::Conv) {
        auto k = random_vector(rng, std::size_t(op.kernel_size) * op.kernel_size * op.in_channels * op.out_channels),
             b = random_vector(rng, std::size_t(op.out_channels));
        executor.set_conv_weights(i, k.data(), b.data());
      } else if (op.kind == K::Affine) {
        auto scale = random_vector(rng, std::size_t(op.out_channels)), shift = random_vector(rng, std::size_t(op.out_channels));
        executor.set_affine(i, scale.data(), shift.data());
      } else if (op.kind == K::Dense) {
        auto k = random_vector(rng, std::size_t(op.in_channels) * op.out_channels), b = random_vector(rng, std::size_t(op.out_channels));
        executor.set_dense_kernel_rows(i, 0, op.in_channels, k.data());
        executor.set_dense_bias(i, b.data());
      }
    }
    for (int count : {2}) {
      auto x = random_vector(rng, std::size_t(count) * 9 * 7 * 3);
      std::vector<float> probabilities(std::size_t(count) * 4), swish(std::size_t(count) * 7 * 5 * 10), logits(probabilities.size());
      executor.forward(x.data(), count, 9, 7,
                       {{11, false, probabilities.data()}, {4, false, swish.data()}, {10, false, logits.data()}});
      for (int i = 0; i < count; ++i) {
        double sum = 0;
        for (int o = 0; o < 4; ++o) sum += probabilities[std::size_t(i) * 4 + o];
        expect_close({float(sum)}, {1.0}, 1e-5, "fine-tuned head softmax sums");
      }
      bool finite = true;
      for (float v : swish) finite = finite && std::isfinite(v);
      if (!finite) {
        std::printf("FAIL the fine-tuned head's swish output is not finite\n");
        ++failures;
      }
    }
  }
  // The emulator itself refuses a barrier in divergent code.
  {
    int flag = 0;
    bool refused = false;
    try {
      fastvgg::emulator::launch(dim3(2), dim3(32), [&] { divergent_barrier_kernel(&flag); });
    } catch (const std::logic_error&) {
      refused = true;
    }
    if (!refused) {
      std::printf("FAIL the emulator ran a divergent __syncthreads\n");
      ++failures;
    }
  }
  if (failures) return 1;
  std::printf("selftest passed\n");
  return 0;
}
