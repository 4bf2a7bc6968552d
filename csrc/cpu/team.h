// A team of threads that stays together for a whole time loop: one parallel region per op call, one
// barrier per dependent phase of a step. (A parallel region per step costs a thread wake-up per step, which
// at B=1 is longer than the step.)
//
// The team is torch's own OpenMP pool: the extension is compiled with -fopenmp and, torch being imported
// first, binds to the libgomp that torch loaded (same soname), so it shares torch's threads and honours
// torch.set_num_threads. Inside another parallel region (or with one thread) the team is the calling
// thread alone, and every barrier is a no-op.
#pragma once

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gatedrnn::cpu {

struct Team {
  int tid = 0;
  int threads = 1;

  void barrier() const {
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp barrier
    }
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
#pragma omp parallel  // as many threads as at::get_num_threads() (lazy_init_num_threads set the ICV)
  {
    // The region may get fewer threads than asked for; every member learns the real count.
    body(Team{omp_get_thread_num(), omp_get_num_threads()});
  }
#endif
}

}  // namespace gatedrnn::cpu
