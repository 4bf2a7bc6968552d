// Layer normalisation of one row, as the layer_norm variant uses it (Ba et al. 2016, with Haste's placement):
// the input projection W_ih x_t and the recurrent product W_hh h_{t-1} are each normalised over all their
// gate columns, with a gain and a bias of their own, and the LSTM's c_t over its H units before the tanh
// that makes h_t (c_t itself is carried unnormalised). Per row of n values x:
//   x^ = (x - mean(x)) * rstd,   rstd = 1 / sqrt(var(x) + eps)   (biased variance, as torch's layer_norm)
//   y  = gain * x^ + bias
// and backward, from g = dL/dx^ = gain * dL/dy:
//   dL/dx = rstd * (g - mean(g) - x^ * mean(g * x^))
// The gain and bias gradients are sums over all rows, left to the ops' post-loop reductions.
//
// Row-serial code for one thread (the CPU's row passes); shared by the loops of both cells.
#pragma once

#include <cmath>
#include <cstdint>

#include "cells.h"

namespace gatedrnn {

// torch.nn.LayerNorm's default.
constexpr double kLayerNormEps = 1e-5;

// The layer_norm tensor of an op: [2, norms * H], the gains' row then the biases'; its columns are the input
// projection's norm (G*H), the recurrent product's (G*H) and, for the LSTM, the cell state's (H).
constexpr int64_t lstm_norm_columns(int64_t hidden) { return 9 * hidden; }
constexpr int64_t gru_norm_columns(int64_t hidden) { return 6 * hidden; }

// What a row saves for backward with layer_norm, in the saved tensor the plain cell already has:
//  - LSTM `cells`: c_t (H), then x^ of the input projection (4H), x^ of the recurrent product (4H), the cell
//    state's c^ (H), and the three rows' rstd;
//  - GRU `saved`: r, z, n, hn (4H), then the two products' x^ (3H each) and their rstd.
constexpr int64_t lstm_norm_cells_width(int64_t hidden) { return 10 * hidden + 3; }
constexpr int64_t gru_norm_saved_width(int64_t hidden) { return 10 * hidden + 2; }

template <typename T>
struct NormStats {
  T mean, rstd;
};

// Mean and reciprocal standard deviation of x[0, n), in two passes (the variance of values far from zero
// loses nothing to cancellation).
template <typename T>
GATEDRNN_HD NormStats<T> norm_stats(const T* x, int64_t n) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += x[j];
  const T mean = sum / T(n);
  T squares = 0;
  for (int64_t j = 0; j < n; ++j) squares += (x[j] - mean) * (x[j] - mean);
  return {mean, T(1) / std::sqrt(squares / T(n) + T(kLayerNormEps))};
}

// dx[0, n) from g = dL/dx^ and the row's x^ and rstd. dx may be g.
template <typename T>
GATEDRNN_HD void norm_backward(const T* g, const T* x_hat, T rstd, int64_t n, T* dx) {
  T sum_g = 0, sum_gx = 0;
  for (int64_t j = 0; j < n; ++j) {
    sum_g += g[j];
    sum_gx += g[j] * x_hat[j];
  }
  const T mean_g = sum_g / T(n), mean_gx = sum_gx / T(n);
  for (int64_t j = 0; j < n; ++j) dx[j] = rstd * (g[j] - mean_g - x_hat[j] * mean_gx);
}

}  // namespace gatedrnn
