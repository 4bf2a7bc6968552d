// AMX (Advanced Matrix Extensions, Intel Xeon since Sapphire Rapids) for the bfloat16 tiles: the same tiles,
// panels and epilogues as bf16.h, with the product of a tile's 16 rows run by the tile unit. One
// tdpbf16ps multiplies 16 rows x 32 k of A by 32 k x 16 columns of a panel into 16 x 16 float32 sums, the
// work of 32 vdpbf16ps; measured on a 2-core Xeon VM with AMX: about 360 GFLOP/s on one core for a 16 x 2048 x 512
// product alone, where the vdpbf16ps tiles ran the whole bfloat16 LSTM layer at about 30 per core (vdpbf16ps
// issues once per cycle there, so bfloat16 ran slower than float32).
//
// amx_product's tile registers (each 16 rows of 64 bytes): 0-3 the sums of a tile's G <= 4 column groups (16 rows x 16
// float32), 4 the A block (16 rows x 32 bfloat16), 5-7 the panel blocks, rotated so that a load need not wait
// for the product still reading the previous one. A panel block is 16 k pairs of one group: bf16.h's packing
// [pairs][G][16][2] read with a row stride of G * 64 bytes, so the AMX and vdpbf16ps kernels share panels
// (padded with zero pairs to a multiple of 16 where AMX runs).
//
// Linux hands a process the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, kernel 5.16+); where
// that fails, or GATEDRNN_CPU_AMX=0, or the instruction set is capped below AVX-512, the vdpbf16ps tiles run.
// backend_info()["cpu_bf16_amx"] says which.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "bf16.h"
#include "counters.h"

#if defined(GATEDRNN_HAVE_BF16_TILES) && __GNUC__ >= 11
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define GATEDRNN_HAVE_AMX 1
#define GATEDRNN_TARGET_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#endif

