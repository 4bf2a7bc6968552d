// Pointwise cell math shared by the CPU loops and the CUDA kernels.
//
// Everything here is per hidden unit and per batch row: the matmuls happen elsewhere. `acc_t` is the
// accumulation type (float for float/half/bfloat16 storage, double for double). Gate order matches
// torch.nn: LSTM (i, f, g, o), GRU (r, z, n).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GATEDRNN_HD __host__ __device__ __forceinline__
#else
#define GATEDRNN_HD inline
#endif

namespace gatedrnn {

template <typename acc_t>
GATEDRNN_HD acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

template <typename acc_t>
GATEDRNN_HD acc_t tanh_(acc_t x) {
  return std::tanh(x);
}

// ---------------------------------------------------------------- LSTM
// Post-activation gates of one hidden unit: the only thing (with c_t) saved for backward.
template <typename acc_t>
struct LstmGates {
  acc_t i, f, g, o;
};

// Forward: pre-activations (input projection + recurrent projection + both biases) -> gates; then
// c_t = f * c_{t-1} + i * g and the (pre-projection) hidden value o * tanh(c_t).
template <typename acc_t>
GATEDRNN_HD LstmGates<acc_t> lstm_activate(acc_t pre_i, acc_t pre_f, acc_t pre_g, acc_t pre_o) {
  return {sigmoid(pre_i), sigmoid(pre_f), tanh_(pre_g), sigmoid(pre_o)};
}

template <typename acc_t>
GATEDRNN_HD acc_t lstm_cell_state(const LstmGates<acc_t>& a, acc_t c_prev) {
  return a.f * c_prev + a.i * a.g;
}

template <typename acc_t>
GATEDRNN_HD acc_t lstm_hidden(const LstmGates<acc_t>& a, acc_t c) {
  return a.o * tanh_(c);
}

template <typename acc_t>
struct LstmGateGrads {
  acc_t i, f, g, o;
};

// Backward of one LSTM step for one hidden unit.
// dh: gradient reaching h_t (pre-projection), dc: gradient reaching c_t from step t+1 (or cy).
// Writes the pre-activation gradients and returns the gradient reaching c_{t-1}.

template <typename acc_t>
GATEDRNN_HD acc_t lstm_backward(const LstmGates<acc_t>& a, acc_t c, acc_t c_prev, acc_t dh, acc_t dc,
                                LstmGateGrads<acc_t>& d_pre) {
  const acc_t tc = tanh_(c);
  const acc_t dc_total = dc + dh * a.o * (acc_t(1) - tc * tc);
  d_pre.i = dc_total * a.g * a.i * (acc_t(1) - a.i);
  d_pre.f = dc_total * c_prev * a.f * (acc_t(1) - a.f);
  d_pre.g = dc_total * a.i * (acc_t(1) - a.g * a.g);
  d_pre.o = dh * tc * a.o * (acc_t(1) - a.o);
  return dc_total * a.f;
}

// ---------------------------------------------------------------- GRU
// Saved for backward per hidden unit: r, z, n and hn = (W_hn h + b_hn), the recurrent part of n's input.
template <typename acc_t>
struct GruGates {
  acc_t r, z, n, hn;
};

// gi_*: input projection incl. b_ih; gh_*: recurrent projection incl. b_hh.
template <typename acc_t>
GATEDRNN_HD GruGates<acc_t> gru_activate(acc_t gi_r, acc_t gi_z, acc_t gi_n, acc_t gh_r, acc_t gh_z,
                                         acc_t gh_n) {
  const acc_t r = sigmoid(gi_r + gh_r);
  const acc_t z = sigmoid(gi_z + gh_z);
  const acc_t n = tanh_(gi_n + r * gh_n);
  return {r, z, n, gh_n};
}

template <typename acc_t>
GATEDRNN_HD acc_t gru_hidden(const GruGates<acc_t>& a, acc_t h_prev) {
  return (acc_t(1) - a.z) * a.n + a.z * h_prev;
}

// Backward of one GRU step for one hidden unit. dh: gradient reaching h_t.
// d_input gets the gradients of the input-side pre-activations (r, z, n); d_hidden those of the
// recurrent-side ones (r, z, hn). Returns the direct part of the gradient reaching h_{t-1} (the part
// through W_hh is added by the caller's GEMM).
template <typename acc_t>
struct GruGateGrads {
  acc_t r, z, n;
};

template <typename acc_t>
GATEDRNN_HD acc_t gru_backward(const GruGates<acc_t>& a, acc_t h_prev, acc_t dh, GruGateGrads<acc_t>& d_input,
                               GruGateGrads<acc_t>& d_hidden) {
  const acc_t dn_pre = dh * (acc_t(1) - a.z) * (acc_t(1) - a.n * a.n);
  const acc_t dz_pre = dh * (h_prev - a.n) * a.z * (acc_t(1) - a.z);
  const acc_t dr_pre = dn_pre * a.hn * a.r * (acc_t(1) - a.r);
  d_input = {dr_pre, dz_pre, dn_pre};
  d_hidden = {dr_pre, dz_pre, dn_pre * a.r};
  return dh * a.z;
}

}  // namespace gatedrnn
