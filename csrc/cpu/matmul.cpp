// The post-loop GEMM of the CPU backward ops: tile products (tiles.h) or ATen's, as measured (matmul.h).
#include "matmul.h"

#include <ATen/ATen.h>

#include <chrono>
#include <cstdlib>
#include <cstring>

#include "../layer_grads.h"
#include "team.h"
#include "products.h"
#include "tiles.h"

namespace gatedrnn::cpu {
namespace {

GATEDRNN_TILE_KERNELS(run_matmul_tiles, ProductTiles, "matmul")

constexpr int64_t kDepthBlock = 256;

// A transposed A (a view such as dG^T, whose rows are adjacent and whose k are a whole row of dG apart) is
// copied a block of kRowChunk rows x kDepthBlock k at a time into each thread's buffer, rows kept adjacent and
// the k padded kRowPad elements apart. Read in place, a row block's k were a row of dG apart: 4H floats, a
// multiple of 4 KB wherever H is a multiple of 256, so that every k of a depth block fell into the same set of
// the L1 cache, which holds 12 lines of one set. Measured on an AMD EPYC (Zen 5, two threads), dW_hh's
// product at T=100 B=64 H=256 ran at 150-165 GFLOP/s with AVX2 where H=250 (no such stride) ran at 190-200.
// Each thread copies the whole block for its share of the tiles: one element copied per N/threads
// multiply-adds, and no barrier.
constexpr int64_t kRowChunk = 96;                         // a multiple of every tile's rows (6, 3, 2)
constexpr int64_t kRowPad = kRowChunk + 16;               // 448 bytes of float: k rows not 4 KB apart
constexpr int64_t kRowBlockElements = kDepthBlock * kRowPad;  // one thread's buffer

// cpu_matmul's single-row products, which ATen runs (the tests' proof of which GEMM a B=1 step's input
// gradient took).
KernelCounter aten_one_row_products{"aten_one_row_products"};

template <typename T>
void tile_matmul_typed(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t m = a.size(0), depth = a.size(1), n = b.size(1), L = tile_lanes<T>();
  if (m == 0 || n == 0) return;
  if (depth == 0) {
    if (!accumulate) c.zero_();
    return;
  }
  const auto packed = pack_tiles(b.t(), 4, L, Columns::Contiguous, Scratch::PackedInput);  // [tiles, K, 4, L]
  const int64_t tiles = packed.size(0);
  const ProductTiles<T> base{{packed.const_data_ptr<T>(), packed.stride(0), 0},
                             a.const_data_ptr<T>(),
                             a.stride(0),
                             a.stride(1),
                             c.data_ptr<T>(),
                             nullptr,
                             c.stride(0),
                             n,
                             m,
                             false};
  const bool copy_rows = a.stride(0) == 1 && a.stride(1) != 1 && m > 1;
  const auto row_copies =
      copy_rows ? scratch_tensor(Scratch::MatmulRows, {team_size(), kRowBlockElements}, a.options()) : at::Tensor();
  run_team([&](const Team& team) {
    auto mt = base;
    for (int64_t k0 = 0; k0 < depth; k0 += kDepthBlock) {
      mt.k = std::min(kDepthBlock, depth - k0);
      mt.panels = base.panels + k0 * 4 * L;
      mt.add = accumulate || k0 > 0;
      if (!copy_rows) {
        mt.a = base.a + k0 * base.a_step;
        const auto share = share_of(tile_items(mt, tiles), team.tid, team.threads);
        run_matmul_tiles(mt, share.begin, share.end);
        continue;
      }
      T* rows = row_copies.data_ptr<T>() + team.tid * kRowBlockElements;
      for (int64_t m0 = 0; m0 < m; m0 += kRowChunk) {
        mt.rows = std::min(kRowChunk, m - m0);
        // The next chunk's rows of the same k are requested from memory now, to arrive during this chunk's
        // products (the copy is a phase of its own, with nothing to hide its misses behind).
        const int64_t next_rows = std::min(kRowChunk, m - m0 - kRowChunk);
        for (int64_t k = 0; k < mt.k; ++k) {
          const T* from = base.a + (k0 + k) * base.a_step + m0;
          std::memcpy(rows + k * kRowPad, from, mt.rows * sizeof(T));
          for (int64_t e = 0; e < next_rows; e += 64 / int64_t(sizeof(T))) {
            __builtin_prefetch(from + kRowChunk + e, 0, 2);
          }
        }
        mt.a = rows;
        mt.a_row_stride = 1;
        mt.a_step = kRowPad;
        mt.c = base.c + m0 * base.ldc;
        const auto share = share_of(tile_items(mt, tiles), team.tid, team.threads);
        run_matmul_tiles(mt, share.begin, share.end);
      }
    }
  });
}

// c (+)= a @ b on the tiles; c's rows must be contiguous.
void tile_matmul(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  TORCH_INTERNAL_ASSERT(c.stride(1) == 1 || c.size(1) <= 1);
  if (c.scalar_type() == at::kDouble) {
    tile_matmul_typed<double>(c, a, b, accumulate);
  } else {
    tile_matmul_typed<float>(c, a, b, accumulate);
  }
}

enum class Gemm { Tiles, Aten };

// The faster of the two on a product of the post-loop kind (a transposed A, depth longer than wide), timed
// once per process, best of three each.
Gemm choose_gemm() {
  static const Gemm chosen = [] {
    const char* forced = std::getenv("GATEDRNN_CPU_GEMM");
    if (forced && std::strcmp(forced, "tiles") == 0) return Gemm::Tiles;
    if (forced && std::strcmp(forced, "aten") == 0) return Gemm::Aten;
    const auto a = at::randn({1024, 384}), b = at::randn({1024, 256});
    auto c = at::empty({384, 256});
    const auto best_of_three = [&](Gemm g) {
      double best = 1e30;
      for (int i = 0; i < 4; ++i) {  // the first is a warm-up
        const auto start = std::chrono::steady_clock::now();
        if (g == Gemm::Tiles) {
          tile_matmul(c, a.t(), b, false);
        } else {
          at::mm_out(c, a.t(), b);
        }
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (i > 0) best = std::min(best, s);
      }
      return best;
    };
    return best_of_three(Gemm::Tiles) <= best_of_three(Gemm::Aten) ? Gemm::Tiles : Gemm::Aten;
  }();
  return chosen;
}

}  // namespace

const char* gemm_name() { return choose_gemm() == Gemm::Tiles ? "tiles" : "aten"; }

void cpu_matmul(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  // One row of A (a cell's input gradient at B = 1) is a matrix-vector product: ATen's GEMV reads b once,
  // where the tiles would first copy all of b into panels for a single use. Measured on an AMD EPYC (Zen 5,
  // two threads), dx = dG @ W_ih of an LSTM step at B = 1, tiles / ATen, in us: 18 / 5 (H = 128), 47 / 19
  // (256), 132 / 66 (512). From two rows on the tiles were as fast or faster (B = 4 at H = 256: 20 / 58).
  if (a.size(0) == 1) {
    aten_one_row_products.calls.fetch_add(1, std::memory_order_relaxed);
    return aten_matmul(c, a, b, accumulate);
  }
  if (choose_gemm() == Gemm::Tiles) return tile_matmul(c, a, b, accumulate);
  aten_matmul(c, a, b, accumulate);
}

}  // namespace gatedrnn::cpu
