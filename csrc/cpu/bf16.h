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

#ifdef GATEDRNN_HAVE_BF16_TILES
// One group of a panel from a weight whose rows are contiguous in k: lane l < valid is W's row column0 + l * s0,
// and each of its first `pairs` k pairs is one 32-bit element of that row, so that one masked gather fills a
// pair of all 16 lanes (lanes past `valid` get zeros). dst: the group's first pair, pairs `pair_stride` apart.
GATEDRNN_TARGET_AVX512 inline void gather_pairs(const c10::BFloat16* column0, int64_t s0, int64_t valid, int64_t pairs,
                                                int64_t pair_stride, c10::BFloat16* dst) {
  const __m512i rows = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(int(s0)));
  const __mmask16 lanes = valid >= kBf16Lanes ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
  for (int64_t q = 0; q < pairs; ++q) {
    const __m512i pair = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, rows, column0 + 2 * q, 2);
    _mm512_storeu_si512(dst + q * pair_stride, pair);
  }
}
#endif

// Packs a bfloat16 [N, K] weight (row n: output column n; any strides) for the bfloat16 tiles:
// [tiles, pairs, G, 16, 2] with pairs >= ceil(K/2) (amx.h pads it), zeros past N (or past H in a gate's block)
// and past K. Rows contiguous in k are gathered a k pair of 16 columns at a time; other layouts element by
// element.
inline at::Tensor pack_tiles_bf16(const at::Tensor& w_nk, int64_t groups, Columns order, Scratch slot,
                                  int64_t pairs) {
  const int64_t n = w_nk.size(0), k = w_nk.size(1), L = kBf16Lanes;
  const int64_t tiles = tile_count(n, groups, L, order), width = groups * L;
  auto out = scratch_tensor(slot, {tiles, pairs, groups, L, 2}, w_nk.options().dtype(at::kBFloat16)).zero_();
  const auto w = w_nk.to(at::kBFloat16);
  const int64_t s0 = w.stride(0), s1 = w.stride(1);
  const c10::BFloat16* src = w.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
#ifdef GATEDRNN_HAVE_BF16_TILES
  const bool gather = s1 == 1 && s0 < (int64_t(1) << 26) && bf16_tiles_available();
#else
  const bool gather = false;
#endif
  at::parallel_for(0, tiles, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      c10::BFloat16* tile = dst + p * pairs * width * 2;
      int64_t first_k = 0;
#ifdef GATEDRNN_HAVE_BF16_TILES
      if (gather) {
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t column0 = tile_column(order, p, g, 0, groups, L, n);
          const int64_t valid = tile_valid_lanes(order, p, g, groups, L, n);
          if (valid > 0) gather_pairs(src + column0 * s0, s0, valid, k / 2, width * 2, tile + g * L * 2);
        }
        first_k = k / 2 * 2;  // an odd depth's last k below
      }
#endif
      for (int64_t c = 0; c < width; ++c) {
        const int64_t column = tile_column(order, p, c / L, c % L, groups, L, n);
        if (column >= n) continue;
        const c10::BFloat16* from = src + column * s0;
        c10::BFloat16* to = tile + c * 2;
        for (int64_t kk = first_k; kk < k; ++kk) to[(kk / 2) * width * 2 + (kk % 2)] = from[kk * s1];
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
