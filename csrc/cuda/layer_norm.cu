// The layer_norm LSTM and GRU on CUDA (csrc/layer_norm.h): the twin of csrc/cpu/layer_norm.cpp, in the same two
// phases per step. A norm needs a whole row of its product before it can finish any column, which one block
// tile (a row block times 32 units) never has, so:
//  1. the product kernel (*_norm_product_step, on step_tile.cuh's block tile) computes h_{t-1} @ W_hh^T for all
//     gates of its units and rows and stores it, in the accumulation dtype, to a [B, G*H] step buffer;
//  2. the launch boundary is the grid barrier; then the row kernel (*_norm_rows: one block per batch row)
//     normalises the input projection (one GEMM for all steps, before the loop) and the product with block
//     reductions, runs the cell (cells.h) and, for the LSTM, normalises c_t before the tanh.
// Backward mirrors it: *_norm_backward_product_step stores d(h W_hh^T)_{t+1} @ W_hh for the step's rows, then
// *_norm_grad_rows runs the cell's derivative and the norms' backward, giving the gradients that reach the two
// products (the next backward product reads the recurrent one). Weight, input, bias and norm-parameter
// gradients are GEMMs and reductions after the loop (layer_grads.h). Saved rows as layer_norm.h lays them out.
//
// In a row kernel every thread owns the same hidden units l = threadIdx.x + k * kNormThreads in every phase (and
// the columns q * H + l of the row's gates), so it only ever reads back what it wrote itself; the threads meet
// only in the block reductions, whose barriers order everything else.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <tuple>

#include "../cells.h"
#include "../checks.h"
#include "../layer_grads.h"
#include "../layer_norm.h"
#include "../op_entry.h"
#include "../sequence.h"
#include "launch.h"
#include "layer_norm_ops.h"
#include "platform.h"
#include "step_tile.cuh"

namespace gatedrnn::cuda {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

constexpr int kNormThreads = 128;  // threads of a row kernel's block (one batch row)

// ----------------------------------------------------------------------------------------- products
template <typename scalar_t>
struct NormProductStep {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* w_tiles;        // forward_weight_tiles(W_hh): [tiles][H][G][32]
  const scalar_t* output;         // [N, H]: h_t; the previous step's rows are this step's h_{t-1}
  const scalar_t* h0;             // [B, H]
  const scalar_t* masked_output;  // [N, H]: h_t * mask with recurrent dropout (the product reads it), or null
  const scalar_t* masked_h0;      // [B, H], or null
  acc_t* product;                 // [B, G*H] out
  int64_t hidden;
  Step step;
};

// product[b] = h_{t-1}[b] @ W_hh^T for this block's rows and units, all NG gates.
template <typename scalar_t, int NG, int RPT>
__device__ __forceinline__ void store_recurrent_product(TileStorage<scalar_t, NG, RPT>& tile,
                                                        const NormProductStep<scalar_t>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = p.hidden;
  const auto a_rows = tile_rows<scalar_t, RPT>(p.step.rows, [&](int64_t b) {
    return p.masked_output ? previous_state(p.masked_output, p.masked_h0, b, p.step, H)
                           : previous_state(p.output, p.h0, b, p.step, H);
  });
  acc_t acc[NG][RPT] = {};
  tile_matmul(tile, p.w_tiles + int64_t(blockIdx.y) * H * NG * kTileUnits, a_rows, H, acc);
  const int64_t j = tile_unit();
  if (j >= H) return;
  for_each_thread_row<RPT>(p.step.rows, [&](int i, int64_t b) {
#pragma unroll
    for (int g = 0; g < NG; ++g) p.product[b * NG * H + g * H + j] = acc[g][i];
  });
}

template <typename scalar_t, int RPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) lstm_norm_product_step(const NormProductStep<scalar_t> p) {
  using Storage = TileStorage<scalar_t, 4, RPT>;
  GATEDRNN_TILE_STORAGE(tile, Storage);
  store_recurrent_product(tile, p);
}

template <typename scalar_t, int RPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) gru_norm_product_step(const NormProductStep<scalar_t> p) {
  using Storage = TileStorage<scalar_t, 3, RPT>;
  GATEDRNN_TILE_STORAGE(tile, Storage);
  store_recurrent_product(tile, p);
}

template <typename scalar_t>
struct NormBackwardProductStep {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* w_tiles;      // backward_weight_tiles(W_hh): [tiles][G*H][32]
  const scalar_t* later_grads;  // d_recurrent rows of the step processed after this one (its row b: + b * G*H)
  int64_t later_rows;           // rows of this step that fed that later step
  acc_t* product;               // [B, H] out
  int64_t hidden, rows;         // rows: this step's
};

// product[b] = d_recurrent_{t+1}[b] @ W_hh for this block's rows (zeros for rows that fed no later step).
template <typename scalar_t, int RPT>
__device__ __forceinline__ void store_later_product(TileStorage<scalar_t, 1, RPT>& tile,
                                                    const NormBackwardProductStep<scalar_t>& p, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t acc[1][RPT] = {};
  later_rows_product(tile, p.w_tiles, p.later_grads, p.later_rows, K, K, acc);
  const int64_t j = tile_unit();
  if (j >= p.hidden) return;
  for_each_thread_row<RPT>(p.rows, [&](int i, int64_t b) { p.product[b * p.hidden + j] = acc[0][i]; });
}

template <typename scalar_t, int RPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    lstm_norm_backward_product_step(const NormBackwardProductStep<scalar_t> p) {
  using Storage = TileStorage<scalar_t, 1, RPT>;
  GATEDRNN_TILE_STORAGE(tile, Storage);
  store_later_product(tile, p, 4 * p.hidden);
}

