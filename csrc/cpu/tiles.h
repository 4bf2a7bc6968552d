// The CPU tile product: the CPU twin of csrc/cuda/step_tile.cuh.
//
// A tile owns `G` groups of `L` output columns (L = one SIMD register of the instruction set in use) and up
// to MR rows. Its weight panel is packed once per call as [K][G][L], so that one k of all its columns is one
// contiguous run of G registers; the product keeps MR x G accumulator registers, broadcasts one element of
// each A row per k and issues MR x G fused multiply-adds. The result never leaves the tile before its
// epilogue (a cell update from cells.h, or a plain store) has run on it: nothing like a gate buffer is
// written between the matmul and the update. A call whose weight multiplies only a few rows (a cell's step)
// skips the packing: the same tiles then read W's own rows by dot products (dot_tile), for the same epilogues.
//
// Two column orders:
//  - GateMajor: the columns of a cell's G gates for the same L hidden units (W_hh and W_ih of the forward,
//    whose rows are gate-major in torch.nn's layout): group g, lane l of tile p is column g*Hg + p*L + l.
//  - Contiguous: G*L consecutive columns (plain products: projections and the backward's dh): column
//    (p*G + g)*L + l.
//
// The kernels are written once with GCC vector types, generic over L and MR, and compiled three times,
// for AVX-512, AVX2+FMA and baseline x86-64 (GATEDRNN_TILE_KERNEL), the best the CPU has chosen at load;
// the packing width L follows the instruction set chosen at load (cpu_isa()). The build passes
// -ffp-contract=fast so that `acc += a * w` is one FMA.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "amx.h"
#include "bf16.h"
#include "counters.h"
#include "loops.h"
#include "workspace.h"

