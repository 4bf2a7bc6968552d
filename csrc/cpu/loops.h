// CPU helpers shared by the LSTM and GRU loops.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

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

// The tiles' epilogues (tiles.h) are written as loops over a contiguous span of hidden units of one batch
// row, so that the compiler vectorises them (GATEDRNN_IVDEP: the row pointers never overlap; the build passes
// -fno-trapping-math, without which GCC will not if-convert the selects in cells.h).
#define GATEDRNN_ALWAYS_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__)
#define GATEDRNN_IVDEP _Pragma("GCC ivdep")
#else
#define GATEDRNN_IVDEP
#endif

// Each tile kernel is compiled three times on x86-64 (AVX-512, AVX2+FMA, baseline) and the best one the
// CPU supports is chosen once, by feature (GCC's target_clones("arch=...") checks the CPU model
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

// Of a function's builds for each instruction set, the one for cpu_isa() (kept by the caller: chosen once).
template <typename Fn>
Fn build_for_cpu_isa(Fn avx512, Fn avx2, Fn baseline) {
  switch (cpu_isa()) {
    case Isa::Avx512:
      return avx512;
    case Isa::Avx2:
      return avx2;
    default:
      return baseline;
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GATEDRNN_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define GATEDRNN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

// Column orders of the tiles' weight panels (tiles.h): a cell's G gates for the same L hidden units
// (GateMajor), or G*L consecutive columns (Contiguous).
enum class Columns { GateMajor, Contiguous };

// Tiles of L lanes and G groups that cover `columns` output columns.
inline int64_t tile_count(int64_t columns, int64_t groups, int64_t lanes, Columns order) {
  const int64_t width = order == Columns::GateMajor ? lanes : groups * lanes;
  const int64_t per = order == Columns::GateMajor ? columns / groups : columns;
  return (per + width - 1) / width;
}

// The output column that group g, lane l of tile p stands for in a weight of n columns (n / groups per gate
// when GateMajor), or n where the tile is padded past the weight's (or the gate's) last column.
inline int64_t tile_column(Columns order, int64_t p, int64_t g, int64_t l, int64_t groups, int64_t lanes, int64_t n) {
  if (order == Columns::Contiguous) return std::min((p * groups + g) * lanes + l, n);
  const int64_t per_gate = n / groups, unit = p * lanes + l;
  return unit < per_gate ? g * per_gate + unit : n;
}

// How many of group g's lanes in tile p stand for a column of the weight (tile_column < n): always a prefix of
// the group, since tile_column grows with l until it reaches the padding.
inline int64_t tile_valid_lanes(Columns order, int64_t p, int64_t g, int64_t groups, int64_t lanes, int64_t n) {
  const int64_t first = order == Columns::Contiguous ? (p * groups + g) * lanes : p * lanes;
  const int64_t end = order == Columns::Contiguous ? n : n / groups;
  return std::clamp<int64_t>(end - first, 0, lanes);
}

// Writes four per-gate values of hidden unit j into a row laid out gate by gate ([4, H] or [4, stride]).
template <typename T>
GATEDRNN_ALWAYS_INLINE void store_gates(T* row, int64_t stride, int64_t j, T v0, T v1, T v2, T v3) {
  row[j] = v0;
  row[stride + j] = v1;
  row[2 * stride + j] = v2;
  row[3 * stride + j] = v3;
}

}  // namespace gatedrnn::cpu