template <typename scalar_t, int RPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    gru_norm_backward_product_step(const NormBackwardProductStep<scalar_t> p) {
  using Storage = TileStorage<scalar_t, 1, RPT>;
  GATEDRNN_TILE_STORAGE(tile, Storage);
  store_later_product(tile, p, 3 * p.hidden);
}

template <typename scalar_t>
constexpr auto lstm_norm_product_step_instance = [](auto rpt) {  // for launch_step
  return lstm_norm_product_step<scalar_t, decltype(rpt)::value>;
};
template <typename scalar_t>
constexpr auto gru_norm_product_step_instance = [](auto rpt) {
  return gru_norm_product_step<scalar_t, decltype(rpt)::value>;
};
template <typename scalar_t>
constexpr auto lstm_norm_backward_product_step_instance = [](auto rpt) {
  return lstm_norm_backward_product_step<scalar_t, decltype(rpt)::value>;
};
template <typename scalar_t>
constexpr auto gru_norm_backward_product_step_instance = [](auto rpt) {
  return gru_norm_backward_product_step<scalar_t, decltype(rpt)::value>;
};

// ----------------------------------------------------------------------------------------- row helpers
// The sum of every thread's `value`, returned to all of them: a tree over shared memory, in a fixed order
// (deterministic). Every thread of the block must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t value, acc_t* shared) {
  const int t = threadIdx.x;
  shared[t] = value;
  __syncthreads();
  for (int stride = kNormThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) shared[t] += shared[t + stride];
    __syncthreads();
  }
  const acc_t total = shared[0];
  __syncthreads();  // everyone has read it before the next call overwrites it
  return total;
}

template <typename acc_t>
__device__ __forceinline__ acc_t reciprocal_sqrt(acc_t v) {
#ifdef __CUDA_ARCH__
  return acc_t(1) / sqrt(v);  // CUDA's float and double overloads
#else
  return acc_t(1) / std::sqrt(v);
#endif
}

// Mean and 1/σ of x[0, n) (two passes, as layer_norm.h's norm_stats), the columns strided over the block.
template <typename acc_t, typename X>
__device__ __forceinline__ NormStats<acc_t> block_norm_stats(const X* x, int64_t n, acc_t* shared) {
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < n; j += kNormThreads) sum += static_cast<acc_t>(x[j]);
  const acc_t mean = block_sum(sum, shared) / acc_t(n);
  acc_t squares = 0;
  for (int64_t j = threadIdx.x; j < n; j += kNormThreads) {
    const acc_t d = static_cast<acc_t>(x[j]) - mean;
    squares += d * d;
  }
  return {mean, reciprocal_sqrt(block_sum(squares, shared) / acc_t(n) + acc_t(kLayerNormEps))};
}

// One row kernel per step: a block per batch row.
template <typename Params>
void launch_rows(int64_t rows, void (*kernel)(Params), const Params& params) {
  if (rows == 0) return;
  launch_kernel(kernel, dim3(static_cast<unsigned>(rows)), dim3(kNormThreads), params);
}

// ---------------------------------------------------------------------------------------------- LSTM
template <typename scalar_t>
struct LstmNormRowStep {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* gain;          // [9H]
  const acc_t* shift;         // [9H]
  const acc_t* bias;          // [4H]: b_ih + b_hh, or null
  const scalar_t* x_proj;     // [N, 4H]
  const acc_t* product;       // [B, 4H]: this step's h_{t-1} W_hh^T
  const scalar_t* h0;         // [B, H]
  scalar_t* output;           // [N, H]
  scalar_t* hy;               // [B, H]
  const acc_t* recurrent_mask;  // [B, H] or null
  scalar_t* masked_output;      // [N, H] or null
  acc_t* c_state;             // [B, H]
  acc_t* candidate;           // [B, H]: c~ of this step (scratch)
  acc_t* gates;               // saving: [N, 4H] saved gates (by packed row); else a [B, 4H] scratch (by b)
  acc_t* cells;               // [N, lstm_norm_cells_width(H)] when saving, else null
  ZoneoutKeep<acc_t> keep_h, keep_c;
  int64_t hidden;
  Step step;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kNormThreads) lstm_norm_rows(const LstmNormRowStep<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kNormThreads];
  const int64_t H = p.hidden, G = 4 * H, b = blockIdx.x, row = p.step.offset + b;
  const scalar_t* x = p.x_proj + row * G;
  const acc_t* h = p.product + b * G;
  const auto x_stats = block_norm_stats(x, G, shared);
  const auto h_stats = block_norm_stats(h, G, shared);
  acc_t* gates = p.gates + (p.cells ? row : b) * G;
  acc_t* saved = p.cells ? p.cells + row * lstm_norm_cells_width(H) : nullptr;
  acc_t* candidate = p.candidate + b * H;
  acc_t* c = p.c_state + b * H;
  for (int64_t l = threadIdx.x; l < H; l += kNormThreads) {
    acc_t pre[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t n = q * H + l;
      const acc_t xv = (static_cast<acc_t>(x[n]) - x_stats.mean) * x_stats.rstd;
      const acc_t hv = (h[n] - h_stats.mean) * h_stats.rstd;
      pre[q] = p.gain[n] * xv + p.shift[n] + p.gain[G + n] * hv + p.shift[G + n] + (p.bias ? p.bias[n] : acc_t(0));
      if (saved) {
        saved[H + n] = xv;
        saved[H + G + n] = hv;
      }
    }
    const auto a = lstm_activate<acc_t>(pre[0], pre[1], pre[2], pre[3]);
    gates[l] = a.i;
    gates[H + l] = a.f;
    gates[2 * H + l] = a.g;
    gates[3 * H + l] = a.o;
    candidate[l] = lstm_cell_state(a, c[l]);
  }
  // The candidates' columns are this thread's own units: block_norm_stats strides them the same way.
  const auto c_stats = block_norm_stats(candidate, H, shared);
  const scalar_t* h_prev = previous_state(p.output, p.h0, b, p.step, H);
  for (int64_t l = threadIdx.x; l < H; l += kNormThreads) {
    const acc_t v = (candidate[l] - c_stats.mean) * c_stats.rstd;
    acc_t hidden = gates[3 * H + l] * tanh_(p.gain[2 * G + l] * v + p.shift[2 * G + l]);  // o tanh(LN(c~))
    if (p.keep_h.data) hidden = zoneout(p.keep_h.at(row, l), static_cast<acc_t>(h_prev[l]), hidden);
    const acc_t c_new = p.keep_c.data ? zoneout(p.keep_c.at(row, l), c[l], candidate[l]) : candidate[l];
    c[l] = c_new;
    p.output[row * H + l] = static_cast<scalar_t>(hidden);
    p.hy[b * H + l] = static_cast<scalar_t>(hidden);
    if (p.masked_output) p.masked_output[row * H + l] = static_cast<scalar_t>(hidden * p.recurrent_mask[b * H + l]);
    if (saved) {
      saved[l] = c_new;
      saved[H + 2 * G + l] = v;
    }
  }
  if (saved && threadIdx.x == 0) {
    acc_t* rstd = saved + lstm_norm_cells_width(H) - 3;
    rstd[0] = x_stats.rstd;
    rstd[1] = h_stats.rstd;
    rstd[2] = c_stats.rstd;
  }
}

