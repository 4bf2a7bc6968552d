// CPU helpers shared by the LSTM and GRU loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace gatedrnn::cpu {

// Storage dtypes without a fast CPU GEMM of their own (bfloat16, float16) are computed in float32:
// states, gate math and accumulation all in float32, rounded once on output.
inline at::ScalarType compute_dtype(at::ScalarType storage) {
  return (storage == at::kBFloat16 || storage == at::kHalf) ? at::kFloat : storage;
}

inline at::Tensor to_compute(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

inline std::optional<at::Tensor> to_compute(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value()) return std::nullopt;
  return to_compute(*t, dtype);
}

// The fused per-step passes are written as loops over a contiguous span of hidden units of one batch row,
// so that the compiler vectorises them (GATEDRNN_IVDEP: the row pointers never overlap; the build passes
// -fno-trapping-math, without which GCC will not if-convert the selects in cells.h).
#define GATEDRNN_ALWAYS_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__)
#define GATEDRNN_IVDEP _Pragma("GCC ivdep")
#else
#define GATEDRNN_IVDEP
#endif

// Each float span kernel is compiled three times on x86-64 (AVX-512, AVX2+FMA, baseline) and the best one
// the CPU supports is chosen once, by feature (GCC's target_clones("arch=...") checks the CPU model
// instead and falls back to baseline on virtual machines whose model it does not know).
enum class Isa { Baseline, Avx2, Avx512 };

// GATEDRNN_CPU_ISA=baseline or avx2 caps the choice (so that tests can run every variant on one machine).
inline Isa cpu_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const Isa isa = [] {
    const char* cap = std::getenv("GATEDRNN_CPU_ISA");
    if (cap && std::strcmp(cap, "baseline") == 0) return Isa::Baseline;
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (cap && std::strcmp(cap, "avx2") == 0) return avx2 ? Isa::Avx2 : Isa::Baseline;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq"))
      return Isa::Avx512;
    return avx2 ? Isa::Avx2 : Isa::Baseline;
  }();
  return isa;
#else
  return Isa::Baseline;
#endif
}

inline const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

// Defines `void NAME(const STEP& s, int64_t b, int64_t j0, int64_t j1)` running BODY(s, b, j0, j1), an
// always-inline template, compiled for the instruction set chosen by cpu_isa().
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GATEDRNN_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define GATEDRNN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define GATEDRNN_SPAN_KERNEL(NAME, STEP, BODY)                                                                        \
  GATEDRNN_TARGET_AVX512 void NAME##_avx512(const STEP& s, int64_t b, int64_t j0, int64_t j1) { BODY(s, b, j0, j1); } \
  GATEDRNN_TARGET_AVX2 void NAME##_avx2(const STEP& s, int64_t b, int64_t j0, int64_t j1) { BODY(s, b, j0, j1); }     \
  void NAME##_baseline(const STEP& s, int64_t b, int64_t j0, int64_t j1) { BODY(s, b, j0, j1); }                      \
  void NAME(const STEP& s, int64_t b, int64_t j0, int64_t j1) {                                                       \
    using Fn = void (*)(const STEP&, int64_t, int64_t, int64_t);                                                      \
    static const Fn chosen = cpu_isa() == Isa::Avx512 ? static_cast<Fn>(NAME##_avx512)                                \
                             : cpu_isa() == Isa::Avx2 ? static_cast<Fn>(NAME##_avx2)                                  \
                                                      : static_cast<Fn>(NAME##_baseline);                             \
    chosen(s, b, j0, j1);                                                                                             \
  }
#else
#define GATEDRNN_SPAN_KERNEL(NAME, STEP, BODY) \
  void NAME(const STEP& s, int64_t b, int64_t j0, int64_t j1) { BODY(s, b, j0, j1); }
#endif

// The float and double versions of a span kernel; STEP is the step-arguments template.
#define GATEDRNN_SPAN_KERNELS(NAME, STEP, BODY) \
  GATEDRNN_SPAN_KERNEL(NAME, STEP<float>, BODY) \
  GATEDRNN_SPAN_KERNEL(NAME, STEP<double>, BODY)

// Writes four per-gate values of hidden unit j into a row laid out gate by gate ([4, H] or [4, stride]).
template <typename T>
GATEDRNN_ALWAYS_INLINE void store_gates(T* row, int64_t stride, int64_t j, T v0, T v1, T v2, T v3) {
  row[j] = v0;
  row[stride + j] = v1;
  row[2 * stride + j] = v2;
  row[3 * stride + j] = v3;
}

// Calls f(b, j0, j1) for contiguous spans [j0, j1) of hidden units of batch row b, covering every row
// b < rows, in parallel. The grain keeps tiny steps (B=1, small H) on the calling thread, where a thread
// hand-off would cost more than the math.
template <typename F>
inline void for_each_span(int64_t rows, int64_t hidden, const F& f) {
  constexpr int64_t kGrain = 8192;
  at::parallel_for(0, rows * hidden, kGrain, [&](int64_t begin, int64_t end) {
    int64_t b = begin / hidden;
    int64_t j = begin % hidden;
    while (begin < end) {
      const int64_t stop = std::min(hidden, j + (end - begin));
      f(b, j, stop);
      begin += stop - j;
      j = 0;
      ++b;
    }
  });
}

}  // namespace gatedrnn::cpu
