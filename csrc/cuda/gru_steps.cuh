// The parameters of the GRU's step kernels (gru.cu), which the reset_after=False kernels (gru_reset_before.cu)
// extend: one struct per direction, passed by value to every launch of a step; and the product both backward
// step kernels start with.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../cells.h"
#include "../sequence.h"
#include "step_tile.cuh"

namespace gatedrnn::cuda {

template <typename scalar_t>
struct GruForwardStep {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* w_tiles;  // forward_weight_tiles(W_hh): [tiles][H][3][32]
  const scalar_t* x_proj;   // [N, 3H]: x @ W_ih^T
  const acc_t* b_ih;        // [3H] or null
  const acc_t* b_hh;        // [3H] or null
  const scalar_t* h0;       // [B, H]
  scalar_t* output;         // [N, H]: h_t; the previous step's rows are this step's h_{t-1}
  scalar_t* hy;             // [B, H]
  acc_t* saved;             // [N, 4H]: r, z, n, hn, or null
  ZoneoutKeep<acc_t> keep;  // zoneout of h (cells.h), or none
  // Recurrent dropout: the product reads h_{t-1} * mask, which each step writes beside h_t; the cell itself
  // uses h_{t-1}. All null without it.
  const acc_t* recurrent_mask;  // [B, H]: 0 or 1 / (1 - p), one per sequence and unit
  scalar_t* masked_output;      // [N, H]
  const scalar_t* masked_h0;    // [B, H]
  int64_t hidden;
  Step step;  // this step's rows (sequence.h)
};

template <typename scalar_t>
struct GruBackwardStep {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* w_tiles;      // backward_weight_tiles(W_hh): [tiles][3H][32]
  const scalar_t* later_grads;  // d_gates rows of the step processed after this one (its row b: + b * 4H)
  int64_t later_rows;           // rows of this step that fed that later step
  const scalar_t* grad_output;  // [N, H]
  acc_t* carry;                 // [B, H]: grad_hy, then each row's direct part dh_t * z_t for its earlier step
                                // (with zoneout: k dh_t + (1 - k) dh_t * z_t)
  const acc_t* saved;           // [N, 4H]: r, z, n, hn
  const scalar_t* output;       // [N, H]
  const scalar_t* h0;           // [B, H]
  scalar_t* d_gates;            // [N, 4H]: dr, dz, dhn, dn out
  ZoneoutKeep<acc_t> keep;      // zoneout of h (cells.h), or none
  const acc_t* recurrent_mask;  // [B, H] with recurrent dropout, or null
  int64_t hidden;
  Step step;  // this step's rows (sequence.h)
};

// acc = (the first K columns of the d_gates rows of the step processed after this one) @ p.w_tiles, for this
// block's rows that fed that step (zeros for the others, and for all rows after the last step): the gradient
// reaching h_t through the K rows of W_hh that read it. d_gates rows are 4H wide in both GRU forms. Every
// thread of the block must call this (it synchronises the block).
template <typename scalar_t, int RPT>
__device__ __forceinline__ void later_gradient_product(TileStorage<scalar_t, 1, RPT>& tile,
                                                       const GruBackwardStep<scalar_t>& p, int64_t K,
                                                       at::opmath_type<scalar_t> (&acc)[1][RPT]) {
  later_rows_product(tile, p.w_tiles, p.later_grads, p.later_rows, 4 * p.hidden, K, acc);
}

}  // namespace gatedrnn::cuda