template <typename scalar_t>
struct LstmNormGradRowStep {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* gain;            // [9H]
  const acc_t* shift;           // [9H]
  const acc_t* gates;           // [N, 4H]: saved i, f, g, o
  const acc_t* cells;           // [N, lstm_norm_cells_width(H)]
  const acc_t* c0;              // [B, H]
  const scalar_t* grad_output;  // [N, H]
  const acc_t* product;         // [B, H]: this step's d(h W_hh^T)_{t+1} @ W_hh
  acc_t* carry;                 // [B, H]: grad_hy, then the gradient reaching h_{t-1} outside the product
  acc_t* dc_state;              // [B, H]: the gradient reaching c_t in, c_{t-1} out
  acc_t* d_pre;                 // [N, 4H]: the pre-activation gradients
  acc_t* d_cell_norm;           // [N, H]: the gradient reaching the cell norm's output
  scalar_t* d_input_proj;       // [N, 4H]: the gradient reaching x W_ih^T
  scalar_t* d_recurrent;        // [N, 4H]: the gradient reaching h_{t-1} W_hh^T
  ZoneoutKeep<acc_t> keep_h, keep_c;
  const acc_t* recurrent_mask;  // [B, H] or null
  int64_t hidden;
  Step step;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kNormThreads) lstm_norm_grad_rows(const LstmNormGradRowStep<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kNormThreads];
  const int64_t H = p.hidden, G = 4 * H, b = blockIdx.x, row = p.step.offset + b;
  const int64_t width = lstm_norm_cells_width(H);
  const acc_t* a_row = p.gates + row * G;
  const acc_t* saved = p.cells + row * width;
  const acc_t* x_hat = saved + H;
  const acc_t* h_hat = x_hat + G;
  const acc_t* c_hat = h_hat + G;
  const acc_t* rstd = saved + width - 3;
  const acc_t* c_prev = b < p.step.prev_rows ? p.cells + (p.step.prev_offset + b) * width : p.c0 + b * H;
  acc_t* dp = p.d_pre + row * G;
  acc_t* d_norm = p.d_cell_norm + row * H;
  const acc_t* gain_c = p.gain + 2 * G;
  // dh_t, and the cell norm's output gradient; the gradient reaching o waits in d_pre's o column.
  acc_t sum_g = 0, sum_gx = 0;
  for (int64_t l = threadIdx.x; l < H; l += kNormThreads) {
    const acc_t through_w_hh = p.recurrent_mask ? p.product[b * H + l] * p.recurrent_mask[b * H + l]
                                                : p.product[b * H + l];
    acc_t dh = through_w_hh + static_cast<acc_t>(p.grad_output[row * H + l]) + p.carry[b * H + l];
    const acc_t k_h = p.keep_h.data ? p.keep_h.at(row, l) : acc_t(0);
    p.carry[b * H + l] = k_h * dh;  // zoneout's kept part goes straight to h_{t-1}
    dh *= acc_t(1) - k_h;
    const acc_t t = tanh_(gain_c[l] * c_hat[l] + p.shift[2 * G + l]);
    d_norm[l] = dh * a_row[3 * H + l] * (acc_t(1) - t * t);
    dp[3 * H + l] = dh * t;
    const acc_t g = d_norm[l] * gain_c[l];
    sum_g += g;
    sum_gx += g * c_hat[l];
  }
  const acc_t mean_g = block_sum(sum_g, shared) / acc_t(H), mean_gx = block_sum(sum_gx, shared) / acc_t(H);
  // The gate gradients, then the two norms' backward sums over this thread's columns of them.
  acc_t sums[4] = {0, 0, 0, 0};  // input norm: sum g, sum g x^; recurrent norm: the same
  for (int64_t l = threadIdx.x; l < H; l += kNormThreads) {
    const acc_t d_candidate = rstd[2] * (d_norm[l] * gain_c[l] - mean_g - c_hat[l] * mean_gx);
    const LstmGates<acc_t> a{a_row[l], a_row[H + l], a_row[2 * H + l], a_row[3 * H + l]};
    const acc_t k_c = p.keep_c.data ? p.keep_c.at(row, l) : acc_t(0);
    const acc_t dc = p.dc_state[b * H + l];
    const acc_t d_total = d_candidate + (acc_t(1) - k_c) * dc;
    LstmGateGrads<acc_t> d;
    lstm_gate_grads(a, c_prev[l], d_total, dp[3 * H + l], d);
    p.dc_state[b * H + l] = d_total * a.f + k_c * dc;
    const acc_t grads[4] = {d.i, d.f, d.g, d.o};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t n = q * H + l;
      dp[n] = grads[q];
      const acc_t gx = grads[q] * p.gain[n], gh = grads[q] * p.gain[G + n];
      sums[0] += gx;
      sums[1] += gx * x_hat[n];
      sums[2] += gh;
      sums[3] += gh * h_hat[n];
    }
  }
  acc_t means[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) means[k] = block_sum(sums[k], shared) / acc_t(G);
  for (int64_t l = threadIdx.x; l < H; l += kNormThreads) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t n = q * H + l;
      const acc_t gx = dp[n] * p.gain[n], gh = dp[n] * p.gain[G + n];
      p.d_input_proj[row * G + n] = static_cast<scalar_t>(rstd[0] * (gx - means[0] - x_hat[n] * means[1]));
      p.d_recurrent[row * G + n] = static_cast<scalar_t>(rstd[1] * (gh - means[2] - h_hat[n] * means[3]));
    }
  }
}

