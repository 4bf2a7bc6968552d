// The block tile every per-step kernel is built on: a thread block owns kTileUnits hidden units (threadIdx.x)
// and kRowGroups * RPT batch rows (threadIdx.y + kRowGroups * i), and computes, for each of its rows and
// units, NG dot products of length K between a row of A (h_{t-1} in the forward kernels, the next step's
// gate gradients in the backward ones) and NG columns of the re-laid-out weight tile. The results stay in
// registers, so the caller applies the cell math (cells.h) to them in the same kernel: gate pre-activations
// never reach global memory.
//
// Both operands are staged through shared memory in chunks of kChunk along K. The weight tile is laid out
// [K][NG][kTileUnits] (see launch.h), so a chunk is one contiguous, coalesced read. Each thread first loads
// its whole share of a chunk into registers (16-byte vector loads of the weights, one element of each of its
// A rows; trip counts fixed at compile time), and only then stores it to shared memory: all of a chunk's
// global loads are in flight together instead of one L2 round trip per load-store pair. A thread's A rows
// are pointers it computes itself from the kernel's parameters (never read back from shared memory), so
// they compile to global loads. float32 and float64 accumulate by FMA in acc_t (float32 never uses TF32
// here): thread x reads column x of the weight chunk (consecutive threads, consecutive banks) and the A value
// all threads of its warp read (a broadcast). float16 and bfloat16 run the chunk's product on tensor cores
// with float32 accumulators.
//
// The weights are read from global memory (L2) at every step; keeping a block's tile on chip across steps is
// the persistent kernel of a later issue, which can reuse this tile and replace the launch boundary with a
// grid barrier.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "../sequence.h"
#include "platform.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "gatedrnn's CUDA kernels need compute capability 8.0 or newer (bfloat16 tensor cores): set TORCH_CUDA_ARCH_LIST"
#endif

