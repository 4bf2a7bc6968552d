// bfloat16 tiles for CPUs with AVX512_BF16: the products in bfloat16 with float32 accumulation
// (vdpbf16ps: each instruction multiplies 16 lanes x 2 consecutive k and adds to float32), everything else
// (gate math, cell state, input projection buffer, biases) in float32, h_t rounded to bfloat16 once.
//
// The panel of a tile is packed in k pairs, [K/2][G][16][2], so that one 64-byte load holds a pair of k
// for 16 columns; A is read as pairs of consecutive bfloat16 of a row, broadcast as one 32-bit value. An odd
// depth's last k is paired with a zero.
//
// Used for inference (no saved activations) without proj_size; training and projections compute bfloat16
// in float32 as before. GATEDRNN_CPU_ISA=avx2|baseline turns it off with AVX-512.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "loops.h"
#include "workspace.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define GATEDRNN_HAVE_BF16_TILES 1
#define GATEDRNN_TARGET_AVX512BF16 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma")))
#endif

namespace gatedrnn::cpu {

constexpr int kBf16Lanes = 16;

// The CPU can run the bfloat16 tiles, and the instruction set is not capped below AVX-512.
inline bool bf16_tiles_available() {
#ifdef GATEDRNN_HAVE_BF16_TILES
  static const bool available = [] {
    __builtin_cpu_init();
    return cpu_isa() == Isa::Avx512 && __builtin_cpu_supports("avx512bf16");
  }();
  return available;
#else
  return false;
#endif
}

// float -> bfloat16, rounding to nearest even (NaN stays NaN): integer operations that vectorise.
GATEDRNN_ALWAYS_INLINE c10::BFloat16 round_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return c10::BFloat16(uint16_t(is_nan ? nan : rounded), c10::BFloat16::from_bits());
}

GATEDRNN_ALWAYS_INLINE float widen(c10::BFloat16 x) {
  const uint32_t u = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Packs a bfloat16 [N, K] weight (row n: output column n; any strides) for the bfloat16 tiles:
// [tiles, ceil(K/2), G, 16, 2], zeros past N (or past H in a gate's block) and past K.
inline at::Tensor pack_tiles_bf16(const at::Tensor& w_nk, int64_t groups, Columns order, Scratch slot) {
  const int64_t n = w_nk.size(0), k = w_nk.size(1), pairs = (k + 1) / 2, L = kBf16Lanes;
  const int64_t tiles = tile_count(n, groups, L, order), width = groups * L;
  auto out = scratch_tensor(slot, {tiles, pairs, groups, L, 2}, w_nk.options().dtype(at::kBFloat16)).zero_();
  const auto w = w_nk.to(at::kBFloat16);
  const int64_t s0 = w.stride(0), s1 = w.stride(1);
  const c10::BFloat16* src = w.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, tiles, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t c = 0; c < width; ++c) {
        const int64_t column = tile_column(order, p, c / L, c % L, groups, L, n);
        if (column >= n) continue;
        const c10::BFloat16* from = src + column * s0;
        c10::BFloat16* to = dst + p * pairs * width * 2 + c * 2;
        for (int64_t kk = 0; kk < k; ++kk) to[(kk / 2) * width * 2 + (kk % 2)] = from[kk * s1];
      }
    }
  });
  return out;
}

#ifdef GATEDRNN_HAVE_BF16_TILES
template <int G, int MR>
GATEDRNN_TARGET_AVX512BF16 inline void bf16_tile_product(const c10::BFloat16* const* a, int64_t k_size,
                                                         const c10::BFloat16* panel, float* out) {
  __m512 acc[MR][G];
  for (int r = 0; r < MR; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
  const auto step = [&](int64_t q, bool last_of_odd) GATEDRNN_TARGET_AVX512BF16 __attribute__((always_inline)) {
    __m512bh x[MR];
    for (int r = 0; r < MR; ++r) {
      // (a[r][2q], a[r][2q + 1]); past an odd depth's end the second is zero.
      uint32_t both = 0;
      std::memcpy(&both, a[r] + 2 * q, last_of_odd ? 2 : 4);
      x[r] = (__m512bh)_mm512_set1_epi32(int(both));
    }
    for (int g = 0; g < G; ++g) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(panel + (q * G + g) * 2 * kBf16Lanes);
      for (int r = 0; r < MR; ++r) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], x[r], w);
    }
  };
  const int64_t full = k_size / 2;
  for (int64_t q = 0; q < full; ++q) step(q, false);
  if (k_size % 2) step(full, true);
  for (int r = 0; r < MR; ++r)
    for (int g = 0; g < G; ++g) _mm512_storeu_ps(out + (r * G + g) * kBf16Lanes, acc[r][g]);
}

template <int G, int MR>
GATEDRNN_TARGET_AVX512BF16 inline void bf16_tile_product_rows(int64_t rows, const c10::BFloat16* const* a,
                                                              int64_t k_size, const c10::BFloat16* panel,
                                                              float* out) {
  if constexpr (MR > 1) {
    if (rows < MR) return bf16_tile_product_rows<G, MR - 1>(rows, a, k_size, panel, out);
  }
  bf16_tile_product<G, MR>(a, k_size, panel, out);
}

// Out of line, so that the AVX-512 kernels (compiled without AVX512_BF16) can call it: only ever called
// where bf16_tiles_available().
template <int G, int MR>
GATEDRNN_TARGET_AVX512BF16 __attribute__((noinline)) void bf16_product(int64_t rows, const c10::BFloat16* const* a,
                                                                       int64_t k_size, const c10::BFloat16* panel,
                                                                       float* out) {
  bf16_tile_product_rows<G, MR>(rows, a, k_size, panel, out);
}
#endif

}  // namespace gatedrnn::cpu