// ----------------------------------------------------------------------------------------------- GRU
template <typename scalar_t>
struct GruNormRowStep {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* gain;          // [6H]
  const acc_t* shift;         // [6H]
  const acc_t* b_ih;          // [3H] or null
  const acc_t* b_hh;          // [3H] or null
  const scalar_t* x_proj;     // [N, 3H]
  const acc_t* product;       // [B, 3H]: this step's h_{t-1} W_hh^T
  const scalar_t* h0;         // [B, H]
  scalar_t* output;           // [N, H]
  scalar_t* hy;               // [B, H]
  const acc_t* recurrent_mask;  // [B, H] or null
  scalar_t* masked_output;      // [N, H] or null
  acc_t* saved;               // [N, gru_norm_saved_width(H)] when saving, else null
  ZoneoutKeep<acc_t> keep;
  int64_t hidden;
  Step step;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kNormThreads) gru_norm_rows(const GruNormRowStep<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kNormThreads];
  const int64_t H = p.hidden, G = 3 * H, b = blockIdx.x, row = p.step.offset + b;
  const scalar_t* x = p.x_proj + row * G;
  const acc_t* h = p.product + b * G;
  const auto x_stats = block_norm_stats(x, G, shared);
  const auto h_stats = block_norm_stats(h, G, shared);
  acc_t* saved = p.saved ? p.saved + row * gru_norm_saved_width(H) : nullptr;
  const scalar_t* h_prev = previous_state(p.output, p.h0, b, p.step, H);
  for (int64_t l = threadIdx.x; l < H; l += kNormThreads) {
    acc_t gi[3], gh[3];
#pragma unroll
    for (int q = 0; q < 3; ++q) {
      const int64_t n = q * H + l;
      const acc_t xv = (static_cast<acc_t>(x[n]) - x_stats.mean) * x_stats.rstd;
      const acc_t hv = (h[n] - h_stats.mean) * h_stats.rstd;
      gi[q] = p.gain[n] * xv + p.shift[n] + (p.b_ih ? p.b_ih[n] : acc_t(0));
      gh[q] = p.gain[G + n] * hv + p.shift[G + n] + (p.b_hh ? p.b_hh[n] : acc_t(0));
      if (saved) {
        saved[4 * H + n] = xv;
        saved[7 * H + n] = hv;
      }
    }
    const auto a = gru_activate<acc_t>(gi[0], gi[1], gi[2], gh[0], gh[1], gh[2]);
    const acc_t previous = static_cast<acc_t>(h_prev[l]);
    acc_t hidden = gru_hidden(a, previous);
    if (p.keep.data) hidden = zoneout(p.keep.at(row, l), previous, hidden);
    p.output[row * H + l] = static_cast<scalar_t>(hidden);
    p.hy[b * H + l] = static_cast<scalar_t>(hidden);
    if (p.masked_output) p.masked_output[row * H + l] = static_cast<scalar_t>(hidden * p.recurrent_mask[b * H + l]);
    if (saved) {
      saved[l] = a.r;
      saved[H + l] = a.z;
      saved[2 * H + l] = a.n;
      saved[3 * H + l] = a.hn;
    }
  }
  if (saved && threadIdx.x == 0) {
    saved[10 * H] = x_stats.rstd;
    saved[10 * H + 1] = h_stats.rstd;
  }
}