namespace gatedrnn::cuda {

// The block shape. These sizes fix the static shared memory of every kernel (TileStorage below: up to 40 KiB
// for the float64 forward kernel with 4 rows per thread, of the 48 KiB a kernel may declare statically), and
// the launches pass no dynamic shared memory. Larger tiles must move TileStorage to dynamic shared memory
// (extern __shared__, the size passed at launch, and cudaFuncSetAttribute(MaxDynamicSharedMemorySize) past
// 48 KB); .ci/kernel_resources.py reports each kernel's shared memory.
constexpr int kTileUnits = 32;  // hidden units per block: one warp across them
constexpr int kRowGroups = 8;   // warps per block, each on its own batch rows
constexpr int kThreads = kTileUnits * kRowGroups;
constexpr int kChunk = 32;  // K elements staged in shared memory per pass
// threadIdx.x is a thread's lane and threadIdx.y its warp only while a block row is exactly one warp: the
// tensor-core path gives each warp whole WMMA fragments (warp-collective calls, which must not diverge
// within a warp), and the staging below maps lanes to consecutive K elements.
static_assert(kTileUnits == 32, "a block row (threadIdx.x) must be exactly one warp");
// Launch bounds: at least two blocks per SM, i.e. up to 128 registers per thread. Without the second bound
// ptxas aimed at 64 registers and spilled in the float16 forward kernel.
constexpr int kMinBlocksPerSm = 2;

// Batch rows per thread for a step of `rows` rows over `unit_tiles` tiles of hidden units, on a GPU with
// `multiprocessors` SMs. A step with few rows gets small blocks instead of idle threads. And while the grid
// would leave SMs idle, the row blocks shrink (1 row per thread: 8 rows per block) to make more blocks:
// each block then re-reads its weight tile from L2 for fewer rows, but at T=100 B=64 H=512 on 132 SMs that is
// 128 busy SMs instead of 32. This choice comes from a model of the kernels, not a measurement: `.ci/gpu`
// prints each kernel's time per launch, per rows-per-thread shape, to settle it on the first lent GPU.
inline int rows_per_thread(int64_t rows, int64_t unit_tiles, int64_t multiprocessors) {
  int rpt = rows <= kRowGroups ? 1 : rows <= 2 * kRowGroups ? 2 : 4;
  auto blocks = [&](int r) { return (rows + kRowGroups * r - 1) / (kRowGroups * r) * unit_tiles; };
  while (rpt > 1 && blocks(rpt) < multiprocessors) rpt /= 2;
  return rpt;
}

// Storage types whose per-step product runs on tensor cores (WMMA, float32 accumulation).
template <typename scalar_t>
constexpr bool kUsesTensorCores = std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

template <typename scalar_t, int NG, int RPT>
struct TileStorage {
  static constexpr int kRows = kRowGroups * RPT;
  static constexpr int kWidth = NG * kTileUnits;
  union {
    struct {
      scalar_t w[kChunk][kWidth];  // a K chunk of the weight tile
      scalar_t a[kRows][kChunk];   // the same K chunk of the block's A rows
    } in;
    float out[kRows][kWidth];  // tensor-core results, handed to the threads that own them (half/bfloat16 only)
  };
};

// Shared memory for a TileStorage. Declared as raw bytes: c10::Half and c10::BFloat16 have constructors,
// which __shared__ variables may not have.
#define GATEDRNN_TILE_STORAGE(name, type)                         \
  __shared__ __align__(128) unsigned char name##_bytes[sizeof(type)]; \
  type& name = *reinterpret_cast<type*>(name##_bytes)

// The recurrent state batch row b saw on entry to `step`, H wide: the previous step's output row, or the
// initial state for a row's first step (the step kernels' A rows in the forward, and their h_{t-1}).
template <typename scalar_t>
__device__ __forceinline__ const scalar_t* previous_state(const scalar_t* output, const scalar_t* h0, int64_t b,
                                                          const Step& step, int64_t H) {
  return b < step.prev_rows ? output + (step.prev_offset + b) * H : h0 + b * H;
}

// The A row of each of this thread's tile rows i (batch row b = blockIdx.x * kRows + threadIdx.y +
// kRowGroups * i), or null for a row past `rows`, which contributes zeros.
template <typename scalar_t, int RPT>
struct TileRows {
  const scalar_t* row[RPT];
};

// TileRows from row_of(b), the A row of batch row b < rows. Every thread computes its own, from the kernel's
// parameters: pointers the compiler can prove global (see the file comment).
template <typename scalar_t, int RPT, typename RowOf>
__device__ __forceinline__ TileRows<scalar_t, RPT> tile_rows(int64_t rows, const RowOf& row_of) {
  TileRows<scalar_t, RPT> t;
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int64_t b = int64_t(blockIdx.x) * (kRowGroups * RPT) + threadIdx.y + kRowGroups * i;
    t.row[i] = b < rows ? row_of(b) : nullptr;
  }
  return t;
}

// kBytes of a weight chunk, the unit of its vector loads (launch.h's tiles are contiguous, each chunk
// starting at a multiple of kChunk * kWidth elements: aligned to any vector width here, for every dtype).
template <typename scalar_t, int kBytes>
struct alignas(kBytes) WeightVector {
  scalar_t v[kBytes / sizeof(scalar_t)];
};

// Stages K chunk [k0, k0 + kChunk) of the weight tile and of the A rows in shared memory (zeros past K),
// then synchronises the block. Loads first, all of them, then stores (see the file comment).
template <typename scalar_t, int NG, int RPT>
__device__ __forceinline__ void stage_chunk(TileStorage<scalar_t, NG, RPT>& s, const scalar_t* __restrict__ w_tile,
                                            const TileRows<scalar_t, RPT>& a_rows, int64_t K, int64_t k0) {
  using Storage = TileStorage<scalar_t, NG, RPT>;
  // Each thread loads kThreadBytes of a chunk (4 * NG elements), in the widest vectors that divide it: 16
  // bytes, or 8 where that does not divide (16-bit types with one or three gates), so that every thread
  // loads the same whole number of vectors.
  constexpr int kChunkBytes = kChunk * Storage::kWidth * int(sizeof(scalar_t));
  constexpr int kThreadBytes = kChunkBytes / kThreads;
  constexpr int kVectorBytes = kThreadBytes % 16 == 0 ? 16 : kThreadBytes % 8 == 0 ? 8 : int(sizeof(scalar_t));
  using Vector = WeightVector<scalar_t, kVectorBytes>;
  constexpr int kPerVector = kVectorBytes / sizeof(scalar_t);
  constexpr int kVectorsPerThread = kChunkBytes / kVectorBytes / kThreads;
  static_assert(kVectorsPerThread * kVectorBytes * kThreads == kChunkBytes && Storage::kWidth % kPerVector == 0,
                "a chunk splits evenly into whole vectors, each within one K row");
  const int tid = threadIdx.y * kTileUnits + threadIdx.x;
  const int64_t chunk = K - k0 < kChunk ? K - k0 : kChunk;  // K rows of this chunk that exist
  const Vector* w_chunk = reinterpret_cast<const Vector*>(w_tile + k0 * Storage::kWidth);

  Vector w[kVectorsPerThread];
#pragma unroll
  for (int i = 0; i < kVectorsPerThread; ++i) {
    const int v = tid + i * kThreads;  // a vector lies within one K row: kWidth is a multiple of kPerVector
    if (v * kPerVector / Storage::kWidth < chunk) {
      w[i] = w_chunk[v];
    } else {
#pragma unroll
      for (int e = 0; e < kPerVector; ++e) w[i].v[e] = scalar_t(0);
    }
  }
  scalar_t a[RPT];  // lane x loads element k0 + x of each of its rows: a warp reads a row's chunk, coalesced
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    a[i] = (a_rows.row[i] != nullptr && threadIdx.x < chunk) ? a_rows.row[i][k0 + threadIdx.x] : scalar_t(0);
  }

