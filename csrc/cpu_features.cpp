#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace fastvgg {

namespace {

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(_M_X64)
  // libgcc's checks include the OS enabling the register state (XCR0), not only CPUID.
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

std::atomic<const KernelTable*> g_active{nullptr};

const KernelTable* initial_table() {
  if (const char* forced = std::getenv("FASTVGG_ISA"); forced && *forced) return &kernels_for(forced);
  return supported_kernel_tables().front();
}

}  // namespace

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

std::vector<const KernelTable*> supported_kernel_tables() {
  std::vector<const KernelTable*> tables;
#if FASTVGG_HAVE_AVX512
  if (cpu_has_avx512()) tables.push_back(&avx512::kernel_table);
#endif
#if FASTVGG_HAVE_AVX2
  if (cpu_has_avx2()) tables.push_back(&avx2::kernel_table);
#endif
  tables.push_back(&generic::kernel_table);
  return tables;
}

const KernelTable& kernels_for(const std::string& isa) {
  std::string choices;
  for (const KernelTable* table : supported_kernel_tables()) {
    if (isa == table->isa_name) return *table;
    choices += choices.empty() ? "" : ", ";
    choices += table->isa_name;
  }
  throw std::invalid_argument("unknown or unsupported instruction set '" + isa +
                              "'; this build on this CPU supports: " + choices);
}

const KernelTable& active_kernels() {
  const KernelTable* table = g_active.load(std::memory_order_acquire);
  if (!table) {
    table = initial_table();
    g_active.store(table, std::memory_order_release);
  }
  return *table;
}

void set_active_kernels(const std::string& isa) { g_active.store(&kernels_for(isa), std::memory_order_release); }

}  // namespace fastvgg