template <typename scalar_t>
struct GruNormGradRowStep {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* gain;            // [6H]
  const acc_t* saved;           // [N, gru_norm_saved_width(H)]
  const scalar_t* output;       // [N, H]
  const scalar_t* h0;           // [B, H]
  const scalar_t* grad_output;  // [N, H]
  const acc_t* product;         // [B, H]: this step's d(h W_hh^T)_{t+1} @ W_hh
  acc_t* carry;                 // [B, H]: grad_hy, then the gradient reaching h_{t-1} outside the product
  acc_t* d_gates;               // [N, 4H]: dr, dz, dhn, dn
  scalar_t* d_input_proj;       // [N, 3H]
  scalar_t* d_recurrent;        // [N, 3H]
  ZoneoutKeep<acc_t> keep;
  const acc_t* recurrent_mask;  // [B, H] or null
  int64_t hidden;
  Step step;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kNormThreads) gru_norm_grad_rows(const GruNormGradRowStep<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kNormThreads];
  const int64_t H = p.hidden, G = 3 * H, b = blockIdx.x, row = p.step.offset + b;
  const acc_t* sv = p.saved + row * gru_norm_saved_width(H);
  const acc_t* x_hat = sv + 4 * H;
  const acc_t* h_hat = sv + 7 * H;
  const scalar_t* h_prev = previous_state(p.output, p.h0, b, p.step, H);
  acc_t* dg = p.d_gates + row * 4 * H;
  acc_t sums[4] = {0, 0, 0, 0};  // input norm: sum g, sum g x^; recurrent norm: the same
  for (int64_t l = threadIdx.x; l < H; l += kNormThreads) {
    const acc_t through_w_hh = p.recurrent_mask ? p.product[b * H + l] * p.recurrent_mask[b * H + l]
                                                : p.product[b * H + l];
    const acc_t dh = through_w_hh + static_cast<acc_t>(p.grad_output[row * H + l]) + p.carry[b * H + l];
    const acc_t k = p.keep.data ? p.keep.at(row, l) : acc_t(0);
    const GruGates<acc_t> a{sv[l], sv[H + l], sv[2 * H + l], sv[3 * H + l]};
    GruGateGrads<acc_t> di, dhid;
    p.carry[b * H + l] = gru_backward(a, static_cast<acc_t>(h_prev[l]), (acc_t(1) - k) * dh, di, dhid) + k * dh;
    dg[l] = di.r;
    dg[H + l] = di.z;
    dg[2 * H + l] = dhid.n;
    dg[3 * H + l] = di.n;
    const acc_t input_side[3] = {di.r, di.z, di.n}, hidden_side[3] = {dhid.r, dhid.z, dhid.n};
#pragma unroll
    for (int q = 0; q < 3; ++q) {
      const int64_t n = q * H + l;
      const acc_t gx = input_side[q] * p.gain[n], gh = hidden_side[q] * p.gain[G + n];
      sums[0] += gx;
      sums[1] += gx * x_hat[n];
      sums[2] += gh;
      sums[3] += gh * h_hat[n];
    }
  }
  acc_t means[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) means[k] = block_sum(sums[k], shared) / acc_t(G);
  for (int64_t l = threadIdx.x; l < H; l += kNormThreads) {
    const acc_t input_side[3] = {dg[l], dg[H + l], dg[3 * H + l]}, hidden_side[3] = {dg[l], dg[H + l], dg[2 * H + l]};
#pragma unroll
    for (int q = 0; q < 3; ++q) {
      const int64_t n = q * H + l;
      const acc_t gx = input_side[q] * p.gain[n], gh = hidden_side[q] * p.gain[G + n];
      p.d_input_proj[row * G + n] = static_cast<scalar_t>(sv[10 * H] * (gx - means[0] - x_hat[n] * means[1]));
      p.d_recurrent[row * G + n] = static_cast<scalar_t>(sv[10 * H + 1] * (gh - means[2] - h_hat[n] * means[3]));
    }
  }
}

// ----------------------------------------------------------------------------------------- host loops
// The recurrent state's pointers every forward product reads (recurrent dropout: the masked copies).
template <typename scalar_t>
NormProductStep<scalar_t> product_step(const Tensor& w_tiles, const Tensor& output2d, const Tensor& h0,
                                       const Tensor& masked_output, const Tensor& masked_h0, Tensor& product,
                                       int64_t hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool dropout = masked_output.defined();
  return {w_tiles.const_data_ptr<scalar_t>(),
          output2d.const_data_ptr<scalar_t>(),
          h0.const_data_ptr<scalar_t>(),
          dropout ? masked_output.const_data_ptr<scalar_t>() : nullptr,
          dropout ? masked_h0.const_data_ptr<scalar_t>() : nullptr,
          product.data_ptr<acc_t>(),
          hidden,
          Step{}};
}

// The forward time loop of either cell: per step the product launch, then the row launch.
template <typename scalar_t, typename ChooseProduct, typename Rows>
void forward_steps(const std::vector<Step>& schedule, int64_t hidden, NormProductStep<scalar_t> products,
                   const ChooseProduct& product_kernel, Rows rows, void (*row_kernel)(Rows)) {
  for (const Step& step : schedule) {
    products.step = rows.step = step;
    launch_step(step.rows, hidden, product_kernel, products);
    launch_rows(step.rows, row_kernel, rows);
  }
}

// The backward time loop of either cell, in reverse: per step the product of the next step's d_recurrent rows
// (G*H wide) with W_hh, then the row launch.
template <typename scalar_t, typename ChooseProduct, typename Rows>
void backward_steps(const std::vector<Step>& schedule, int64_t hidden, int64_t gates, const Tensor& d_recurrent,
                    NormBackwardProductStep<scalar_t> later, const ChooseProduct& product_kernel, Rows rows,
                    void (*row_kernel)(Rows)) {
  for (size_t k = schedule.size(); k-- > 0;) {
    const Step& step = schedule[k];
    const LaterStep next = later_step(schedule, k);
    later.later_grads = d_recurrent.const_data_ptr<scalar_t>() + next.offset * gates * hidden;
    later.later_rows = next.rows;
    later.rows = step.rows;
    rows.step = step;
    launch_step(step.rows, hidden, product_kernel, later);
    launch_rows(step.rows, row_kernel, rows);
  }
}

// The masked copies the forward products read with recurrent dropout (undefined without).
std::array<Tensor, 2> masked_states(const Tensor& output2d, const Tensor& h0, const OptTensor& recurrent_mask) {
  if (!recurrent_mask) return {};
  return {at::empty_like(output2d), (h0 * *recurrent_mask).to(h0.scalar_type())};
}

}  // namespace

