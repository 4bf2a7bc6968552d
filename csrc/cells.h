// Pointwise cell math shared by the CPU loops and the CUDA kernels.
//
// Everything here is per hidden unit and per batch row: the matmuls happen elsewhere. `acc_t` is the
// accumulation type (float for float/half/bfloat16 storage, double for double). Gate order matches
// torch.nn: LSTM (i, f, g, o), GRU (r, z, n).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GATEDRNN_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the CPU loops are compiled per instruction set (target_clones) and only vectorise when
// this math is inlined into them.
#define GATEDRNN_HD inline __attribute__((always_inline))
#else
#define GATEDRNN_HD inline
#endif

namespace gatedrnn {

// ---------------------------------------------------------------- exp and tanh
// The CPU's float path uses its own exp and tanh: branch-free code that the compiler vectorises inside
// the fused loops (libm's expf/tanhf are scalar calls and dominated the CPU step time). Accuracy: a few
// float ULP (exp: Cody-Waite reduction and a degree-7 Taylor polynomial on |r| <= ln2/2, error < 0.1 ULP
// before rounding; tanh: its Taylor series below |x| = 1/4, (1 - e^-2|x|) / (1 + e^-2|x|) above). NaN
// propagates. double, and CUDA device code, use the library functions.
namespace detail {

template <typename To, typename From>
GATEDRNN_HD To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

GATEDRNN_HD float cpu_exp(float in) {
  // Compute on a clamped argument that keeps 2^n a normal float (e^88.3 < FLT_MAX, e^-87.3 > FLT_MIN), then
  // overflow to inf and underflow to 0 where expf does: sigmoid(-inf) must be exactly 0, as in torch, so
  // that 0 * inf gives NaN in the GRU's r * (W_hn h) as it does there. A NaN fails every comparison.
  float x = in > 88.3f ? 88.3f : in;
  x = x < -87.3f ? -87.3f : x;
  // n = round(x / ln2), read from the low mantissa bits of t (no float->int conversion, so a NaN is no UB).
  const float shifter = 12582912.0f;  // 1.5 * 2^23
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const int32_t n_int = bit_cast<int32_t>(t) - bit_cast<int32_t>(shifter);
  // r = x - n ln2 in two parts; n * 0.693359375 is exact (the constant has 9 significant bits).
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 +
                                          r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
  const float result = p * bit_cast<float>((n_int + 127) << 23);
  const float overflowed = in > 88.7228394f ? INFINITY : result;
  return in < -103.972084f ? 0.0f : overflowed;
}

GATEDRNN_HD float cpu_tanh(float x) {
  const float ax = x < 0 ? -x : x;
  const float e = cpu_exp(-2.0f * ax);
  const float large = (1.0f - e) / (1.0f + e);
  const float x2 = ax * ax;
  const float small =
      ax * (1.0f +
            x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315 + x2 * (62.0f / 2835 + x2 * (-1382.0f / 155925))))));
  const float magnitude = ax < 0.25f ? small : large;
  return x < 0 ? -magnitude : magnitude;
}

}  // namespace detail

GATEDRNN_HD double exp_(double x) { return ::exp(x); }
GATEDRNN_HD double tanh_(double x) { return ::tanh(x); }

#ifdef __CUDA_ARCH__
#define GATEDRNN_DEVICE_OR_HOST(device, host) (device)
#else
#define GATEDRNN_DEVICE_OR_HOST(device, host) (host)
#endif

GATEDRNN_HD float exp_(float x) { return GATEDRNN_DEVICE_OR_HOST(::expf(x), detail::cpu_exp(x)); }
GATEDRNN_HD float tanh_(float x) { return GATEDRNN_DEVICE_OR_HOST(::tanhf(x), detail::cpu_tanh(x)); }

template <typename acc_t>
GATEDRNN_HD acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_(-x));
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

// The pre-activation gradients from dc_total, the whole gradient reaching c~ = f * c_{t-1} + i * g, and
// d_o, the gradient reaching the post-activation o.
template <typename acc_t>
GATEDRNN_HD void lstm_gate_grads(const LstmGates<acc_t>& a, acc_t c_prev, acc_t dc_total, acc_t d_o,
                                 LstmGateGrads<acc_t>& d_pre) {
  d_pre.i = dc_total * a.g * a.i * (acc_t(1) - a.i);
  d_pre.f = dc_total * c_prev * a.f * (acc_t(1) - a.f);
  d_pre.g = dc_total * a.i * (acc_t(1) - a.g * a.g);
  d_pre.o = d_o * a.o * (acc_t(1) - a.o);
}