namespace gatedrnn::cpu {

// Bytes of one SIMD register, per instruction set: the tile's lane count is this over sizeof(T).
constexpr int vector_bytes(Isa isa) { return isa == Isa::Avx512 ? 64 : isa == Isa::Avx2 ? 32 : 16; }

// Vector registers of the instruction set: 32 zmm with AVX-512, 16 ymm or xmm otherwise.
constexpr int vector_registers(Isa isa) { return isa == Isa::Avx512 ? 32 : 16; }

template <typename T>
inline int64_t tile_lanes() {
  return vector_bytes(cpu_isa()) / int64_t(sizeof(T));
}

// Rows per tile for G column groups: each k keeps MR x G accumulators, MR broadcasts of A and one weight
// register live (plus a temporary for baseline SSE, which has no FMA): AVX-512 takes 6 rows of 4 gates,
// AVX2 3.
constexpr int tile_rows(Isa isa, int groups) {
  return std::max(1, (vector_registers(isa) - (isa == Isa::Baseline ? 2 : 1)) / (groups + 1));
}

inline int64_t tile_rows(int groups) { return tile_rows(cpu_isa(), groups); }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GATEDRNN_HAVE_PACK_TRANSPOSE 1
// dst[c][r] = src[r][c] for an 8 x 8 block of floats (rows `src_stride` and `dst_stride` apart): the
// packing's inner step where a weight's rows are contiguous in k (the forward's W_ih and W_hh).
GATEDRNN_TARGET_AVX2 inline void transpose_8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m256 r[8], t[8], s[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved: (r0 c0, r1 c0, r0 c1, r1 c1 | the same for c4, c5)
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // four rows of one column in each 128-bit half: columns (0|4), (1|5), (2|6), (3|7)
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {  // rows 0-3 and rows 4-7 of a column joined
    _mm256_storeu_ps(dst + c * dst_stride, _mm256_permute2f128_ps(s[c], s[c + 4], 0x20));
    _mm256_storeu_ps(dst + (c + 4) * dst_stride, _mm256_permute2f128_ps(s[c], s[c + 4], 0x31));
  }
}
#endif

// One group of a tile's panel: dst[kk][l] = W[column0 + l][kk] (dst rows `width` apart) for its first `valid`
// lanes, zeros in the rest. A group's lanes stand for consecutive columns of W (tile_column), so a weight
// stored transposed (s0 == 1) copies runs of `valid` elements, and one stored as is (s1 == 1) is transposed
// in 8 x 8 blocks where the instruction set has them; anything else goes element by element.
template <typename T>
inline void pack_group(const T* column0, int64_t s0, int64_t s1, int64_t k, int64_t lanes, int64_t valid,
                       int64_t width, T* dst) {
  for (int64_t kk = 0; kk < k; ++kk) {
    for (int64_t l = valid; l < lanes; ++l) dst[kk * width + l] = T(0);
  }
  if (s0 == 1) {
    for (int64_t kk = 0; kk < k; ++kk) std::memcpy(dst + kk * width, column0 + kk * s1, valid * sizeof(T));
    return;
  }
  int64_t first_scalar_lane = 0;
#ifdef GATEDRNN_HAVE_PACK_TRANSPOSE
  if constexpr (std::is_same_v<T, float>) {
    if (s1 == 1 && cpu_isa() != Isa::Baseline) {
      const int64_t octets = valid / 8, k_blocked = k / 8 * 8;
      for (int64_t o = 0; o < octets; ++o) {
        const T* from = column0 + o * 8 * s0;
        for (int64_t k0 = 0; k0 < k_blocked; k0 += 8) transpose_8x8(from + k0, s0, dst + k0 * width + o * 8, width);
        for (int64_t kk = k_blocked; kk < k; ++kk) {
          for (int64_t l = 0; l < 8; ++l) dst[kk * width + o * 8 + l] = from[l * s0 + kk];
        }
      }
      first_scalar_lane = octets * 8;
    }
  }
#endif
  // Blocks of 16 k, so that the block of dst being written stays in L1.
  constexpr int64_t kBlock = 16;
  for (int64_t k0 = 0; k0 < k; k0 += kBlock) {
    const int64_t depth = std::min(kBlock, k - k0);
    for (int64_t l = first_scalar_lane; l < valid; ++l) {
      const T* from = column0 + l * s0 + k0 * s1;
      for (int64_t kk = 0; kk < depth; ++kk) dst[(k0 + kk) * width + l] = from[kk * s1];
    }
  }
}

// Packs op(W) for tile products. `w_nk` is [N, K], any strides: its row n is output column n (so W_hh of a
// forward, [G*H, R], is passed as is; a weight used as [K, N] is passed transposed). Returns [tiles, K, G, L]
// with zeros in the columns past N (or past H in a gate's block), which the epilogues never store.
// Parallel over tiles: ATen's copy of the equivalent 4-D permutation cost ~40 us at H=128.
template <typename T>
inline void pack_tiles_typed(const at::Tensor& w_nk, int64_t groups, int64_t lanes, Columns order, at::Tensor& out) {
  const int64_t n = w_nk.size(0), k = w_nk.size(1), tiles = out.size(0);
  const int64_t s0 = w_nk.stride(0), s1 = w_nk.stride(1);
  const T* src = w_nk.const_data_ptr<T>();
  T* dst = out.data_ptr<T>();
  const int64_t width = groups * lanes;
  // A thread's share: at least 16K elements (64 KB of float), a few microseconds of transposing. With 64K, a
  // weight of H = 128 (W_hh or W_ih of 128 inputs: eight tiles of 8K) was packed by one thread while the other
  // waited (perf: 23 us of a 197 us LSTM call at T=50 B=1 H=128); with 16K the op's median went from 104 to
  // 92 us (AMD EPYC, Zen 5, two threads, 16 interleaved runs each).
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k * width));
  at::parallel_for(0, tiles, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t valid = tile_valid_lanes(order, p, g, groups, lanes, n);
        const T* column0 = valid ? src + tile_column(order, p, g, 0, groups, lanes, n) * s0 : src;
        pack_group<T>(column0, s0, s1, k, lanes, valid, width, dst + p * k * width + g * lanes);
      }
    }
  });
}

