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

// Sums over a row in kSumLanes independent partial sums: a loop the compiler vectorises without reassociating
// floating-point adds (`sum += x[j]` is one serial chain, four cycles an element). No lambdas here: a lambda's
// body is compiled for the baseline instruction set, not for the CPU loops' own (csrc/cpu/tiles.h).
constexpr int kSumLanes = 16;

template <typename T>
GATEDRNN_HD T finish_sum(const T (&part)[kSumLanes], T tail) {
  for (int l = 0; l < kSumLanes; ++l) tail += part[l];
  return tail;
}

// sum of x[j]
template <typename T>
GATEDRNN_HD T row_sum(const T* x, int64_t n) {
  T part[kSumLanes] = {};
  int64_t j = 0;
  for (; j + kSumLanes <= n; j += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) part[l] += x[j + l];
  T tail = 0;
  for (; j < n; ++j) tail += x[j];
  return finish_sum(part, tail);
}

// sum of (x[j] - mean)^2
template <typename T>
GATEDRNN_HD T row_squares(const T* x, T mean, int64_t n) {
  T part[kSumLanes] = {};
  int64_t j = 0;
  for (; j + kSumLanes <= n; j += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) part[l] += (x[j + l] - mean) * (x[j + l] - mean);
  T tail = 0;
  for (; j < n; ++j) tail += (x[j] - mean) * (x[j] - mean);
  return finish_sum(part, tail);
}

// sum of a[j] * b[j]
template <typename T>
GATEDRNN_HD T row_dot(const T* a, const T* b, int64_t n) {
  T part[kSumLanes] = {};
  int64_t j = 0;
  for (; j + kSumLanes <= n; j += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) part[l] += a[j + l] * b[j + l];
  T tail = 0;
  for (; j < n; ++j) tail += a[j] * b[j];
  return finish_sum(part, tail);
}

// Mean and reciprocal standard deviation of x[0, n), in two passes (the variance of values far from zero
// loses nothing to cancellation).
template <typename T>
GATEDRNN_HD NormStats<T> norm_stats(const T* x, int64_t n) {
  const T mean = row_sum(x, n) / T(n);
  return {mean, T(1) / std::sqrt(row_squares(x, mean, n) / T(n) + T(kLayerNormEps))};
}

// dx[0, n) from g = dL/dx^ and the row's x^ and rstd. dx may be g.
template <typename T>
GATEDRNN_HD void norm_backward(const T* g, const T* x_hat, T rstd, int64_t n, T* dx) {
  const T mean_g = row_sum(g, n) / T(n), mean_gx = row_dot(g, x_hat, n) / T(n);
  for (int64_t j = 0; j < n; ++j) dx[j] = rstd * (g[j] - mean_g - x_hat[j] * mean_gx);
}

}  // namespace gatedrnn
