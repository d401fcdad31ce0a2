// A CPU grid emulator: runs the CUDA kernels of csrc/cuda/kernels/ as plain C++ (g++), so
// their indexing, bounds and barriers are tested on machines without a GPU.
//
// Blocks run one after another, in a shuffled order (a kernel must not depend on the order of
// its blocks). `__shared__` variables become function statics: one copy that the threads of
// the running block share, as on the GPU. The threads of a block run in one of two ways:
//
// - FASTVGG_EMULATOR_OS_THREADS: one OS thread per CUDA thread, `__syncthreads()` a real
//   barrier. A missing barrier is then a real data race that ThreadSanitizer reports
//   (tests/test_cuda_sanitizers.py proves it with a deliberately broken kernel); the
//   sanitizer builds use this mode.
// - otherwise (the tests' Python module): one ucontext fiber per CUDA thread on the calling
//   thread, switched at each `__syncthreads()`, 100x cheaper than waking 256 OS threads per
//   barrier. Between two barriers the fibers run in a shuffled order, so a kernel that reads
//   shared memory before the barrier that publishes it computes wrong numbers.
//
// Threads that return from the kernel early stop taking part in barriers (as on current
// GPUs), but every thread of a block must have passed the same number of barriers by the end
// of the block: otherwise the launch throws (a barrier in divergent code is undefined
// behaviour on the GPU). Races *between* blocks are not detected; the kernels here never let
// two blocks write the same element.
#pragma once

#ifdef __CUDACC__
#error "emulator.h is for the CPU build of the kernels; nvcc compiles them natively"
#endif

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if !defined(FASTVGG_EMULATOR_OS_THREADS)
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

// Per emulated CUDA thread: set by the launcher before each block.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }
inline float __expf(float x) { return std::exp(x); }
// A product rounded on its own, never fused with a following sum (the volatile store keeps the
// host compiler from contracting it), as the GPU's __fmul_rn gives it.
inline float __fmul_rn(float a, float b) {
  volatile float product = a * b;
  return product;
}
template <typename T>
inline T __ldg(const T* p) { return *p; }

