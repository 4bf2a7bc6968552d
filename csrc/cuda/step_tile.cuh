// The block tile every per-step kernel is built on: a thread block owns kTileUnits hidden units (threadIdx.x)
// and kRowGroups * RPT batch rows (threadIdx.y + kRowGroups * i), and computes, for each of its rows and
// units, NG dot products of length K between a row of A (h_{t-1} in the forward kernels, the next step's
// gate gradients in the backward ones) and NG columns of the re-laid-out weight tile. The results stay in
// registers, so the caller applies the cell math (cells.h) to them in the same kernel: gate pre-activations
// never reach global memory.
//
// Both operands are staged through shared memory in chunks of kChunk along K. The weight tile is laid out
// [K][NG][kTileUnits] (see weights.h), so a chunk is one contiguous, coalesced read, and thread x reads
// column x of it: consecutive threads, consecutive banks. Every thread of a warp reads the same A value
// (a broadcast). Accumulation is in acc_t (float for float/half/bfloat16, double for double), by FMA.
//
// The weights are read from global memory (L2) at every step; keeping a block's tile on chip across steps is
// the persistent kernel of a later issue, which can reuse this tile and replace the launch boundary with a
// grid barrier.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace gatedrnn::cuda {

constexpr int kTileUnits = 32;  // hidden units per block: one warp across them
constexpr int kRowGroups = 8;   // warps per block, each on its own batch rows
constexpr int kThreads = kTileUnits * kRowGroups;
constexpr int kChunk = 32;  // K elements staged in shared memory per pass
// Launch bounds: at least two blocks per SM, i.e. up to 128 registers per thread. Without the second bound
// ptxas aimed at 64 registers and spilled in the float16 forward kernel.
constexpr int kMinBlocksPerSm = 2;

// Batch rows per thread: a step with few rows gets small blocks instead of idle threads.
inline int rows_per_thread(int64_t rows) { return rows <= kRowGroups ? 1 : rows <= 2 * kRowGroups ? 2 : 4; }

template <typename scalar_t, int NG, int RPT>
struct TileStorage {
  static constexpr int kRows = kRowGroups * RPT;
  scalar_t w[kChunk][NG * kTileUnits];
  scalar_t a[kRows][kChunk];
  const scalar_t* rows[kRows];  // A's row of each tile row, or null for a row that contributes zeros
};

// Shared memory for a TileStorage. Declared as raw bytes: c10::Half and c10::BFloat16 have constructors,
// which __shared__ variables may not have.
#define GATEDRNN_TILE_STORAGE(name, type)                        \
  __shared__ __align__(16) unsigned char name##_bytes[sizeof(type)]; \
  type& name = *reinterpret_cast<type*>(name##_bytes)

// acc[g][i] += sum_k s.rows[threadIdx.y + kRowGroups * i][k] * w_tile[k][g][threadIdx.x], k < K.
// s.rows must be set (and synchronised) by the caller. Every thread of the block must call this.
template <typename scalar_t, typename acc_t, int NG, int RPT>
__device__ __forceinline__ void tile_matmul(TileStorage<scalar_t, NG, RPT>& s, const scalar_t* __restrict__ w_tile,
                                            int64_t K, acc_t (&acc)[NG][RPT]) {
  using Storage = TileStorage<scalar_t, NG, RPT>;
  constexpr int kWidth = NG * kTileUnits;
  const int tid = threadIdx.y * kTileUnits + threadIdx.x;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t chunk = K - k0 < kChunk ? K - k0 : kChunk;
    const scalar_t* w_chunk = w_tile + k0 * kWidth;
    for (int e = tid; e < kChunk * kWidth; e += kThreads) {
      (&s.w[0][0])[e] = e / kWidth < chunk ? w_chunk[e] : scalar_t(0);
    }
    for (int e = tid; e < Storage::kRows * kChunk; e += kThreads) {
      const int r = e / kChunk, kk = e % kChunk;
      const scalar_t* row = s.rows[r];
      s.a[r][kk] = (row != nullptr && kk < chunk) ? row[k0 + kk] : scalar_t(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kChunk; ++kk) {
      acc_t w[NG];
#pragma unroll
      for (int g = 0; g < NG; ++g) w[g] = static_cast<acc_t>(s.w[kk][g * kTileUnits + threadIdx.x]);
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const acc_t a = static_cast<acc_t>(s.a[threadIdx.y + kRowGroups * i][kk]);
#pragma unroll
        for (int g = 0; g < NG; ++g) acc[g][i] += w[g] * a;
      }
    }
    __syncthreads();  // the next chunk overwrites s.w and s.a
  }
}

// The hidden unit of this thread.
__device__ __forceinline__ int64_t tile_unit() { return int64_t(blockIdx.y) * kTileUnits + threadIdx.x; }

// Sets tile.rows[r] = row_of(b) for the block's tile rows r that are batch rows b < rows (null for the rest),
// then synchronises the block.
template <typename Storage, typename RowOf>
__device__ __forceinline__ void set_tile_rows(Storage& tile, int64_t rows, const RowOf& row_of) {
  const int tid = threadIdx.y * kTileUnits + threadIdx.x;
  if (tid < Storage::kRows) {
    const int64_t b = int64_t(blockIdx.x) * Storage::kRows + tid;
    tile.rows[tid] = b < rows ? row_of(b) : nullptr;
  }
  __syncthreads();
}

// Calls f(i, b) for each of this thread's tile rows i whose batch row b is below `rows`.
template <int RPT, typename F>
__device__ __forceinline__ void for_each_thread_row(int64_t rows, const F& f) {
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int64_t b = int64_t(blockIdx.x) * (kRowGroups * RPT) + threadIdx.y + kRowGroups * i;
    if (b < rows) f(i, b);
  }
}

}  // namespace gatedrnn::cuda
