# The bf16 kernel set (csrc/bf16/): its kernels are one more per-ISA object, built with
# -mavx512bf16 where the compiler has it and chosen at run time only on CPUs that report
# AVX512_BF16; its packers, references, selection, peak and test bindings join _core.
include(CheckCXXCompilerFlag)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  check_cxx_compiler_flag("-mavx512bf16 -mavx512vnni" FASTVGG_COMPILER_HAS_AVX512BF16)
endif()
if(FASTVGG_COMPILER_HAS_AVX512BF16)
  add_library(kernels_avx512bf16 OBJECT csrc/bf16/conv3x3_bf16.cpp csrc/bf16/dense_bf16.cpp
                                        csrc/bf16/winograd_int14.cpp)
  target_compile_options(kernels_avx512bf16 PRIVATE ${FASTVGG_OPT} ${FASTVGG_FLAGS_avx512} -mavx512bf16 -mavx512vnni)
  # Its own ISA namespace for simd.h and the shared Winograd transforms (winograd_f4x4.h), and
  # its own tag on tensor.h's inline helpers (per_isa.h), like the other kernel objects.
  target_compile_definitions(kernels_avx512bf16 PRIVATE FASTVGG_ISA=avx512bf16)
  target_link_libraries(kernels_avx512bf16 PRIVATE OpenMP::OpenMP_CXX)
  target_include_directories(kernels_avx512bf16 PRIVATE csrc)
  target_sources(_core PRIVATE $<TARGET_OBJECTS:kernels_avx512bf16>)
  target_compile_definitions(_core PRIVATE FASTVGG_HAVE_AVX512BF16=1)
endif()
# The AMX-BF16 convolution: one more object, with -mamx-tile -mamx-bf16, run only where the CPU
# reports AMX-TILE and AMX-BF16 and Linux grants the process the tile data state.
if(FASTVGG_COMPILER_HAS_AVX512BF16)
  check_cxx_compiler_flag("-mamx-tile -mamx-bf16" FASTVGG_COMPILER_HAS_AMXBF16)
endif()
if(FASTVGG_COMPILER_HAS_AMXBF16)
  add_library(kernels_amxbf16 OBJECT csrc/bf16/conv3x3_amx.cpp)
  target_compile_options(kernels_amxbf16 PRIVATE ${FASTVGG_OPT} ${FASTVGG_FLAGS_avx512} -mavx512bf16 -mavx512vnni
                                                 -mamx-tile -mamx-bf16)
  target_compile_definitions(kernels_amxbf16 PRIVATE FASTVGG_ISA=amxbf16)
  target_link_libraries(kernels_amxbf16 PRIVATE OpenMP::OpenMP_CXX)
  target_include_directories(kernels_amxbf16 PRIVATE csrc)
  target_sources(_core PRIVATE $<TARGET_OBJECTS:kernels_amxbf16>)
  target_compile_definitions(_core PRIVATE FASTVGG_HAVE_AMXBF16=1)
endif()
target_sources(_core PRIVATE csrc/bf16/pack_bf16.cpp csrc/bf16/reference_bf16.cpp csrc/bf16/kernel_set_bf16.cpp
                             csrc/bf16/dot_peak_bf16.cpp csrc/bf16/bindings_bf16.cpp)