namespace fastvgg::emulator {

// A reusable barrier that participants may leave for good (a thread that returned).
class Barrier {
 public:
  void reset(int participants) {
    std::lock_guard<std::mutex> lock(mutex_);
    participants_ = participants;
    arrived_ = 0;
  }
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const std::uint64_t generation = generation_;
    if (++arrived_ == participants_) {
      release();
    } else {
      changed_.wait(lock, [&] { return generation != generation_; });
    }
  }
  void arrive_and_drop() {
    std::lock_guard<std::mutex> lock(mutex_);
    --participants_;
    if (participants_ > 0 && arrived_ == participants_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    changed_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable changed_;
  int participants_ = 0, arrived_ = 0;
  std::uint64_t generation_ = 0;
};

struct BlockState {
  Barrier kernel_barrier;  // __syncthreads
  Barrier block_end;       // the launcher's own step between blocks
};

inline thread_local long barriers_passed = 0;

// Emulated launches share the function-static __shared__ arrays, so only one runs at a time.
inline std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

// The shuffle's seed: fixed per process so a failure reproduces, changed by the tests.
inline std::uint64_t& block_order_seed() {
  static std::uint64_t seed = 0x5eed;
  return seed;
}

inline long& launches_run() {
  static long count = 0;
  return count;
}

inline void check_geometry(dim3 grid, dim3 block) {
  const long threads = long(block.x) * block.y * block.z;
  if (threads < 1 || threads > 1024 || block.z > 64)
    throw std::invalid_argument("emulated launch: block of " + std::to_string(threads) + " threads is not launchable");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
    throw std::invalid_argument("emulated launch: a grid of " + std::to_string(grid.x) + "x" + std::to_string(grid.y) +
                                "x" + std::to_string(grid.z) + " blocks is not launchable");
}

inline std::vector<long> shuffled(long count, std::uint64_t salt) {
  std::vector<long> order(static_cast<std::size_t>(count));
  std::iota(order.begin(), order.end(), 0L);
  std::mt19937_64 shuffle(block_order_seed() * 0x9e3779b97f4a7c15ULL + salt);
  std::shuffle(order.begin(), order.end(), shuffle);
  return order;
}

inline uint3 unflatten(long i, dim3 extent) {
  return uint3(unsigned(i % extent.x), unsigned(i / extent.x % extent.y), unsigned(i / (long(extent.x) * extent.y)));
}

inline std::string divergence_message(long block, long low, long high) {
  return "emulated launch: threads of block " + std::to_string(block) + " passed __syncthreads between " +
         std::to_string(low) + " and " + std::to_string(high) + " times";
}

#if defined(FASTVGG_EMULATOR_OS_THREADS)

inline thread_local BlockState* current_block = nullptr;

// Runs kernel() on every thread of every block of the grid. Throws std::invalid_argument for
// a geometry CUDA would reject and std::logic_error for divergent barriers.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  check_geometry(grid, block);
  const long threads = long(block.x) * block.y * block.z;
  std::lock_guard<std::mutex> serial(launch_mutex());
  const std::vector<long> order = shuffled(long(grid.x) * grid.y * grid.z, std::uint64_t(launches_run()++));

  BlockState state;
  state.kernel_barrier.reset(int(threads));
  state.block_end.reset(int(threads));
  std::vector<long> barrier_counts(static_cast<std::size_t>(threads));
  std::string divergence;
  auto work = [&](long t) {
    current_block = &state;
    blockDim = block;
    gridDim = grid;
    threadIdx = unflatten(t, block);
    for (long b : order) {
      blockIdx = unflatten(b, grid);
      barriers_passed = 0;
      kernel();
      barrier_counts[static_cast<std::size_t>(t)] = barriers_passed;
      state.kernel_barrier.arrive_and_drop();
      state.block_end.arrive_and_wait();
      if (t == 0) {
        const auto [low, high] = std::minmax_element(barrier_counts.begin(), barrier_counts.end());
        if (*low != *high && divergence.empty()) divergence = divergence_message(b, *low, *high);
        state.kernel_barrier.reset(int(threads));
      }
      state.block_end.arrive_and_wait();
    }
    current_block = nullptr;
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<std::size_t>(threads));
  for (long t = 0; t < threads; ++t) pool.emplace_back(work, t);
  for (auto& thread : pool) thread.join();
  if (!divergence.empty()) throw std::logic_error(divergence);
}

inline void sync_block() {
  current_block->kernel_barrier.arrive_and_wait();
  ++barriers_passed;
}

#else  // fibers

struct Fiber {
  ucontext_t context;
  uint3 index;
  bool done = false;
  long barriers = 0;
};

struct FiberScheduler {
  ucontext_t home;
  Fiber* running = nullptr;
  const std::function<void()>* kernel = nullptr;
};

inline FiberScheduler& scheduler() {
  static FiberScheduler instance;  // used under launch_mutex only
  return instance;
}

inline void fiber_main() {
  FiberScheduler& s = scheduler();
  (*s.kernel)();
  s.running->done = true;  // returning resumes `home` through uc_link
}

constexpr std::size_t kFiberStackBytes = 256 * 1024;

// In its own frame: getcontext "returns twice" as far as the compiler knows, and the
// launcher's loop variables must not live where that could clobber them.
__attribute__((noinline)) inline void prepare_fiber(Fiber& f, char* stack, ucontext_t* home) {
  f.done = false;
  f.barriers = 0;
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = stack;
  f.context.uc_stack.ss_size = kFiberStackBytes;
  f.context.uc_link = home;
  makecontext(&f.context, fiber_main, 0);
}

inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  check_geometry(grid, block);
  const long threads = long(block.x) * block.y * block.z;
  std::lock_guard<std::mutex> serial(launch_mutex());
  const std::uint64_t launch_number = std::uint64_t(launches_run()++);
  const std::vector<long> order = shuffled(long(grid.x) * grid.y * grid.z, launch_number);
  static std::vector<char> stacks;  // kept between launches
  stacks.resize(static_cast<std::size_t>(threads) * kFiberStackBytes);
  std::vector<Fiber> fibers(static_cast<std::size_t>(threads));
  FiberScheduler& s = scheduler();
  s.kernel = &kernel;
  blockDim = block;
  gridDim = grid;
  long phase = 0;
  for (long b : order) {
    blockIdx = unflatten(b, grid);
    for (long t = 0; t < threads; ++t) {
      Fiber& f = fibers[static_cast<std::size_t>(t)];
      f.index = unflatten(t, block);
      prepare_fiber(f, stacks.data() + static_cast<std::size_t>(t) * kFiberStackBytes, &s.home);
    }
    // One pass runs every live fiber up to its next barrier (or its end), in a shuffled order.
    for (bool live = true; live; ++phase) {
      live = false;
      for (long t : shuffled(threads, launch_number * 1000003ULL + std::uint64_t(phase))) {
        Fiber& f = fibers[static_cast<std::size_t>(t)];
        if (f.done) continue;
        threadIdx = f.index;
        s.running = &f;
        swapcontext(&s.home, &f.context);
        live = live || !f.done;
      }
    }
    const auto [low, high] = std::minmax_element(fibers.begin(), fibers.end(),
                                                 [](const Fiber& a, const Fiber& c) { return a.barriers < c.barriers; });
    if (low->barriers != high->barriers) throw std::logic_error(divergence_message(b, low->barriers, high->barriers));
  }
  s.running = nullptr;
}

inline void sync_block() {
  FiberScheduler& s = scheduler();
  Fiber* self = s.running;
  ++self->barriers;
  swapcontext(&self->context, &s.home);
}

#endif

}  // namespace fastvgg::emulator

inline void __syncthreads() { fastvgg::emulator::sync_block(); }