  Vector* w_shared = reinterpret_cast<Vector*>(&s.in.w[0][0]);
#pragma unroll
  for (int i = 0; i < kVectorsPerThread; ++i) w_shared[tid + i * kThreads] = w[i];
#pragma unroll
  for (int i = 0; i < RPT; ++i) s.in.a[threadIdx.y + kRowGroups * i][threadIdx.x] = a[i];
  __syncthreads();
}

// float32/float64: every thread accumulates its own NG x RPT dot products by FMA.
template <typename scalar_t, typename acc_t, int NG, int RPT>
__device__ __forceinline__ void tile_matmul_fma(TileStorage<scalar_t, NG, RPT>& s, const scalar_t* __restrict__ w_tile,
                                                const TileRows<scalar_t, RPT>& a_rows, int64_t K,
                                                acc_t (&acc)[NG][RPT]) {
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    stage_chunk(s, w_tile, a_rows, K, k0);
#pragma unroll 4
    for (int kk = 0; kk < kChunk; ++kk) {
      acc_t w[NG];
#pragma unroll
      for (int g = 0; g < NG; ++g) w[g] = static_cast<acc_t>(s.in.w[kk][g * kTileUnits + threadIdx.x]);
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const acc_t a = static_cast<acc_t>(s.in.a[threadIdx.y + kRowGroups * i][kk]);
#pragma unroll
        for (int g = 0; g < NG; ++g) acc[g][i] += w[g] * a;
      }
    }
    __syncthreads();  // the next chunk overwrites s.in
  }
}

template <typename scalar_t>
struct WmmaType;
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// float16/bfloat16: the block's [rows x NG*32] product on tensor cores (WMMA, float32 accumulators), its
// output fragments dealt round-robin to the 8 warps. 8 rows use the m8n32k16 shape, 16 or 32 rows m16n16k16.
// The results go through shared memory (s.out, over the staged inputs) to the threads that own them.
template <typename scalar_t, int NG, int RPT>
__device__ __forceinline__ void tile_matmul_mma(TileStorage<scalar_t, NG, RPT>& s, const scalar_t* __restrict__ w_tile,
                                                const TileRows<scalar_t, RPT>& a_rows, int64_t K,
                                                float (&acc)[NG][RPT]) {
  namespace wmma = nvcuda::wmma;
  using Storage = TileStorage<scalar_t, NG, RPT>;
  using T = typename WmmaType<scalar_t>::type;
  constexpr int kM = Storage::kRows == 8 ? 8 : 16, kN = Storage::kRows == 8 ? 32 : 16, kK = 16;
  constexpr int kTilesM = Storage::kRows / kM, kTilesN = Storage::kWidth / kN;
  constexpr int kFragments = kTilesM * kTilesN;
  constexpr int kPerWarp = (kFragments + kRowGroups - 1) / kRowGroups;
  // WMMA loads and stores need 32-byte aligned pointers and leading dimensions that are multiples of 16
  // bytes; the storage is 128-byte aligned and every fragment offset below is a multiple of these.
  static_assert(sizeof(s.in.w) % 32 == 0 && (kM * kChunk * sizeof(T)) % 32 == 0 && (kK * sizeof(T)) % 32 == 0);
  static_assert((kK * Storage::kWidth * sizeof(T)) % 32 == 0 && (kN * sizeof(T)) % 32 == 0);
  static_assert((kM * Storage::kWidth * sizeof(float)) % 32 == 0 && (Storage::kWidth * sizeof(T)) % 16 == 0);
  static_assert(Storage::kRows % kM == 0 && Storage::kWidth % kN == 0 && kChunk % kK == 0);
  const int warp = threadIdx.y;  // a block row is one warp (static_assert above)

  wmma::fragment<wmma::accumulator, kM, kN, kK, float> c[kPerWarp];
#pragma unroll
  for (int q = 0; q < kPerWarp; ++q) wmma::fill_fragment(c[q], 0.0f);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    stage_chunk(s, w_tile, a_rows, K, k0);
#pragma unroll
    for (int q = 0; q < kPerWarp; ++q) {
      const int f = warp + kRowGroups * q;
      if (f >= kFragments) break;  // uniform across the warp
      const int tile_m = f / kTilesN, tile_n = f % kTilesN;
#pragma unroll
      for (int kk = 0; kk < kChunk; kk += kK) {
        wmma::fragment<wmma::matrix_a, kM, kN, kK, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, kM, kN, kK, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, reinterpret_cast<const T*>(&s.in.a[tile_m * kM][kk]), kChunk);
        wmma::load_matrix_sync(b, reinterpret_cast<const T*>(&s.in.w[kk][tile_n * kN]), Storage::kWidth);
        wmma::mma_sync(c[q], a, b, c[q]);
      }
    }
    __syncthreads();  // the next chunk (or s.out below) overwrites s.in
  }
