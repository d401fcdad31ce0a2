# The optional CUDA backend, fastvgg._cuda (csrc/cuda/). Included by CMakeLists.txt.
#
# Off by default: a plain `pip install .` builds and links nothing of CUDA. Turn it on with
#   pip install . -C cmake.define.FASTVGG_CUDA=ON     or     FASTVGG_CUDA=ON pip install .
# (pyproject.toml maps the environment variable onto this option). Asked for and no nvcc: the
# configure step stops with a message instead of silently building the CPU package only.
#
# _cuda is its own extension module. It links the CUDA runtime statically and never the
# driver library (libcuda.so.1 is opened by cudart at the first CUDA call), so it imports on a
# machine without a driver and fastvgg.cuda_status() reports why it cannot be used.
option(FASTVGG_CUDA "Build the CUDA backend fastvgg._cuda (needs nvcc)" OFF)
option(FASTVGG_CUDA_WERROR "Treat nvcc and ptxas warnings (register spills included) as errors" OFF)
option(FASTVGG_CUDA_PTXAS_VERBOSE "Print ptxas's register, shared memory and spill figures per kernel" OFF)

if(FASTVGG_CUDA)
  set(_fastvgg_no_nvcc FALSE)
  if(CMAKE_CUDA_COMPILER)
    # Named by the caller: it must exist (CMake's own error would not say what to do).
    find_program(_fastvgg_nvcc NAMES "${CMAKE_CUDA_COMPILER}")
    if(NOT _fastvgg_nvcc)
      set(_fastvgg_no_nvcc TRUE)
    endif()
    unset(_fastvgg_nvcc CACHE)  # look again on the next configure
  else()
    include(CheckLanguage)
    check_language(CUDA)
    if(NOT CMAKE_CUDA_COMPILER)
      set(_fastvgg_no_nvcc TRUE)
    endif()
  endif()
  if(_fastvgg_no_nvcc)
    message(FATAL_ERROR
      "FASTVGG_CUDA=ON, but no CUDA compiler was found. Install the CUDA toolkit (12.0 or newer) and "
      "put nvcc on PATH or pass -DCMAKE_CUDA_COMPILER=/path/to/nvcc (pip: -C cmake.define.CMAKE_CUDA_COMPILER=...); "
      "or build without FASTVGG_CUDA for the CPU-only package.")
  endif()
  # A100 code, H100/H200 code, and compute_90 PTX for newer GPUs to JIT-compile. Never
  # "native": the build machine need not have a GPU, and a wheel must not depend on it.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
    set(CMAKE_CUDA_ARCHITECTURES "80-real;90")
  endif()
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)

  add_library(fastvgg_cuda_kernels OBJECT csrc/cuda/executor.cu)
  set_target_properties(fastvgg_cuda_kernels PROPERTIES POSITION_INDEPENDENT_CODE ON CUDA_RUNTIME_LIBRARY Static)
  target_include_directories(fastvgg_cuda_kernels PRIVATE csrc/cuda)
  target_compile_options(fastvgg_cuda_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3>)
  if(FASTVGG_CUDA_WERROR)
    target_compile_options(fastvgg_cuda_kernels PRIVATE
      $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings -Xptxas=-warn-spills,-warn-lmem-usage,-Werror>)
  endif()
  if(FASTVGG_CUDA_PTXAS_VERBOSE)
    target_compile_options(fastvgg_cuda_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xptxas=-v>)
  endif()

  pybind11_add_module(_cuda MODULE WITH_SOABI csrc/cuda/module.cpp $<TARGET_OBJECTS:fastvgg_cuda_kernels>)
  target_include_directories(_cuda PRIVATE csrc/cuda)
  target_compile_options(_cuda PRIVATE -O2)
  target_compile_definitions(_cuda PRIVATE FASTVGG_CUDA_MODULE_NAME=_cuda)
  target_link_libraries(_cuda PRIVATE CUDA::cudart_static)
  set_target_properties(_cuda PROPERTIES CUDA_RUNTIME_LIBRARY Static)
  install(TARGETS _cuda DESTINATION fastvgg)
endif()