// Into this thread's scratch buffer `slot` (workspace.h): valid until the thread packs into it again.
inline at::Tensor pack_tiles(const at::Tensor& w_nk, int64_t groups, int64_t lanes, Columns order, Scratch slot) {
  const int64_t tiles = tile_count(w_nk.size(0), groups, lanes, order);
  auto out = scratch_tensor(slot, {tiles, w_nk.size(1), groups, lanes}, w_nk.options());
  if (w_nk.scalar_type() == at::kDouble) {
    pack_tiles_typed<double>(w_nk, groups, lanes, order, out);
  } else {
    pack_tiles_typed<float>(w_nk, groups, lanes, order, out);
  }
  return out;
}

// The share [begin, end) of `items` that thread `tid` of `threads` takes. Items are numbered tile-major
// (item = tile * row_blocks + row_block), so a thread keeps the same few weight panels, hot in its cache,
// from step to step.
struct Share {
  int64_t begin, end;
};

inline Share share_of(int64_t items, int tid, int threads) {
  return {items * tid / threads, items * (tid + 1) / threads};
}

template <typename T, int L>
struct VectorOf {
  typedef T type __attribute__((vector_size(L * sizeof(T))));
  // For loads from T arrays: any alignment, may alias T (as the intrinsics' own unaligned types do).
  typedef T unaligned __attribute__((vector_size(L * sizeof(T)), aligned(alignof(T)), may_alias));
};

// acc[r][g] += a[r][k * a_step] * panel[k][g] (a_step is 1 unless kStrided).
template <typename T, int L, int G, int MR, bool kStrided, typename Vec>
GATEDRNN_ALWAYS_INLINE void accumulate_k(Vec (&acc)[MR][G], const T* const* a, int64_t a_step, int64_t k,
                                         const T* panel) {
  using Load = typename VectorOf<T, L>::unaligned;
  // MR broadcasts, then one weight register at a time, each used by MR FMAs: MR x G + MR + 1 registers.
  // (A typed load per register: a memcpy of all G into an array made GCC bounce them through the stack.)
  T x[MR];
  for (int r = 0; r < MR; ++r) x[r] = a[r][kStrided ? k * a_step : k];
  for (int g = 0; g < G; ++g) {
    const Vec w = *reinterpret_cast<const Load*>(panel + (k * G + g) * L);
    for (int r = 0; r < MR; ++r) acc[r][g] += x[r] * w;
  }
}

// out[r][g][l] = sum_k a[r][k * a_step] * panel[k][g][l] for r < MR.
template <typename T, int L, int G, int MR, bool kStrided>
GATEDRNN_ALWAYS_INLINE void tile_product(const T* const* a, int64_t a_step, int64_t k_size, const T* panel, T* out) {
  using Vec = typename VectorOf<T, L>::type;
  Vec acc[MR][G] = {};
  int64_t k = 0;
  if constexpr (MR * G < 8) {
    // Too few accumulators to cover the FMA latency (two pipes x four cycles): odd k go to a second,
    // independent set, added at the end. This is the B=1 case.
    Vec odd[MR][G] = {};
    for (; k + 1 < k_size; k += 2) {
      accumulate_k<T, L, G, MR, kStrided>(acc, a, a_step, k, panel);
      accumulate_k<T, L, G, MR, kStrided>(odd, a, a_step, k + 1, panel);
    }
    for (int r = 0; r < MR; ++r)
      for (int g = 0; g < G; ++g) acc[r][g] += odd[r][g];
  }
  for (; k < k_size; ++k) accumulate_k<T, L, G, MR, kStrided>(acc, a, a_step, k, panel);
  std::memcpy(out, acc, sizeof(acc));
}

// tile_product for a runtime row count 1 <= rows <= MR (the last row block of a step).
template <typename T, int L, int G, int MR, bool kStrided>
GATEDRNN_ALWAYS_INLINE void tile_product_rows(int64_t rows, const T* const* a, int64_t a_step, int64_t k_size,
                                              const T* panel, T* out) {
  if constexpr (MR > 1) {
    if (rows < MR) return tile_product_rows<T, L, G, MR - 1, kStrided>(rows, a, a_step, k_size, panel, out);
  }
  tile_product<T, L, G, MR, kStrided>(a, a_step, k_size, panel, out);
}

