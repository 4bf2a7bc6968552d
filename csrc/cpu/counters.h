// Call counts of the CPU tile kernels, for gatedrnn._extension.kernel_calls(): the tests' proof that the
// fused step kernels (not a GEMM followed by a pointwise pass) ran. One relaxed atomic add per kernel call
// and thread, which is once per step: nothing beside a step's work.
#pragma once

#include <atomic>
#include <cstdint>

namespace gatedrnn::cpu {

struct KernelCounter {
  const char* name;
  std::atomic<int64_t> calls{0};
  KernelCounter* next;

  explicit KernelCounter(const char* label) : name(label), next(head()) { head() = this; }

  // Every counter of the library, linked at load (static initialisation) through this one list.
  static KernelCounter*& head() {
    static KernelCounter* first = nullptr;
    return first;
  }
};

}  // namespace gatedrnn::cpu
