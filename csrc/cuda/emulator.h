// A CPU grid emulator: runs the CUDA kernels of csrc/cuda/kernels/ as plain C++ (g++), so
// their indexing, bounds and barriers are tested on machines without a GPU.
//
// Each launch starts one OS thread per CUDA thread of a block (blockDim.x*y*z, at most 1024);
// those threads run every block of the grid in turn, in a shuffled order (a kernel must not
// depend on the order of its blocks). `__syncthreads()` is a real barrier between them, so a
// missing barrier is a real data race that ThreadSanitizer reports (tests/test_cuda_sanitizers.py
// proves it with a deliberately broken kernel). `__shared__` variables become function
// statics: one copy that all threads of the running block share, as on the GPU. Blocks run one
// after another, so races *between* blocks are not detected; the kernels here never let two
// blocks write the same element.
//
// Threads that return from the kernel early drop out of the barrier (as on current GPUs) but
// every thread of a block must have passed the same number of barriers by the end of the
// block: otherwise the launch throws (a barrier in divergent code is undefined behaviour on
// the GPU).
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

inline thread_local BlockState* current_block = nullptr;
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

// Runs kernel() on every thread of every block of the grid. Throws std::invalid_argument for
// a geometry CUDA would reject and std::logic_error for divergent barriers.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  const long threads = long(block.x) * block.y * block.z;
  const long blocks = long(grid.x) * grid.y * grid.z;
  if (threads < 1 || threads > 1024 || block.z > 64)
    throw std::invalid_argument("emulated launch: block of " + std::to_string(threads) + " threads is not launchable");
  if (blocks < 1 || grid.y > 65535 || grid.z > 65535)
    throw std::invalid_argument("emulated launch: grid of " + std::to_string(blocks) + " blocks is not launchable");
  std::lock_guard<std::mutex> serial(launch_mutex());
  std::vector<long> order(static_cast<std::size_t>(blocks));
  std::iota(order.begin(), order.end(), 0L);
  std::mt19937_64 shuffle(block_order_seed() + static_cast<std::uint64_t>(launches_run()++));
  std::shuffle(order.begin(), order.end(), shuffle);

  BlockState state;
  state.kernel_barrier.reset(int(threads));
  state.block_end.reset(int(threads));
  std::vector<long> barrier_counts(static_cast<std::size_t>(threads));
  std::string divergence;
  auto work = [&](long t) {
    current_block = &state;
    blockDim = block;
    gridDim = grid;
    threadIdx = uint3(unsigned(t % block.x), unsigned(t / block.x % block.y), unsigned(t / (long(block.x) * block.y)));
    for (long b : order) {
      blockIdx = uint3(unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (long(grid.x) * grid.y)));
      barriers_passed = 0;
      kernel();
      barrier_counts[static_cast<std::size_t>(t)] = barriers_passed;
      state.kernel_barrier.arrive_and_drop();
      state.block_end.arrive_and_wait();
      if (t == 0) {
        const auto [low, high] = std::minmax_element(barrier_counts.begin(), barrier_counts.end());
        if (*low != *high && divergence.empty())
          divergence = "threads of block " + std::to_string(b) + " passed __syncthreads between " +
                       std::to_string(*low) + " and " + std::to_string(*high) + " times";
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
  if (!divergence.empty()) throw std::logic_error("emulated launch: " + divergence);
}

}  // namespace fastvgg::emulator

inline void __syncthreads() {
  fastvgg::emulator::current_block->kernel_barrier.arrive_and_wait();
  ++fastvgg::emulator::barriers_passed;
}
