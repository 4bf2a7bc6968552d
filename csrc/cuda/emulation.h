// CPU emulation of the CUDA features the kernels in csrc/cuda use, for tests on machines without a GPU (see
// platform.h). Never part of gatedrnn._C: tests/test_cuda_emulated.py compiles lstm.cu and gru.cu with a host
// compiler and GATEDRNN_EMULATE_CUDA into a separate test library whose ops are torch.ops.gatedrnn_emulated.*.
//
// A launch runs the grid's blocks one after another; a block's threads are CPU threads that meet at a
// barrier in __syncthreads(), and its __shared__ variables are function statics (one block runs at a time).
// WMMA fragments hold whole tiles in every lane; the warp-collective calls give every lane the same result
// and only lane 0 stores.
//
// Built for ThreadSanitizer (.ci/sanitize), this is a race detector for the kernels' shared memory: every
// thread of a block reads and writes the one static object that stands for its shared memory (no copy per
// thread), and the only ordering between a block's threads is the barrier's, so an access pair that no
// __syncthreads() separates is reported as a data race. Each WMMA load reads the whole tile from shared
// memory in every lane and each store writes the whole tile (from lane 0), so they count as real accesses
// too; warp-collective calls imply no ordering between lanes here, as on GPUs with independent thread
// scheduling. What this cannot see: races between blocks through global memory (blocks run one after
// another), and warp-level primitives, which the kernels do not use.
//
// GATEDRNN_EMULATION_SKIP_BARRIER=FILE:LINE (e.g. step_tile.cuh:88) makes the __syncthreads() at that line a
// no-op, in every thread alike: tests/test_cuda_races.py removes each barrier in turn this way and expects
// ThreadSanitizer to report the race, which proves the detector sees every barrier's absence.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <barrier>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

#define GATEDRNN_CUDA_LIBRARY gatedrnn_emulated
#define GATEDRNN_CUDA_DISPATCH_KEY CPU

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;

namespace gatedrnn::cuda {
namespace emulation {

struct Index {
  unsigned x, y, z;
};
inline thread_local Index thread_index{0, 0, 0};
inline thread_local Index block_index{0, 0, 0};
inline std::barrier<>* block_barrier = nullptr;

}  // namespace emulation

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }

// One "SM": the row-block size then follows the step's rows alone, so that the emulation tests reach each
// rows-per-thread kernel by their batch sizes (3, 12, 40).
inline int64_t multiprocessor_count() { return 1; }

namespace emulation {

// The CPU threads that run the emulated blocks: created once, then reused by every block of every launch.
// Creating a block's 128-256 threads afresh took about 14 ms per block, and 150 ms under ThreadSanitizer,
// which made the emulation tests' time mostly thread creation. A block starts and ends through one mutex and
// two condition variables, which order the blocks one after another as creating and joining their threads
// did; within a block, __syncthreads()' barrier stays the only ordering between threads.
class BlockThreads {
 public:
  // Never destroyed: its idle threads wait on a condition variable until the process exits.
  static BlockThreads& instance() {
    static BlockThreads* threads = new BlockThreads;
    return *threads;
  }

  // Runs body(t) on threads t = 0 .. count - 1, each on its own CPU thread, and returns when all have; their
  // __syncthreads() is a barrier of `count` threads, made and published here under block_, so that blocks
  // launched from two host threads at once cannot swap each other's barrier.
  void run(unsigned count, const std::function<void(unsigned)>& body) {
    std::lock_guard<std::mutex> one_block_at_a_time(block_);
    std::barrier<> barrier(count);
    block_barrier = &barrier;
    std::unique_lock<std::mutex> lock(mutex_);
    while (started_ < count) {
      std::thread([this, id = started_] { work(id); }).detach();
      ++started_;
    }
    body_ = &body;
    active_ = count;
    remaining_ = count;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    body_ = nullptr;
  }

 private:
  void work(unsigned id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (id >= active_) continue;  // a block of fewer threads
      const std::function<void(unsigned)>& body = *body_;
      lock.unlock();
      body(id);
      lock.lock();
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::mutex block_, mutex_;  // block_: held while a block runs (one at a time, as its shared memory is static)
  std::condition_variable start_, done_;
  const std::function<void(unsigned)>* body_ = nullptr;
  unsigned started_ = 0, active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
};

}  // namespace emulation

template <typename Params>
void launch_kernel(void (*kernel)(Params), dim3 grid, dim3 block, const Params& params) {
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        emulation::BlockThreads::instance().run(threads, [&](unsigned t) {
          emulation::thread_index = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          emulation::block_index = {bx, by, bz};
          kernel(params);
        });
      }
    }
  }
}

}  // namespace gatedrnn::cuda

#define threadIdx (::gatedrnn::cuda::emulation::thread_index)
#define blockIdx (::gatedrnn::cuda::emulation::block_index)

namespace gatedrnn::cuda::emulation {

// The barrier GATEDRNN_EMULATION_SKIP_BARRIER names, as "FILE:LINE" with FILE a base name ("" if none).
inline const std::string& skipped_barrier() {
  static const std::string site = [] {
    const char* value = std::getenv("GATEDRNN_EMULATION_SKIP_BARRIER");
    return std::string(value ? value : "");
  }();
  return site;
}

inline void sync_threads(const char* file, int line) {
  const std::string& skipped = skipped_barrier();
  if (!skipped.empty()) {
    const char* slash = std::strrchr(file, '/');
    if (skipped == std::string(slash ? slash + 1 : file) + ":" + std::to_string(line)) return;
  }
  block_barrier->arrive_and_wait();
}

}  // namespace gatedrnn::cuda::emulation

#define __syncthreads() ::gatedrnn::cuda::emulation::sync_threads(__FILE__, __LINE__)

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  T x[rows * cols];
};

template <int M, int N, int K>
inline void fill_fragment(fragment<accumulator, M, N, K, float>& f, float value) {
  for (auto& v : f.x) v = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = p[r * ldm + c];
  }
}

template <int M, int N, int K, typename T>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, row_major>& a,
                     const fragment<matrix_b, M, N, K, T, row_major>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float sum = c.x[m * N + n];
      for (int k = 0; k < K; ++k) sum += static_cast<float>(a.x[m * K + k]) * static_cast<float>(b.x[k * N + n]);
      d.x[m * N + n] = sum;
    }
  }
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t) {
  if (threadIdx.x != 0) return;  // every lane holds the same tile
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) p[m * ldm + n] = f.x[m * N + n];
  }
}

}  // namespace nvcuda::wmma