#pragma unroll
  for (int q = 0; q < kPerWarp; ++q) {
    const int f = warp + kRowGroups * q;
    if (f >= kFragments) break;
    const int tile_m = f / kTilesN, tile_n = f % kTilesN;
    wmma::store_matrix_sync(&s.out[tile_m * kM][tile_n * kN], c[q], Storage::kWidth, wmma::mem_row_major);
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < NG; ++g) {
#pragma unroll
    for (int i = 0; i < RPT; ++i) acc[g][i] += s.out[threadIdx.y + kRowGroups * i][g * kTileUnits + threadIdx.x];
  }
}

// acc[g][i] += sum_k a_rows.row[i][k] * w_tile[k][g][threadIdx.x], k < K. Every thread of the block must
// call this (it synchronises the block).
template <typename scalar_t, typename acc_t, int NG, int RPT>
__device__ __forceinline__ void tile_matmul(TileStorage<scalar_t, NG, RPT>& s, const scalar_t* __restrict__ w_tile,
                                            const TileRows<scalar_t, RPT>& a_rows, int64_t K, acc_t (&acc)[NG][RPT]) {
  if constexpr (kUsesTensorCores<scalar_t>) {
    tile_matmul_mma(s, w_tile, a_rows, K, acc);
  } else {
    tile_matmul_fma(s, w_tile, a_rows, K, acc);
  }
}

// acc = (the first K columns of the rows of a later step's gradients, `stride` apart: the A row of batch row b <
// later_rows is later_grads + b * stride) @ w_tiles (backward_weight_tiles, [tiles][K][32]); zeros for this
// block's rows past later_rows, and nothing is computed when the whole block is past them. The backward step
// kernels' product: the gradient reaching h_t through the K rows of W_hh that read it. Every thread of the
// block must call this (it synchronises the block).
template <typename scalar_t, typename acc_t, int RPT>
__device__ __forceinline__ void later_rows_product(TileStorage<scalar_t, 1, RPT>& tile, const scalar_t* w_tiles,
                                                   const scalar_t* later_grads, int64_t later_rows, int64_t stride,
                                                   int64_t K, acc_t (&acc)[1][RPT]) {
  const auto a_rows = tile_rows<scalar_t, RPT>(later_rows, [&](int64_t b) { return later_grads + b * stride; });
  if (int64_t(blockIdx.x) * TileStorage<scalar_t, 1, RPT>::kRows < later_rows) {  // uniform across the block
    tile_matmul(tile, w_tiles + int64_t(blockIdx.y) * K * kTileUnits, a_rows, K, acc);
  }
}

// The hidden unit of this thread.
__device__ __forceinline__ int64_t tile_unit() { return int64_t(blockIdx.y) * kTileUnits + threadIdx.x; }

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