// ------------------------------------------------------------------------ products of W read in place
// For a call whose weight multiplies only a few rows (a cell's single step, say), packing W costs more than
// the product: it reads and writes all of W, in shuffles. Read in place, W's rows are contiguous in k, so each
// output column is a dot product: L columns of one group at a time, each in its own accumulator register
// over k (one load of A and L of W per L x L fused multiply-adds), then one tree of shuffles and adds
// (fold_sums) that leaves column l's sum in lane l: the tile's accumulator layout, for the same epilogues.

// Lane q of one half of a fold step that turns blocks of `block` lanes into blocks of half that: x's and y's
// corresponding half-blocks side by side (the first or the second half of each block, by `second`). Lanes of
// y are numbered from `lanes` on, as both shuffle builtins number them.
constexpr int fold_lane(int lanes, int block, bool second, int q) {
  const int half = block / 2, start = (q / block) * block + (second ? half : 0), within = q % block;
  return within < half ? start + within : lanes + start + within - half;
}

template <typename T, int L, int kBlock, bool kSecond, typename Vec, size_t... Q>
GATEDRNN_ALWAYS_INLINE Vec fold_half(Vec x, Vec y, std::index_sequence<Q...>) {
#if defined(__clang__)
  return __builtin_shufflevector(x, y, fold_lane(L, kBlock, kSecond, int(Q))...);
#else
  using Index = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef Index Mask __attribute__((vector_size(L * sizeof(T))));
  return __builtin_shuffle(x, y, Mask{fold_lane(L, kBlock, kSecond, int(Q))...});
#endif
}

// v[0] lane l = the sum of v[l]'s lanes, for all l < L (the other v are clobbered). Each step pairs v[j] with
// v[j + kBlock/2] and halves the block of lanes that stands for one column: vector j then holds columns
// j, j + kBlock/2, ... in blocks of kBlock/2 lanes. L - 1 additions and twice as many shuffles in all.
template <typename T, int L, int kBlock, typename Vec>
GATEDRNN_ALWAYS_INLINE void fold_sums(Vec* v) {
  if constexpr (kBlock > 1) {
    constexpr auto lanes = std::make_index_sequence<L>{};
    for (int j = 0; j < kBlock / 2; ++j) {
      const Vec x = v[j], y = v[j + kBlock / 2];
      v[j] = fold_half<T, L, kBlock, false>(x, y, lanes) + fold_half<T, L, kBlock, true>(x, y, lanes);
    }
    fold_sums<T, L, kBlock / 2>(v);
  }
}

// out[l] = sum_k a[k] * w_l[k] for the rows w_l = w0 + l * w_stride, l < valid (1 <= valid <= L); the lanes
// past `valid` repeat the last valid row (the epilogues never read them). kFull: valid == L.
template <typename T, int L, bool kFull>
GATEDRNN_ALWAYS_INLINE void dot_group(const T* a, const T* w0, int64_t w_stride, int64_t valid, int64_t k_size,
                                     T* out) {
  using Vec = typename VectorOf<T, L>::type;
  using Load = typename VectorOf<T, L>::unaligned;
  const int64_t last = valid - 1;  // (no lambda for the row: its body would be compiled for the baseline ISA)
  Vec acc[L] = {};
  int64_t k = 0;
  for (; k + L <= k_size; k += L) {
    const Vec x = *reinterpret_cast<const Load*>(a + k);
    const T* w = w0 + k;  // row l, stepped by w_stride (one address register rather than L)
    for (int l = 0; l < L; ++l) {
      if constexpr (kFull) {
        acc[l] += x * *reinterpret_cast<const Load*>(w);
        w += w_stride;
      } else {
        acc[l] += x * *reinterpret_cast<const Load*>(w0 + std::min<int64_t>(l, last) * w_stride + k);
      }
    }
  }
  fold_sums<T, L, L>(acc);
  for (; k < k_size; ++k) {  // depths past a multiple of L
    for (int l = 0; l < L; ++l) acc[0][l] += a[k] * w0[std::min<int64_t>(l, last) * w_stride + k];
  }
  std::memcpy(out, &acc[0], sizeof(Vec));
}