template <typename acc_t>
GATEDRNN_HD acc_t lstm_backward(const LstmGates<acc_t>& a, acc_t c, acc_t c_prev, acc_t dh, acc_t dc,
                                LstmGateGrads<acc_t>& d_pre) {
  const acc_t tc = tanh_(c);
  const acc_t dc_total = dc + dh * a.o * (acc_t(1) - tc * tc);
  lstm_gate_grads(a, c_prev, dc_total, dh * tc, d_pre);
  return dc_total * a.f;
}

// ---------------------------------------------------------------- zoneout
// Zoneout (Krueger et al. 2016): each unit of a state keeps its previous value with probability p, at every
// step. `keep` is that step's draw for the unit (0 or 1) in training, and p itself in evaluation, where the
// new value is the expectation. LSTM: c_t = zoneout(k_c, c_{t-1}, c~_t) and h_t = zoneout(k_h, h_{t-1},
// o * tanh(c~_t)), both from the cell's own update c~_t = f * c_{t-1} + i * g (the paper's equations); GRU:
// h_t = zoneout(k_h, h_{t-1}, h~_t). keep = 0 is the plain cell.
template <typename acc_t>
GATEDRNN_HD acc_t zoneout(acc_t keep, acc_t previous, acc_t updated) {
  return keep * previous + (acc_t(1) - keep) * updated;
}

// The keep values of one layer and direction: [N, state] with any strides (a stride of 0 broadcasts p in
// evaluation), or null for no zoneout.
template <typename acc_t>
struct ZoneoutKeep {
  const acc_t* data = nullptr;
  int64_t row_stride = 0, column_stride = 0;

  GATEDRNN_HD acc_t at(int64_t row, int64_t column) const {
    return data ? data[row * row_stride + column * column_stride] : acc_t(0);
  }
};

// ---------------------------------------------------------------- GRU
// Saved for backward per hidden unit: r, z, n and hn = (W_hn h + b_hn), the recurrent part of n's input.
template <typename acc_t>
struct GruGates {
  acc_t r, z, n, hn;
};

// gi_*: input projection incl. b_ih; gh_*: recurrent projection incl. b_hh.
template <typename acc_t>
GATEDRNN_HD GruGates<acc_t> gru_activate(acc_t gi_r, acc_t gi_z, acc_t gi_n, acc_t gh_r, acc_t gh_z, acc_t gh_n) {
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

// ---------------------------------------------------------------- GRU, reset before the product
// reset_after=False (Cho et al. 2014; Keras' reset_after=False, ONNX's linear_before_reset=0): the reset gate
// multiplies h_{t-1} before W_hn, so a step has two dependent products:
//   [r, z] = sigmoid(W_i[rz] x + b_i[rz] + W_h[rz] h_{t-1} + b_h[rz])       (the first, over W_hh's r and z rows)
//   n      = tanh(W_in x + b_in + W_hn (r * h_{t-1}) + b_hn)                  (the second, over W_hn)
//   h_t    = (1 - z) * n + z * h_{t-1}
// With recurrent dropout both products read h_{t-1} * mask (the second r * h_{t-1} * mask, as Keras does).
// Saved for backward per hidden unit: r, z, n and rh = r * h_{t-1} as the second product read it (the operand
// of W_hn's gradient).
//
// Backward, in the same two phases, reversed. The first gets dh (the output's gradient, the carry and the
// [dr, dz] of the next step through W_h[rz]) and gives dz, dn and the direct part dh * z reaching h_{t-1};
// the second gets d(rh) = dn @ W_hn and gives dr and the part d(rh) * r reaching h_{t-1} (times the mask).
template <typename acc_t>
GATEDRNN_HD acc_t gru_reset_before_candidate(acc_t gi_n, acc_t gh_n) {
  return tanh_(gi_n + gh_n);  // gh_n = W_hn (r * h_{t-1}) + b_hn
}

template <typename acc_t>
struct GruUpdateGrads {
  acc_t z, n;
};

// Phase one of the backward: the pre-activation gradients of z and n from dh, the gradient reaching h_t.
// Returns the direct part of the gradient reaching h_{t-1} (z * dh).
template <typename acc_t>
GATEDRNN_HD acc_t gru_reset_before_update_backward(acc_t z, acc_t n, acc_t h_prev, acc_t dh, GruUpdateGrads<acc_t>& d) {
  d.n = dh * (acc_t(1) - z) * (acc_t(1) - n * n);
  d.z = dh * (h_prev - n) * z * (acc_t(1) - z);
  return dh * z;
}

// Phase two: r's pre-activation gradient from d(rh) = dn @ W_hn, h_read being h_{t-1} as the product read it
// (times the recurrent mask, if any). The gradient reaching h_read is d(rh) * r.
template <typename acc_t>
GATEDRNN_HD acc_t gru_reset_before_reset_backward(acc_t r, acc_t h_read, acc_t d_rh) {
  return d_rh * h_read * r * (acc_t(1) - r);
}

}  // namespace gatedrnn