// ---------------------------------------------------------------------------------------------- LSTM
LstmForwardResult lstm_norm_forward_cuda(const Tensor& input_, const OptTensor& batch_sizes, const Tensor& hx_,
                                         const Tensor& cx_, const Tensor& w_ih_, const Tensor& w_hh_,
                                         const OptTensor& b_ih_, const OptTensor& b_hh_, const Tensor& layer_norm_,
                                         bool reverse, bool save, const OptTensor& zoneout,
                                         const OptTensor& zoneout_cell, const OptTensor& recurrent_mask_,
                                         int64_t saved_rows) {
  constexpr const char* op = "gatedrnn::lstm_forward";
  const LayerShape s = check_lstm_norm_forward(op, input_, batch_sizes, hx_, cx_, w_ih_, w_hh_, b_ih_, b_hh_, zoneout,
                                               zoneout_cell, recurrent_mask_, layer_norm_);
  const auto recurrent_mask = contiguous_or_none(recurrent_mask_);
  check_cuda_layer(op, input_, s.hidden);
  const DeviceGuard guard(input_.device());
  const auto [input, w_ih, w_hh, h0, no_projection, dtype, acc_dtype] =
      contiguous_inputs(input_, w_ih_, w_hh_, hx_, std::nullopt);
  const auto acc_options = input.options().dtype(acc_dtype);
  const int64_t H = s.hidden, G = 4 * H;
  auto gates = saved_rows_tensor(save, s.rows, saved_rows, G, acc_options);
  auto cells = saved_rows_tensor(save, s.rows, saved_rows, lstm_norm_cells_width(H), acc_options);
  const auto x_proj = at::mm(input.view({s.rows, s.input_size}), w_ih.t());
  const auto norm = layer_norm_.to(acc_dtype).contiguous();
  const OptTensor bias = b_ih_.has_value() ? OptTensor((b_ih_->to(acc_dtype) + b_hh_->to(acc_dtype)).contiguous())
                                           : std::nullopt;
  auto output2d = at::empty({s.rows, H}, input.options());
  auto hy = h0.clone();
  auto c_state = cx_.to(acc_dtype, false, true).contiguous();
  auto product = at::empty({s.batch, G}, acc_options);
  auto candidate = at::empty({s.batch, H}, acc_options);
  auto gate_rows = save ? gates : at::empty({s.batch, G}, acc_options);
  auto [masked_output, masked_h0] = masked_states(output2d, h0, recurrent_mask);
  const auto w_tiles = forward_weight_tiles(w_hh, 4, H);

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gatedrnn_lstm_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto products = product_step<scalar_t>(w_tiles, output2d, h0, masked_output, masked_h0, product, H);
    LstmNormRowStep<scalar_t> rows{norm.const_data_ptr<acc_t>(),
                                   norm.const_data_ptr<acc_t>() + lstm_norm_columns(H),
                                   data_or_null<acc_t>(bias),
                                   x_proj.const_data_ptr<scalar_t>(),
                                   product.const_data_ptr<acc_t>(),
                                   h0.const_data_ptr<scalar_t>(),
                                   output2d.data_ptr<scalar_t>(),
                                   hy.data_ptr<scalar_t>(),
                                   data_or_null<acc_t>(recurrent_mask),
                                   recurrent_mask ? masked_output.data_ptr<scalar_t>() : nullptr,
                                   c_state.data_ptr<acc_t>(),
                                   candidate.data_ptr<acc_t>(),
                                   gate_rows.data_ptr<acc_t>(),
                                   save ? cells.data_ptr<acc_t>() : nullptr,
                                   zoneout_keep<acc_t>(zoneout),
                                   zoneout_keep<acc_t>(zoneout_cell),
                                   H,
                                   Step{}};
    forward_steps(schedule, H, products, lstm_norm_product_step_instance<scalar_t>, rows, lstm_norm_rows<scalar_t>);
  });
  auto output_shape = input_.sizes().vec();
  output_shape.back() = H;
  return {output2d.view(output_shape), hy, c_state.to(dtype), gates, cells};
}

