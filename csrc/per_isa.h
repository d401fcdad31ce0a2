// FASTVGG_PER_ISA: keeps an inline helper of a shared header out of other ISAs' objects.
//
// The kernel sources are compiled once per instruction set (CMakeLists.txt), each object with
// its own -m flags, and every object that includes tensor.h gets its own compiled copy of
// each inline function it does not inline (AlignedBuffer::resize, BlockedImage::at,
// zero_border, ...). Those copies are weak symbols with one name, and the linker keeps one
// of them for the whole module: the AVX-512 object's copy of zero_border (memset of 64
// bytes becomes one zmm store) could then serve the generic and AVX2 paths and the network,
// and crash with an illegal instruction on a CPU without AVX-512. Whether the compiler
// emits such a copy depends on its inlining choices (at -O3 it happens not to; at -O2 the
// AVX-512 layout object already emits zero_border), so it has to be ruled out by construction.
//
// Inside a per-ISA object (FASTVGG_ISA defined) the attribute adds the ISA to the symbol's
// mangled name (GCC's and Clang's abi_tag: `resize[abi:avx512](...)`), so each ISA object
// has its own copy under its own name, as if the helper lived in the fastvgg::<isa>
// namespace that simd.h and the kernels use. The types themselves (BlockedImage, ...) stay
// shared: they cross the KernelTable boundary. Elsewhere the macro is empty and the helpers
// are ordinary inline functions compiled with the baseline flags.
// tests/test_isa_symbols.py checks the objects: no weak function of an AVX object that
// another object could share contains an instruction past baseline x86-64.
#pragma once

#if defined(FASTVGG_ISA)
#define FASTVGG_PER_ISA_STRINGIFY2(x) #x
#define FASTVGG_PER_ISA_STRINGIFY(x) FASTVGG_PER_ISA_STRINGIFY2(x)
#define FASTVGG_PER_ISA [[gnu::abi_tag(FASTVGG_PER_ISA_STRINGIFY(FASTVGG_ISA))]]
#else
#define FASTVGG_PER_ISA
#endif
