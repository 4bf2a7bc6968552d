// A team of threads that stays together for a whole time loop: one parallel region per op call, one
// barrier per dependent phase of a step. (A parallel region per step costs a thread wake-up per step, which
// at B=1 is longer than the step.)
//
// The team is torch's own OpenMP pool: the extension is compiled with -fopenmp and, torch being imported
// first, binds to the libgomp that torch loaded (same soname), so it shares torch's threads and honours
// torch.set_num_threads. Inside another parallel region (or with one thread) the team is the calling
// thread alone, and every barrier is a no-op.
//
// The barrier is the team's own (TeamBarrier) where the team has a CPU per thread: libgomp's
// `#pragma omp barrier` took about 230 ns between two threads on our AMD EPYC (Zen 5), this one about 55, and
// at B=1 a step is a microsecond or two with a barrier in it. A team with more threads than the CPUs it may
// run on keeps libgomp's, which stops spinning early in that case: a spinning barrier there waits for threads
// that are not running (measured, 8 threads on 2 CPUs: 4 times slower than libgomp's at T=50 B=64 H=128).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <thread>

#ifdef __linux__
#include <sched.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gatedrnn::cpu {

// A barrier for one team: a count of arrivals and a generation, each on a cache line of its own. The last
// thread to arrive resets the count and advances the generation; the others wait for the generation to
// change, spinning with `pause` for up to about 0.2 ms (longer than a step's imbalance wherever barriers
// matter), then sleeping in the kernel (std::atomic::wait, a futex), so that a CPU taken by another process
// does not leave the team spinning.
class TeamBarrier {
 public:
  void wait(int threads) {
    // Read before arriving: once this thread has arrived, the generation may advance at any moment.
    const unsigned generation = generation_.load(std::memory_order_relaxed);
    // acq_rel: the last arrival acquires every earlier arrival's writes, and its release of the new
    // generation passes them on to every waiter.
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads - 1) {
      arrived_.store(0, std::memory_order_relaxed);  // nobody arrives again before the generation advances
      generation_.store(generation + 1, std::memory_order_release);
      generation_.notify_all();  // no system call unless someone sleeps
      return;
    }
    for (int spins = 0; spins < kSpins; ++spins) {
      if (generation_.load(std::memory_order_acquire) != generation) return;
      pause();
    }
    while (generation_.load(std::memory_order_acquire) == generation) {
      generation_.wait(generation, std::memory_order_acquire);
    }
  }

 private:
  static constexpr int kSpins = 1 << 13;  // a `pause` takes about 25 ns on Zen 5

  static void pause() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_ia32_pause();
#endif
  }

  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<unsigned> generation_{0};
};

// The CPUs this process may run on (its affinity mask), counted once.
inline int usable_cpus() {
  static const int count = [] {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
#endif
    return std::max(1, int(std::thread::hardware_concurrency()));
  }();
  return count;
}

struct Team {
  int tid = 0;
  int threads = 1;
  TeamBarrier* own_barrier = nullptr;  // null: libgomp's barrier (a team of one has none)

  void barrier() const {
    if (threads <= 1) return;
    if (own_barrier) {
      own_barrier->wait(threads);
      return;
    }
#ifdef _OPENMP
#pragma omp barrier
#endif
  }
};

// How many threads a team started now would have.
inline int team_size() {
#ifdef _OPENMP
  at::internal::lazy_init_num_threads();
  return at::in_parallel_region() ? 1 : at::get_num_threads();
#else
  return 1;
#endif
}

// Which barrier a team started now would use: "gatedrnn" (TeamBarrier), "openmp" (libgomp's, for a team with
// more threads than usable CPUs) or "none" (a team of one), for backend_info().
inline const char* team_barrier_name() {
  const int threads = team_size();
  return threads <= 1 ? "none" : threads <= usable_cpus() ? "gatedrnn" : "openmp";
}

// Runs body(team) on every thread of a new team. `body` must not throw (no allocation, no checks inside):
// an exception cannot leave an OpenMP region.
template <typename F>
inline void run_team(const F& body) {
  const int threads = team_size();
  if (threads <= 1) {
    body(Team{0, 1});
    return;
  }
#ifdef _OPENMP
  TeamBarrier own_barrier;
#pragma omp parallel  // as many threads as at::get_num_threads() (lazy_init_num_threads set the ICV)
  {
    // The region may get fewer threads than asked for; every member learns the real count.
    const int members = omp_get_num_threads();
    body(Team{omp_get_thread_num(), members, members <= usable_cpus() ? &own_barrier : nullptr});
  }
#endif
}

}  // namespace gatedrnn::cpu