LstmBackwardResult lstm_norm_backward_cuda(const Tensor& grad_output_, const Tensor& grad_hy_,
                                           const Tensor& grad_cy_, const Tensor& input_,
                                           const OptTensor& batch_sizes, const Tensor& hx_, const Tensor& cx_,
                                           const Tensor& w_ih_, const Tensor& w_hh_, const Tensor& layer_norm_,
                                           const Tensor& output_, const Tensor& gates_, const Tensor& cells_,
                                           bool reverse, std::array<bool, 3> output_mask, const OptTensor& zoneout,
                                           const OptTensor& zoneout_cell, const OptTensor& recurrent_mask_) {
  constexpr const char* op = "gatedrnn::lstm_backward";
  const LayerShape s = check_lstm_norm_backward(op, grad_output_, grad_hy_, grad_cy_, input_, batch_sizes, hx_, cx_,
                                                w_ih_, w_hh_, output_, gates_, cells_, zoneout, zoneout_cell,
                                                recurrent_mask_, layer_norm_);
  const int64_t width = lstm_norm_cells_width(s.hidden);
  const auto recurrent_mask = contiguous_or_none(recurrent_mask_);
  check_cuda_layer(op, input_, s.hidden);
  const DeviceGuard guard(input_.device());
  const auto [input, w_ih, w_hh, hx, no_projection, dtype, acc_dtype] =
      contiguous_inputs(input_, w_ih_, w_hh_, hx_, std::nullopt);
  const auto acc_options = input.options().dtype(acc_dtype);
  const int64_t H = s.hidden, G = 4 * H;
  const auto norm = layer_norm_.to(acc_dtype).contiguous();
  const auto cx = cx_.to(acc_dtype).contiguous();
  const auto grad_out2d = grad_output_.to(dtype).contiguous().view({s.rows, H});
  const auto output2d = output_.contiguous().view({s.rows, H});
  const auto gates = gates_.contiguous().view({s.rows, G});
  const auto cells = cells_.contiguous().view({s.rows, width});
  auto carry = grad_hy_.to(acc_dtype, false, true).contiguous();
  auto dc_state = grad_cy_.to(acc_dtype, false, true).contiguous();
  auto d_pre = at::empty({s.rows, G}, acc_options);
  auto d_cell_norm = at::empty({s.rows, H}, acc_options);
  auto d_input_proj = at::empty({s.rows, G}, input.options());
  auto d_recurrent = at::empty({s.rows, G}, input.options());
  auto product = at::empty({s.batch, H}, acc_options);
  const auto w_tiles = backward_weight_tiles(w_hh);

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gatedrnn_lstm_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    NormBackwardProductStep<scalar_t> later{w_tiles.const_data_ptr<scalar_t>(), nullptr, 0,
                                            product.data_ptr<acc_t>(), H, 0};
    LstmNormGradRowStep<scalar_t> rows{norm.const_data_ptr<acc_t>(),
                                       norm.const_data_ptr<acc_t>() + lstm_norm_columns(H),
                                       gates.const_data_ptr<acc_t>(),
                                       cells.const_data_ptr<acc_t>(),
                                       cx.const_data_ptr<acc_t>(),
                                       grad_out2d.const_data_ptr<scalar_t>(),
                                       product.const_data_ptr<acc_t>(),
                                       carry.data_ptr<acc_t>(),
                                       dc_state.data_ptr<acc_t>(),
                                       d_pre.data_ptr<acc_t>(),
                                       d_cell_norm.data_ptr<acc_t>(),
                                       d_input_proj.data_ptr<scalar_t>(),
                                       d_recurrent.data_ptr<scalar_t>(),
                                       zoneout_keep<acc_t>(zoneout),
                                       zoneout_keep<acc_t>(zoneout_cell),
                                       data_or_null<acc_t>(recurrent_mask),
                                       H,
                                       Step{}};
    backward_steps(schedule, H, 4, d_recurrent, later, lstm_norm_backward_product_step_instance<scalar_t>, rows,
                   lstm_norm_grad_rows<scalar_t>);
  });
  // The carry holds each row's zoneout part of dh0 (zero without zoneout); h0 reaches the rows' first steps
  // through W_hh.
  add_initial_state_grad(carry, d_recurrent, w_hh, schedule, recurrent_mask);

  const auto x2d = input.view({s.rows, s.input_size});
  const auto g = norm_product_grads(x2d, w_ih, output2d, hx, recurrent_mask, batch_sizes, schedule, reverse,
                                    output_mask, input_, d_input_proj, d_recurrent);
  // Both norms' outputs and both biases get d_pre: the input norm's bias gradient is the biases' too.
  const auto d_norm = norm_param_grads(lstm_norm_grad_parts(cells, d_pre, d_cell_norm), lstm_norm_columns(H));
  const auto d_bias =
      output_mask[2] ? d_norm[1].narrow(0, 0, G).to(dtype, false, true) : at::empty({0}, input_.options());
  return {g.input, carry.to(dtype), dc_state.to(dtype), g.w_ih, g.w_hh, d_bias, d_norm.to(dtype)};
}

// ----------------------------------------------------------------------------------------------- GRU
GruForwardResult gru_norm_forward_cuda(const Tensor& input_, const OptTensor& batch_sizes, const Tensor& hx_,
                                       const Tensor& w_ih_, const Tensor& w_hh_, const OptTensor& b_ih_,
                                       const OptTensor& b_hh_, bool reverse, bool save, const OptTensor& zoneout,
                                       const OptTensor& recurrent_mask_, int64_t saved_rows,
                                       const Tensor& layer_norm_) {
  constexpr const char* op = "gatedrnn::gru_forward";
  const LayerShape s = check_gru_norm_forward(op, input_, batch_sizes, hx_, w_ih_, w_hh_, b_ih_, b_hh_, zoneout,
                                              recurrent_mask_, layer_norm_);
  const auto recurrent_mask = contiguous_or_none(recurrent_mask_);
  check_cuda_layer(op, input_, s.hidden);
  const DeviceGuard guard(input_.device());
  const auto [input, w_ih, w_hh, h0, no_projection, dtype, acc_dtype] =
      contiguous_inputs(input_, w_ih_, w_hh_, hx_, std::nullopt);
  const auto acc_options = input.options().dtype(acc_dtype);
  const int64_t H = s.hidden, G = 3 * H;
  auto saved = saved_rows_tensor(save, s.rows, saved_rows, gru_norm_saved_width(H), acc_options);
  const auto x_proj = at::mm(input.view({s.rows, s.input_size}), w_ih.t());
  const auto norm = layer_norm_.to(acc_dtype).contiguous();
  const auto b_ih = b_ih_ ? OptTensor(b_ih_->to(acc_dtype).contiguous()) : std::nullopt;
  const auto b_hh = b_hh_ ? OptTensor(b_hh_->to(acc_dtype).contiguous()) : std::nullopt;
  auto output2d = at::empty({s.rows, H}, input.options());
  auto hy = h0.clone();
  auto product = at::empty({s.batch, G}, acc_options);
  auto [masked_output, masked_h0] = masked_states(output2d, h0, recurrent_mask);
  const auto w_tiles = forward_weight_tiles(w_hh, 3, H);

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gatedrnn_gru_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto products = product_step<scalar_t>(w_tiles, output2d, h0, masked_output, masked_h0, product, H);
    GruNormRowStep<scalar_t> rows{norm.const_data_ptr<acc_t>(),
                                  norm.const_data_ptr<acc_t>() + gru_norm_columns(H),
                                  data_or_null<acc_t>(b_ih),
                                  data_or_null<acc_t>(b_hh),
                                  x_proj.const_data_ptr<scalar_t>(),
                                  product.const_data_ptr<acc_t>(),
                                  h0.const_data_ptr<scalar_t>(),
                                  output2d.data_ptr<scalar_t>(),
                                  hy.data_ptr<scalar_t>(),
                                  data_or_null<acc_t>(recurrent_mask),
                                  recurrent_mask ? masked_output.data_ptr<scalar_t>() : nullptr,
                                  save ? saved.data_ptr<acc_t>() : nullptr,
                                  zoneout_keep<acc_t>(zoneout),
                                  H,
                                  Step{}};
    forward_steps(schedule, H, products, gru_norm_product_step_instance<scalar_t>, rows, gru_norm_rows<scalar_t>);
  });
  auto output_shape = input_.sizes().vec();
  output_shape.back() = H;
  return {output2d.view(output_shape), hy, saved};
}