namespace gatedrnn::cpu {

constexpr int kAmxRows = 16;      // rows of A (and of the sums) per tile product
constexpr int kAmxDepth = 32;     // k per A block: 64 bytes of bfloat16
constexpr int kAmxPairs = 16;     // k pairs per panel block

// Rows of A per AMX work item of a step with `groups` gate groups: the LSTM's four groups run 32 rows
// (amx_product_32_rows: two row blocks x two groups per pass fill the eight tile registers); else 16.
constexpr int amx_item_rows(int groups) { return groups == 4 ? 2 * kAmxRows : kAmxRows; }

// AMX runs the bfloat16 tiles' products in this process.
inline bool amx_available() {
#ifdef GATEDRNN_HAVE_AMX
  static const bool available = [] {
    if (!bf16_tiles_available()) return false;
    const char* setting = std::getenv("GATEDRNN_CPU_AMX");
    if (setting && std::strcmp(setting, "0") == 0) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
    if (!amx_bf16 || !amx_tile) return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return available;
#else
  return false;
#endif
}

// Panels are padded to whole panel blocks where AMX reads them.
inline int64_t bf16_panel_pairs(int64_t k) {
  const int64_t pairs = (k + 1) / 2;
  return amx_available() ? (pairs + kAmxPairs - 1) / kAmxPairs * kAmxPairs : pairs;
}

// Calls of the tile kernels that ran their products on AMX: the tests' proof that it ran.
inline KernelCounter amx_products{"bf16_amx_products"};

#ifdef GATEDRNN_HAVE_AMX
struct alignas(64) AmxConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// Loads the tile configuration (every tile 16 rows x 64 bytes) on this thread. Other code on the thread
// (oneDNN's AMX kernels) configures tiles too, so each kernel call loads its own and releases it at the end.
// The configuration is a static object: GCC's _tile_loadconfig names only its first 8 bytes as read, so the
// stores that fill a local one are dropped as dead (seen: tiles unconfigured, SIGILL at the first tilezero).
inline const AmxConfig& amx_config() {
  static const AmxConfig config = [] {
    AmxConfig c{};
    c.palette = 1;
    for (int t = 0; t < 8; ++t) {
      c.rows[t] = kAmxRows;
      c.bytes_per_row[t] = 64;
    }
    return c;
  }();
  return config;
}

GATEDRNN_TARGET_AMX __attribute__((noinline)) inline void amx_begin() { _tile_loadconfig(&amx_config()); }

GATEDRNN_TARGET_AMX __attribute__((noinline)) inline void amx_end() { _tile_release(); }

// out[r][g][l] (r < 16, l < 16) = sum over k of a[r][k] * panel column (g, l), for k_pad = a multiple of
// kAmxDepth: A's rows `a_stride` elements apart, each readable and zero past the product's depth up to k_pad.
template <int G>
GATEDRNN_TARGET_AMX __attribute__((noinline)) void amx_product(const c10::BFloat16* a, int64_t a_stride, int64_t k_pad,
                                                              const c10::BFloat16* panel, float* out) {
  static_assert(G == 3 || G == 4, "the sums of at most four groups fit tiles 0-3");
  constexpr int64_t kBlockStride = G * 2 * kBf16Lanes * 2;  // bytes from one k pair of a group to the next
  constexpr int64_t kGroup = 2 * kBf16Lanes;                // elements from one group to the next
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  if constexpr (G == 4) _tile_zero(3);
  for (int64_t k0 = 0; k0 < k_pad; k0 += kAmxDepth) {
    const c10::BFloat16* block = panel + (k0 / 2) * G * kGroup;
    _tile_loadd(4, a + k0, a_stride * 2);
    _tile_loadd(5, block, kBlockStride);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, block + kGroup, kBlockStride);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(7, block + 2 * kGroup, kBlockStride);
    _tile_dpbf16ps(2, 4, 7);
    if constexpr (G == 4) {
      _tile_loadd(5, block + 3 * kGroup, kBlockStride);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  constexpr int64_t kOutStride = G * kBf16Lanes * 4;  // bytes from one row of out to the next
  _tile_stored(0, out, kOutStride);
  _tile_stored(1, out + kBf16Lanes, kOutStride);
  _tile_stored(2, out + 2 * kBf16Lanes, kOutStride);
  if constexpr (G == 4) _tile_stored(3, out + 3 * kBf16Lanes, kOutStride);
}

// The same for 32 rows and four groups, A's rows 0-15 at a0 and 16-31 at a1: the sums of two row blocks and two
// groups at a time (tiles 0-3), A in tiles 4-5, the panel in 6-7, in two passes over k (groups 0-1, then 2-3).
// Each panel block then serves two row blocks, and half of a tile's panel (32 KB at k = 512) is read per pass:
// the LSTM's four-group panel (64 KB there) does not fit a 48 KB L1, and read once per 16 rows it left the
// product waiting on L2.
GATEDRNN_TARGET_AMX __attribute__((noinline)) inline void amx_product_32_rows(
    const c10::BFloat16* a0, int64_t a0_stride, const c10::BFloat16* a1, int64_t a1_stride, int64_t k_pad,
    const c10::BFloat16* panel, float* out) {
  constexpr int G = 4;
  constexpr int64_t kBlockStride = G * 2 * kBf16Lanes * 2, kGroup = 2 * kBf16Lanes;
  constexpr int64_t kOutStride = G * kBf16Lanes * 4, kSecondBlock = kAmxRows * G * kBf16Lanes;
  for (int half = 0; half < 2; ++half) {
    const c10::BFloat16* groups = panel + half * 2 * kGroup;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k0 = 0; k0 < k_pad; k0 += kAmxDepth) {
      const c10::BFloat16* block = groups + (k0 / 2) * G * kGroup;
      _tile_loadd(4, a0 + k0, a0_stride * 2);
      _tile_loadd(6, block, kBlockStride);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(5, a1 + k0, a1_stride * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_loadd(7, block + kGroup, kBlockStride);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    float* o = out + half * 2 * kBf16Lanes;
    _tile_stored(0, o, kOutStride);
    _tile_stored(1, o + kBf16Lanes, kOutStride);
    _tile_stored(2, o + kSecondBlock, kOutStride);
    _tile_stored(3, o + kSecondBlock + kBf16Lanes, kOutStride);
  }
}

// The A operand of one tile product: `rows` (<= 16) rows of k elements. Rows that are 16, evenly spaced and
// of a whole number of blocks are read where they are; any others are copied into a zero-padded block that the
// kernel call owns, so that the tile unit never reads past a row or a buffer.
struct AmxRows {
  std::vector<c10::BFloat16> padded;

  // Returns A's first row and sets `stride` (elements between rows).
  const c10::BFloat16* place(const c10::BFloat16* const* a, int64_t rows, int64_t k, int64_t k_pad,
                             int64_t& stride) {
    if (rows == kAmxRows && k == k_pad) {
      stride = a[1] - a[0];
      bool even = stride >= k;
      for (int64_t r = 2; r < rows && even; ++r) even = a[r] == a[0] + r * stride;
      if (even) return a[0];
    }
    padded.assign(kAmxRows * k_pad, c10::BFloat16(0.0f));
    for (int64_t r = 0; r < rows; ++r) std::memcpy(padded.data() + r * k_pad, a[r], k * sizeof(c10::BFloat16));
    stride = k_pad;
    return padded.data();
  }
};
#endif

}  // namespace gatedrnn::cpu