// The tile product of tile p for `rows` rows of A (each contiguous in k) from W read in place:
// out[r][g][l] as tile_product leaves it, for the columns tile_column names; lanes past W's (or a gate's)
// last column hold anything.
template <typename T, int L, int G, typename Tiles>
GATEDRNN_ALWAYS_INLINE void dot_tile(const Tiles& s, int64_t p, int64_t rows, const T* const* a, T* out) {
  const int64_t n = s.w_columns;
  for (int g = 0; g < G; ++g) {
    const int64_t c0 = tile_column(s.w_order, p, g, 0, G, L, n);
    const int64_t valid = tile_valid_lanes(s.w_order, p, g, G, L, n);
    for (int64_t r = 0; r < rows; ++r) {
      T* o = out + (r * G + g) * L;
      if (valid == L) {
        dot_group<T, L, true>(a[r], s.w_rows + c0 * s.w_row_stride, s.w_row_stride, L, s.k, o);
      } else if (valid > 0) {
        dot_group<T, L, false>(a[r], s.w_rows + c0 * s.w_row_stride, s.w_row_stride, valid, s.k, o);
      }
    }
  }
}

// dst[0, width) = src[0, width) for width <= N: a full run as one copy of a fixed size, which the compiler
// turns into vector moves; a shorter one element by element. (GCC compiles a copy loop over a runtime width
// alone into a memcpy call or a `rep movs`; no end-to-end difference was measurable, but this form does not
// depend on that choice.)
template <int N, typename T>
GATEDRNN_ALWAYS_INLINE void copy_run(T* dst, const T* src, int64_t width) {
  if (width == N) {
    std::memcpy(dst, src, N * sizeof(T));
    return;
  }
  for (int64_t i = 0; i < width; ++i) dst[i] = src[i];
}

// What every Tiles struct (see run_tiles) has: the type it computes in (T), the type of its A rows and
// weight panels (S: T, or bfloat16 for the bfloat16 tiles), its column groups, and its packed weight.
template <typename T, int G, typename S = T>
struct TileBase {
  using scalar = T;
  using storage = S;
  static constexpr int kGroups = G;
  const S* panels;        // tile 0
  int64_t panel_size, k;  // elements per tile; the product's depth
  // Set by read_in_place: W's own rows ([columns, k], each contiguous in k, w_row_stride apart, column order
  // w_order), multiplied by dot products (dot_tile) instead of the packed panels, which are then unused.
  const S* w_rows = nullptr;
  int64_t w_row_stride = 0, w_columns = 0;
  Columns w_order = Columns::GateMajor;

  const S* panel(int64_t p) const { return panels + p * panel_size; }

  void read_in_place(const at::Tensor& w_nk, Columns order) {
    w_rows = w_nk.const_data_ptr<S>();
    w_row_stride = w_nk.stride(0);
    w_columns = w_nk.size(0);
    w_order = order;
  }
};

// Rows of A per item of a step of `Tiles`: the register tile's MR, or for bfloat16 tiles where AMX runs, the
// rows of one AMX product (amx_item_rows).
template <typename Tiles>
inline int64_t item_rows() {
  if constexpr (std::is_same_v<typename Tiles::storage, c10::BFloat16>) {
    if (amx_available()) return amx_item_rows(Tiles::kGroups);
  }
  return tile_rows(Tiles::kGroups);
}

