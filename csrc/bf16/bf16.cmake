# The bf16 kernel set (csrc/bf16/): its kernels are one more per-ISA object, built with
# -mavx512bf16 where the compiler has it and chosen at run time only on CPUs that report
# AVX512_BF16; its packers, references, selection, peak and test bindings join _core.
include(CheckCXXCompilerFlag)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  check_cxx_compiler_flag("-mavx512bf16 -mavx512vnni" FASTVGG_COMPILER_HAS_AVX512BF16)
endif()
# One bf16 kernel object: its own ISA namespace for simd.h and the shared Winograd transforms
# (winograd_f4x4.h) and its own tag on tensor.h's inline helpers (per_isa.h), like the other
# kernel objects, joined to _core with FASTVGG_HAVE_<ISA>.
function(fastvgg_add_bf16_kernels isa sources flags)
  add_library(kernels_${isa} OBJECT ${sources})
  target_compile_options(kernels_${isa} PRIVATE ${FASTVGG_OPT} ${FASTVGG_FLAGS_avx512} ${flags})
  target_compile_definitions(kernels_${isa} PRIVATE FASTVGG_ISA=${isa})
  target_link_libraries(kernels_${isa} PRIVATE OpenMP::OpenMP_CXX)
  target_include_directories(kernels_${isa} PRIVATE csrc)
  target_sources(_core PRIVATE $<TARGET_OBJECTS:kernels_${isa}>)
  string(TOUPPER ${isa} upper)
  target_compile_definitions(_core PRIVATE FASTVGG_HAVE_${upper}=1)
endfunction()

if(FASTVGG_COMPILER_HAS_AVX512BF16)
  fastvgg_add_bf16_kernels(avx512bf16 "csrc/bf16/conv3x3_bf16.cpp;csrc/bf16/dense_bf16.cpp;csrc/bf16/winograd_int14.cpp"
                           "-mavx512bf16;-mavx512vnni")
  # The AMX-BF16 convolution: one more object, run only where the CPU reports AMX-TILE and
  # AMX-BF16 and Linux grants the process the tile data state.
  check_cxx_compiler_flag("-mamx-tile -mamx-bf16" FASTVGG_COMPILER_HAS_AMXBF16)
endif()
if(FASTVGG_COMPILER_HAS_AMXBF16)
  fastvgg_add_bf16_kernels(amxbf16 csrc/bf16/conv3x3_amx.cpp "-mavx512bf16;-mavx512vnni;-mamx-tile;-mamx-bf16")
endif()
target_sources(_core PRIVATE csrc/bf16/pack_bf16.cpp csrc/bf16/reference_bf16.cpp csrc/bf16/kernel_set_bf16.cpp
                             csrc/bf16/dot_peak_bf16.cpp csrc/bf16/bindings_bf16.cpp)