GruNormBackwardResult gru_norm_backward_cuda(const Tensor& grad_output_, const Tensor& grad_hy_, const Tensor& input_,
                                             const OptTensor& batch_sizes, const Tensor& hx_, const Tensor& w_ih_,
                                             const Tensor& w_hh_, const Tensor& output_, const Tensor& saved_,
                                             bool reverse, std::array<bool, 3> output_mask,
                                             const OptTensor& zoneout, const OptTensor& recurrent_mask_,
                                             const Tensor& layer_norm_) {
  constexpr const char* op = "gatedrnn::gru_backward";
  const LayerShape s = check_gru_norm_backward(op, grad_output_, grad_hy_, input_, batch_sizes, hx_, w_ih_, w_hh_,
                                               output_, saved_, zoneout, recurrent_mask_, layer_norm_);
  const int64_t width = gru_norm_saved_width(s.hidden);
  const auto recurrent_mask = contiguous_or_none(recurrent_mask_);
  check_cuda_layer(op, input_, s.hidden);
  const DeviceGuard guard(input_.device());
  const auto [input, w_ih, w_hh, hx, no_projection, dtype, acc_dtype] =
      contiguous_inputs(input_, w_ih_, w_hh_, hx_, std::nullopt);
  const auto acc_options = input.options().dtype(acc_dtype);
  const int64_t H = s.hidden, G = 3 * H;
  const auto norm = layer_norm_.to(acc_dtype).contiguous();
  const auto grad_out2d = grad_output_.to(dtype).contiguous().view({s.rows, H});
  const auto output2d = output_.contiguous().view({s.rows, H});
  const auto saved = saved_.contiguous().view({s.rows, width});
  auto carry = grad_hy_.to(acc_dtype, false, true).contiguous();
  auto d_gates = at::empty({s.rows, 4 * H}, acc_options);
  auto d_input_proj = at::empty({s.rows, G}, input.options());
  auto d_recurrent = at::empty({s.rows, G}, input.options());
  auto product = at::empty({s.batch, H}, acc_options);
  const auto w_tiles = backward_weight_tiles(w_hh);

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gatedrnn_gru_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    NormBackwardProductStep<scalar_t> later{w_tiles.const_data_ptr<scalar_t>(), nullptr, 0,
                                            product.data_ptr<acc_t>(), H, 0};
    GruNormGradRowStep<scalar_t> rows{norm.const_data_ptr<acc_t>(),
                                      saved.const_data_ptr<acc_t>(),
                                      output2d.const_data_ptr<scalar_t>(),
                                      hx.const_data_ptr<scalar_t>(),
                                      grad_out2d.const_data_ptr<scalar_t>(),
                                      product.const_data_ptr<acc_t>(),
                                      carry.data_ptr<acc_t>(),
                                      d_gates.data_ptr<acc_t>(),
                                      d_input_proj.data_ptr<scalar_t>(),
                                      d_recurrent.data_ptr<scalar_t>(),
                                      zoneout_keep<acc_t>(zoneout),
                                      data_or_null<acc_t>(recurrent_mask),
                                      H,
                                      Step{}};
    backward_steps(schedule, H, 3, d_recurrent, later, gru_norm_backward_product_step_instance<scalar_t>, rows,
                   gru_norm_grad_rows<scalar_t>);
  });
  add_initial_state_grad(carry, d_recurrent, w_hh, schedule, recurrent_mask);

  const auto x2d = input.view({s.rows, s.input_size});
  const auto g = norm_product_grads(x2d, w_ih, output2d, hx, recurrent_mask, batch_sizes, schedule, reverse,
                                    output_mask, input_, d_input_proj, d_recurrent);
  // The norms' biases add to b_ih and b_hh exactly, so theirs are the same gradients.
  const auto d_norm = norm_param_grads(gru_norm_grad_parts(saved, d_gates), gru_norm_columns(H));
  const bool want_bias = output_mask[2];
  return {g.input,
          carry.to(dtype),
          g.w_ih,
          g.w_hh,
          want_bias ? d_norm[1].narrow(0, 0, G).to(dtype, false, true) : at::empty({0}, input_.options()),
          want_bias ? d_norm[1].narrow(0, G, G).to(dtype, false, true) : at::empty({0}, input_.options()),
          d_norm.to(dtype)};
}

}  // namespace gatedrnn::cuda