#ifdef GATEDRNN_HAVE_AMX
// run_tiles_with's items on AMX: blocks of item_rows() rows, the last one short (a short block costs the tile
// unit a full one, so there is nothing to balance), one tile product each.
template <typename Tiles>
GATEDRNN_ALWAYS_INLINE void run_amx_tiles(const Tiles& s, int64_t begin, int64_t end) {
  constexpr int G = Tiles::kGroups;
  constexpr int kRows = amx_item_rows(G);
  const int64_t row_blocks = (s.rows + kRows - 1) / kRows;
  const int64_t k_pad = (s.k + kAmxDepth - 1) / kAmxDepth * kAmxDepth;
  alignas(64) float acc[kRows * G * kBf16Lanes];
  const c10::BFloat16* a[kRows];
  AmxRows first_block, second_block;
  amx_products.calls.fetch_add(1, std::memory_order_relaxed);
  amx_begin();
  for (int64_t item = begin; item < end; ++item) {
    const int64_t p = item / row_blocks, b0 = item % row_blocks * kRows;
    const int64_t rows = std::min<int64_t>(kRows, s.rows - b0);
    for (int64_t r = 0; r < rows; ++r) a[r] = s.a_row(b0 + r);
    int64_t stride0 = 0, stride1 = 0;
    const int64_t rows0 = std::min<int64_t>(rows, kAmxRows);
    const c10::BFloat16* a0 = first_block.place(a, rows0, s.k, k_pad, stride0);
    if constexpr (G == 4) {
      if (rows > kAmxRows) {
        const c10::BFloat16* a1 = second_block.place(a + kAmxRows, rows - kAmxRows, s.k, k_pad, stride1);
        amx_product_32_rows(a0, stride0, a1, stride1, k_pad, s.panel(p), acc);
        s.template finish<kBf16Lanes>(acc, b0, rows, p);
        continue;
      }
    }
    amx_product<G>(a0, stride0, k_pad, s.panel(p), acc);
    s.template finish<kBf16Lanes>(acc, b0, rows, p);
  }
  amx_end();
}
#endif

// Runs tiles [begin, end) of one step for `Tiles`, a struct that describes the step: a TileBase, rows,
// a_row(b) (row b of A: k elements, or k elements a_step apart when Tiles has an a_step), and the epilogue
// finish<L>(acc, b0, rows, p) that consumes acc[rows][G][L] for rows b0.. of tile p.
//
// An epilogue must stay vectorisable, and two ways of writing it were seen to break that: a lambda inside
// it (a lambda's body is compiled for the baseline instruction set, not the kernel's), and a loop with a
// compile-time trip count of L (GCC unrolls it fully, into scalar code). Loop over a runtime width.
template <typename Tiles, Isa kIsa, bool kStrided>
GATEDRNN_ALWAYS_INLINE void run_tiles_with(const Tiles& s, int64_t a_step, int64_t begin, int64_t end) {
  using T = typename Tiles::scalar;
  using S = typename Tiles::storage;
  constexpr bool kBf16 = std::is_same_v<S, c10::BFloat16>;
  constexpr int G = Tiles::kGroups;
  constexpr int L = kBf16 ? kBf16Lanes : vector_bytes(kIsa) / int(sizeof(T));
  constexpr int MR = tile_rows(kIsa, G);
#ifdef GATEDRNN_HAVE_AMX
  if constexpr (kBf16 && !kStrided) {
    if (amx_available()) return run_amx_tiles(s, begin, end);
  }
#endif
  // Row blocks of balanced sizes (64 rows: nine of 6 and two of 5, rather than ten of 6 and one of 4):
  // a short block runs the product at a fraction of its speed.
  const int64_t row_blocks = (s.rows + MR - 1) / MR;
  const int64_t base = row_blocks ? s.rows / row_blocks : 0, extra = row_blocks ? s.rows % row_blocks : 0;
  alignas(64) T acc[MR * G * L];
  const S* a[MR];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t p = item / row_blocks, block = item % row_blocks;
    const int64_t b0 = block * base + std::min(block, extra), rows = base + (block < extra ? 1 : 0);
    for (int64_t r = 0; r < rows; ++r) a[r] = s.a_row(b0 + r);
    if constexpr (!kBf16 && !kStrided) {
      if (s.w_rows) {
        dot_tile<T, L, G>(s, p, rows, a, acc);
        s.template finish<L>(acc, b0, rows, p);
        continue;
      }
    }
#ifdef GATEDRNN_HAVE_BF16_TILES
    if constexpr (kBf16) {
      bf16_product<G, MR>(rows, a, s.k, s.panel(p), acc);
    } else
#endif
    {
      tile_product_rows<T, L, G, MR, kStrided>(rows, a, a_step, s.k, s.panel(p), acc);
    }
    s.template finish<L>(acc, b0, rows, p);
  }
}

