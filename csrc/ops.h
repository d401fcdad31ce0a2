// The ops a fine-tuned model's layers need beyond VGG's own: 1x1 and 'valid' 3x3 convolution,
// 2x2 average pooling and 'same' max pooling, per-channel affine maps (BatchNormalization,
// Rescaling, Normalization), element-wise activations, PReLU and nearest-neighbour upsampling.
//
// Like KernelTable, one OpsTable per instruction set, filled from the sources compiled per ISA
// (conv_general.cpp, pool2x2.cpp, affine.cpp, activation.cpp, prelu.cpp, upsample.cpp); the plain
// reference twins work on NHWC arrays and share nothing with the fast ones.
#pragma once

#include <cstddef>
#include <string>

#include "kernels.h"
#include "tensor.h"

namespace fastvgg {

// Keras's element-wise activations, with its formulas (see activation.cpp). Softmax is not
// element-wise: it runs on flat rows through softmax_rows.
enum class Elementwise {
  Linear, Relu, Sigmoid, Tanh, Elu, Selu, Gelu, Swish, Softplus, LeakyRelu, ClippedRelu,
  Softsign, Exponential, Mish, HardSigmoid, HardSigmoidKeras2, HardSilu
};

// Throws std::invalid_argument naming the choices.
Elementwise parse_elementwise(const std::string& name);
const char* elementwise_name(Elementwise f);

struct OpsTable {
  const char* isa_name;
  // out = ReLU?(conv1x1(in) + bias); weights packed by pack_dense_rows as a (in, out) matrix,
  // bias padded to the block. out has in's height and width.
  void (*conv1x1)(const BlockedImage& in, const float* packed_weights, const float* bias, bool relu,
                  const BlockedImage& out, int threads);
  // out = in without its outermost pixel ring: a 'same' 3x3 convolution's output cropped this way is
  // exactly the 'valid' one (only the ring's outputs read the zero padding).
  void (*crop_border)(const BlockedImage& in, const BlockedImage& out, int threads);
  // 2x2 window, stride 2. out.height is in.height / 2 ('valid') or (in.height + 1) / 2 ('same', a
  // window at the far edge then has fewer pixels); likewise the width. Max ignores the missing
  // pixels; average divides by the pixels present, as Keras (TensorFlow) does.
  void (*pool2x2)(const BlockedImage& in, GlobalPoolMode mode, const BlockedImage& out, int threads);
  // In place, x = x * scale[c] + shift[c]; scale and shift padded with zeros to whole blocks, so
  // the padding channels stay zero. The border is not touched.
  void (*affine_blocked)(const BlockedImage& image, const float* scale, const float* shift, int threads);
  // In place on `rows` rows of `cols` floats, tightly packed.
  void (*affine_rows)(float* rows, int count, int cols, const float* scale, const float* shift);
  // In place on the image's pixels; the border and the padding channels stay zero whatever f(0) is.
  // params are LeakyRelu's and ClippedRelu's (the other functions ignore them).
  void (*activation_blocked)(const BlockedImage& image, Elementwise f, const ActivationParams& params, int threads);
  void (*activation_rows)(float* values, std::size_t count, Elementwise f, const ActivationParams& params);
  // Keras's PReLU in place on the image's pixels: alphas blocked as [blocks][alpha_height]
  // [alpha_width][16], padded with zeros; an extent of 1 is shared by every row (column). The
  // border is not touched.
  void (*prelu_blocked)(const BlockedImage& image, const float* alphas, int alpha_height, int alpha_width, int threads);
  // In place on `count` rows of `cols` floats, `stride` floats apart; one alpha per column.
  void (*prelu_rows)(float* rows, int count, int cols, std::ptrdiff_t stride, const float* alphas);
  // Keras's nearest-neighbour UpSampling2D: out is size_height x size_width times in's size.
  void (*upsample_nearest)(const BlockedImage& in, int size_height, int size_width, const BlockedImage& out,
                           int threads);
};

#define FASTVGG_DECLARE_OPS(isa)                                                                         \
  namespace isa {                                                                                        \
  void conv1x1(const BlockedImage& in, const float* packed_weights, const float* bias, bool relu,        \
               const BlockedImage& out, int threads);                                                    \
  void crop_border(const BlockedImage& in, const BlockedImage& out, int threads);                        \
  void pool2x2(const BlockedImage& in, GlobalPoolMode mode, const BlockedImage& out, int threads);       \
  void affine_blocked(const BlockedImage& image, const float* scale, const float* shift, int threads);   \
  void affine_rows(float* rows, int count, int cols, const float* scale, const float* shift);            \
  void activation_blocked(const BlockedImage& image, Elementwise f, const ActivationParams& params,      \
                          int threads);                                                                  \
  void activation_rows(float* values, std::size_t count, Elementwise f, const ActivationParams& params); \
  void prelu_blocked(const BlockedImage& image, const float* alphas, int alpha_height, int alpha_width,  \
                     int threads);                                                                       \
  void prelu_rows(float* rows, int count, int cols, std::ptrdiff_t stride, const float* alphas);         \
  void upsample_nearest(const BlockedImage& in, int size_height, int size_width, const BlockedImage& out,\
                        int threads);                                                                    \
  extern const OpsTable ops_table;                                                                       \
  }

FASTVGG_DECLARE_OPS(generic)
FASTVGG_DECLARE_OPS(avx2)
FASTVGG_DECLARE_OPS(avx512)

// PReLU's alpha, (alpha_height, alpha_width, channels), to and from the layout prelu_blocked
// reads: [blocks][alpha_height][alpha_width][16]. pack writes every float of the layout, the
// padding channels as zeros (so they stay zero), prelu_packed_floats of them.
std::size_t prelu_packed_floats(int alpha_height, int alpha_width, int channels);
void pack_prelu_alpha(const float* alpha, int alpha_height, int alpha_width, int channels, float* packed);
void unpack_prelu_alpha(const float* packed, int alpha_height, int alpha_width, int channels, float* alpha);

// The table of the instruction set a KernelTable was built for (same name).
const OpsTable& ops_for(const KernelTable& kernels);

namespace reference {
// 'same' (zero padding) or 'valid' cross-correlation with a kernel_size x kernel_size kernel
// (HWIO), stride 1; bias may be null. Output height: height (same) or height - kernel_size + 1.
void conv(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio,
          int kernel_size, bool same, const float* bias, int out_channels, float* y);
// 2x2, stride 2, 'valid' or 'same' (see OpsTable::pool2x2).
void pool2x2(const float* x, int images, int height, int width, int channels, GlobalPoolMode mode, bool same,
             float* y);
// y[p][c] = x[p][c] * scale[c] + shift[c] over `pixels` rows of `channels`.
void affine(const float* x, std::size_t pixels, int channels, const float* scale, const float* shift, float* y);
// Keras's PReLU on NHWC images (height x width pixels; 1 x 1 for flat rows of `channels`),
// alpha of alpha_height x alpha_width x channels, an extent of 1 shared; in double, rounded once.
void prelu(const float* x, int images, int height, int width, int channels, const float* alpha, int alpha_height,
           int alpha_width, float* y);
// Keras's nearest-neighbour UpSampling2D on NHWC images.
void upsample_nearest(const float* x, int images, int height, int width, int channels, int size_height, int size_width,
                      float* y);
// Keras's formula, evaluated in double and rounded once.
void activation(const float* x, std::size_t count, Elementwise f, const ActivationParams& params, float* y);
}  // namespace reference

}  // namespace fastvgg