// Whether Tiles reads A with a stride (has an a_step member). A C++17 trait, not a requires-expression:
// torch 2.11 and older build extensions as C++17.
template <typename Tiles, typename = void>
struct HasStridedA : std::false_type {};
template <typename Tiles>
struct HasStridedA<Tiles, std::void_t<decltype(std::declval<const Tiles&>().a_step)>> : std::true_type {};

template <typename Tiles, Isa kIsa>
GATEDRNN_ALWAYS_INLINE void run_tiles(const Tiles& s, int64_t begin, int64_t end) {
  if constexpr (HasStridedA<Tiles>::value) {
    if (s.a_step != 1) return run_tiles_with<Tiles, kIsa, true>(s, s.a_step, begin, end);
  }
  run_tiles_with<Tiles, kIsa, false>(s, 1, begin, end);
}

// How many items a step of `Tiles` has: tiles x row blocks.
template <typename Tiles>
inline int64_t tile_items(const Tiles& s, int64_t tiles) {
  const int64_t mr = item_rows<Tiles>();
  return tiles * ((s.rows + mr - 1) / mr);
}

// Defines `void NAME(const TILES& s, int64_t begin, int64_t end)`: run_tiles compiled for the instruction
// set chosen by cpu_isa(), each call counted in COUNTER.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GATEDRNN_TILE_KERNEL(NAME, TILES, COUNTER)                                                                    \
  GATEDRNN_TARGET_AVX512 void NAME##_avx512(const TILES& s, int64_t b, int64_t e) {                                   \
    run_tiles<TILES, Isa::Avx512>(s, b, e);                                                                           \
  }                                                                                                                   \
  GATEDRNN_TARGET_AVX2 void NAME##_avx2(const TILES& s, int64_t b, int64_t e) {                                       \
    run_tiles<TILES, Isa::Avx2>(s, b, e);                                                                             \
  }                                                                                                                   \
  void NAME##_baseline(const TILES& s, int64_t b, int64_t e) { run_tiles<TILES, Isa::Baseline>(s, b, e); }             \
  void NAME(const TILES& s, int64_t b, int64_t e) {                                                                   \
    using Fn = void (*)(const TILES&, int64_t, int64_t);                                                              \
    static const Fn chosen = build_for_cpu_isa<Fn>(NAME##_avx512, NAME##_avx2, NAME##_baseline);                     \
    COUNTER.calls.fetch_add(1, std::memory_order_relaxed);                                                            \
    chosen(s, b, e);                                                                                                  \
  }
#else
#define GATEDRNN_TILE_KERNEL(NAME, TILES, COUNTER)                   \
  void NAME(const TILES& s, int64_t b, int64_t e) {                  \
    COUNTER.calls.fetch_add(1, std::memory_order_relaxed);           \
    run_tiles<TILES, Isa::Baseline>(s, b, e);                        \
  }
#endif

// A bfloat16 tile kernel (TILES with storage c10::BFloat16): only the AVX-512 version, which calls the
// AVX512_BF16 products; the op runs it only where bf16_tiles_available().
#ifdef GATEDRNN_HAVE_BF16_TILES
#define GATEDRNN_BF16_TILE_KERNEL(NAME, TILES, LABEL)                                 \
  KernelCounter NAME##_bf16_calls{LABEL};                                             \
  GATEDRNN_TARGET_AVX512 void NAME(const TILES& s, int64_t b, int64_t e) {            \
    NAME##_bf16_calls.calls.fetch_add(1, std::memory_order_relaxed);                  \
    run_tiles<TILES, Isa::Avx512>(s, b, e);                                           \
  }
#endif

// The float and double versions (TILES is a template of the scalar type), counted together under LABEL.
#define GATEDRNN_TILE_KERNELS(NAME, TILES, LABEL)          \
  KernelCounter NAME##_calls{LABEL};                       \
  GATEDRNN_TILE_KERNEL(NAME, TILES<float>, NAME##_calls)   \
  GATEDRNN_TILE_KERNEL(NAME, TILES<double>, NAME##_calls)

}  // namespace gatedrnn::cpu
