// The row passes of the layer_norm cells on the CPU (layer_norm.cpp runs them): everything a step does after
// its recurrent product, for one batch row. A norm needs all of a row's gate columns before it can finish any
// of them, so here the product's tiles store the row and this pass, which owns the whole row, normalises the
// input projection and the product (layer_norm.h), runs the cell (cells.h) and, for the LSTM, normalises c_t
// before the tanh. Backward mirrors it: the row's cell derivative, then the norms' backward, whose result for
// the recurrent product is what the next backward product multiplies by W_hh.
//
// `gain` and `shift` are the layer_norm tensor's two rows (layer_norm.h); saved rows as layer_norm.h lays them
// out. `scratch` is the calling thread's own (row_scratch()).
#pragma once

#include <cstdint>

#include "../cells.h"
#include "../layer_norm.h"
#include "../sequence.h"
#include "loops.h"
#include "products.h"

namespace gatedrnn::cpu {

// Scratch per thread for one row pass: at most six rows of G gates and four of H units.
inline int64_t row_scratch(int64_t gates, int64_t hidden) { return (6 * gates + 4) * hidden; }

// The hot loops below are kept free of conditions so that they vectorise: what a row may or may not have
// (zoneout, a recurrent mask, biases, saving) is resolved outside them, into plain arrays or separate loops.

// x^ = (x - mean) * rstd into x_hat, then y = gain * x^ + shift.
template <typename T>
GATEDRNN_ALWAYS_INLINE void normalise_into(const T* x, int64_t n, NormStats<T> stats, const T* gain, const T* shift,
                                           T* x_hat, T* y) {
  GATEDRNN_IVDEP
  for (int64_t j = 0; j < n; ++j) x_hat[j] = (x[j] - stats.mean) * stats.rstd;
  GATEDRNN_IVDEP
  for (int64_t j = 0; j < n; ++j) y[j] = gain[j] * x_hat[j] + shift[j];
}

// dL/dx of one norm's columns of a row from dL/dy (scratch: n values).
template <typename T>
GATEDRNN_ALWAYS_INLINE void norm_grad(const T* d_y, const T* gain, const T* x_hat, T rstd, int64_t n, T* scratch,
                                      T* d_x) {
  GATEDRNN_IVDEP
  for (int64_t j = 0; j < n; ++j) scratch[j] = d_y[j] * gain[j];
  norm_backward(scratch, x_hat, rstd, n, d_x);
}

// The gradient reaching h_t of one row: the product (times the recurrent mask, through which the product read
// h_t), the output's gradient and the carry; the carry keeps zoneout's kept part k_h dh (keep: the row's keep
// values), and what is returned in dh is the rest, (1 - k_h) dh.
template <typename T>
GATEDRNN_ALWAYS_INLINE void hidden_grad(const T* product, const T* mask, const T* grad_output, const T* keep,
                                        int64_t n, T* carried, T* dh) {
  if (mask) {
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < n; ++l) dh[l] = product[l] * mask[l];
  } else {
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < n; ++l) dh[l] = product[l];
  }
  GATEDRNN_IVDEP
  for (int64_t l = 0; l < n; ++l) {
    const T d = dh[l] + grad_output[l] + carried[l];
    carried[l] = keep[l] * d;
    dh[l] = (T(1) - keep[l]) * d;
  }
}

// h_t * mask, what the next step's product reads with recurrent dropout.
template <typename T>
GATEDRNN_ALWAYS_INLINE void store_masked(const T* h, const T* mask, int64_t n, T* out) {
  if (!mask) return;
  GATEDRNN_IVDEP
  for (int64_t l = 0; l < n; ++l) out[l] = h[l] * mask[l];
}

// ---------------------------------------------------------------------------------------------- LSTM
// pre = LN(x W_ih^T) + LN(h W_hh^T) + b_ih + b_hh; i, f, g, o from pre; c~ = f c_{t-1} + i g;
// h~ = o tanh(LN(c~)); zoneout (cells.h) on both; the state carried is c_t, not its norm.
template <typename T>
struct LstmNormRows {
  const T* gain;   // [9H]
  const T* shift;  // [9H]
  const T* bias;   // [4H]: b_ih + b_hh (zeros without biases)
  RecurrentStates<T> states;
  T* input_proj;  // x W_ih^T of rows from the chunk's first on; with saving, the saved gates' rows (overwritten)
  int64_t proj_stride;
  const T* product;  // [B, 4H]: this step's h_{t-1} W_hh^T
  T* c_state;        // [B, H]
  T* h_state;        // [B, H]
  T* cells;          // [N, lstm_norm_cells_width(H)] when saving, else null
  ZoneoutKeep<T> keep_h, keep_c;
  const T* recurrent_mask;  // [B, H] or null
  int64_t hidden;

  using scalar = T;
  static constexpr bool kForward = true;

  GATEDRNN_ALWAYS_INLINE void forward_row(const Step& step, int64_t b, int64_t proj_row0, T* scratch) const {
    const int64_t H = hidden, G = 4 * H, row = step.offset + b;
    T* x = input_proj + (row - proj_row0) * proj_stride;
    const T* h = product + b * G;
    T* pre = scratch;              // [4H]: pre-activations, then the gates
    T* from_h = pre + G;           // [4H]: the recurrent product's norm
    T* candidate = from_h + G;     // [H]: c~
    T* kept_h = candidate + H;     // [H]: the row's zoneout keep values
    T* kept_c = kept_h + H;        // [H]
    // x^, h^ and c^ (4H, 4H, H): saved, or scratch
    T* saved = cells ? cells + row * lstm_norm_cells_width(H) : nullptr;
    T* x_hat = saved ? saved + H : kept_c + H;
    T* h_hat = x_hat + G;
    T* c_hat = h_hat + G;
    const auto x_stats = norm_stats(x, G), h_stats = norm_stats(h, G);
    normalise_into(x, G, x_stats, gain, shift, x_hat, pre);
    normalise_into(h, G, h_stats, gain + G, shift + G, h_hat, from_h);
    T* c = c_state + b * H;
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < H; ++l) {
      T p[4];
      for (int64_t q = 0; q < 4; ++q) p[q] = pre[q * H + l] + from_h[q * H + l] + bias[q * H + l];
      const auto a = lstm_activate(p[0], p[1], p[2], p[3]);
      store_gates(pre, H, l, a.i, a.f, a.g, a.o);
      candidate[l] = lstm_cell_state(a, c[l]);
    }
    const auto c_stats = norm_stats(candidate, H);
    load_keep(keep_h, row, 0, H, kept_h);
    load_keep(keep_c, row, 0, H, kept_c);
    const T* h_prev = states.prev_row(step, b);
    T* out = states.output + row * H;
    T* final_h = h_state + b * H;
    const T* gain_c = gain + 2 * G;
    const T* shift_c = shift + 2 * G;
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < H; ++l) {
      const T v = (candidate[l] - c_stats.mean) * c_stats.rstd;
      c_hat[l] = v;
      const T hidden_value = pre[3 * H + l] * tanh_(gain_c[l] * v + shift_c[l]);  // o tanh(LN(c~))
      const T updated = zoneout(kept_h[l], h_prev[l], hidden_value);
      out[l] = updated;
      final_h[l] = updated;
      c[l] = zoneout(kept_c[l], c[l], candidate[l]);
    }
    store_masked(out, recurrent_mask ? recurrent_mask + b * H : nullptr, H, states.masked_output + row * H);
    if (saved) {
      GATEDRNN_IVDEP
      for (int64_t j = 0; j < G; ++j) x[j] = pre[j];  // the gates, over the projection's row
      GATEDRNN_IVDEP
      for (int64_t l = 0; l < H; ++l) saved[l] = c[l];
      T* rstd = saved + lstm_norm_cells_width(H) - 3;
      rstd[0] = x_stats.rstd;
      rstd[1] = h_stats.rstd;
      rstd[2] = c_stats.rstd;
    }
  }
};

template <typename T>
struct LstmNormGradRows {
  const T* gain;   // [9H]
  const T* shift;  // [9H]
  const T* gates;  // [N, 4H]: saved i, f, g, o
  const T* cells;  // [N, lstm_norm_cells_width(H)]
  const T* c0;     // [B, H]
  const T* grad_output;  // [N, H]
  const T* product;      // [B, H]: this step's d(h W_hh^T)_{t+1} @ W_hh
  T* carry;              // [B, H]: grad_hy, then the gradient reaching h_{t-1} outside the product
  T* dc_state;           // [B, H]: the gradient reaching c_t in, c_{t-1} out
  T* d_pre;              // [N, 4H]: the pre-activation gradients
  T* d_input_proj;       // [N, 4H]: the gradient reaching x W_ih^T
  T* d_recurrent;        // [N, 4H]: the gradient reaching h_{t-1} W_hh^T
  T* d_cell_norm;        // [N, H]: the gradient reaching the cell norm's output
  ZoneoutKeep<T> keep_h, keep_c;
  const T* recurrent_mask;  // [B, H] or null
  int64_t hidden;

  using scalar = T;
  static constexpr bool kForward = false;

  GATEDRNN_ALWAYS_INLINE void backward_row(const Step& step, int64_t b, T* scratch) const {
    const int64_t H = hidden, G = 4 * H, row = step.offset + b, width = lstm_norm_cells_width(H);
    const T* a_row = gates + row * G;
    const T* saved = cells + row * width;
    const T* x_hat = saved + H;
    const T* h_hat = x_hat + G;
    const T* c_hat = h_hat + G;
    const T* rstd = saved + width - 3;
    const T* c_prev = b < step.prev_rows ? cells + (step.prev_offset + b) * width : c0 + b * H;
    T* dc = dc_state + b * H;
    T* dp = d_pre + row * G;
    T* d_norm = d_cell_norm + row * H;
    T* spare = scratch;           // [4H]
    T* d_candidate = spare + G;   // [H]
    T* dh = d_candidate + H;      // [H]
    T* kept = dh + H;             // [H]: the row's keep values of h, then of c
    load_keep(keep_h, row, 0, H, kept);
    hidden_grad(product + b * H, recurrent_mask ? recurrent_mask + b * H : nullptr, grad_output + row * H, kept, H,
                carry + b * H, dh);
    const T* gain_c = gain + 2 * G;
    const T* shift_c = shift + 2 * G;
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < H; ++l) {
      const T o = a_row[3 * H + l], t = tanh_(gain_c[l] * c_hat[l] + shift_c[l]);
      d_norm[l] = dh[l] * o * (T(1) - t * t);
      dp[3 * H + l] = dh[l] * t;  // the gradient reaching o, until the gate gradients replace it
    }
    norm_grad(d_norm, gain_c, c_hat, rstd[2], H, spare, d_candidate);
    load_keep(keep_c, row, 0, H, kept);
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < H; ++l) {
      const LstmGates<T> a{a_row[l], a_row[H + l], a_row[2 * H + l], a_row[3 * H + l]};
      const T d_total = d_candidate[l] + (T(1) - kept[l]) * dc[l];
      LstmGateGrads<T> d;
      lstm_gate_grads(a, c_prev[l], d_total, dp[3 * H + l], d);
      dc[l] = d_total * a.f + kept[l] * dc[l];
      store_gates(dp, H, l, d.i, d.f, d.g, d.o);
    }
    norm_grad(dp, gain, x_hat, rstd[0], G, spare, d_input_proj + row * G);
    norm_grad(dp, gain + G, h_hat, rstd[1], G, spare, d_recurrent + row * G);
  }
};

// ----------------------------------------------------------------------------------------------- GRU
// gi = LN(x W_ih^T) + b_ih, gh = LN(h W_hh^T) + b_hh, then torch.nn's cell (reset after the product).
template <typename T>
struct GruNormRows {
  const T* gain;   // [6H]
  const T* shift;  // [6H]
  const T* b_ih;   // [3H] (zeros without biases)
  const T* b_hh;   // [3H] (zeros without biases)
  RecurrentStates<T> states;
  T* input_proj;  // x W_ih^T of rows from the chunk's first on; with saving, the saved rows (overwritten)
  int64_t proj_stride;
  const T* product;  // [B, 3H]: this step's h_{t-1} W_hh^T
  T* h_state;        // [B, H]
  bool save;
  ZoneoutKeep<T> keep;
  const T* recurrent_mask;  // [B, H] or null
  int64_t hidden;

  using scalar = T;
  static constexpr bool kForward = true;

  GATEDRNN_ALWAYS_INLINE void forward_row(const Step& step, int64_t b, int64_t proj_row0, T* scratch) const {
    const int64_t H = hidden, G = 3 * H, row = step.offset + b;
    T* x = input_proj + (row - proj_row0) * proj_stride;
    const T* h = product + b * G;
    T* gi = scratch;        // [3H]
    T* gh = gi + G;         // [3H]
    T* kept = gh + G;       // [H]
    T* gates = kept + H;    // [4H]: r, z, n, hn
    T* x_hat = save ? x + 4 * H : gates + 4 * H;  // saved, or scratch
    T* h_hat = save ? x + 7 * H : x_hat + G;
    const auto x_stats = norm_stats(x, G), h_stats = norm_stats(h, G);
    normalise_into(x, G, x_stats, gain, shift, x_hat, gi);
    normalise_into(h, G, h_stats, gain + G, shift + G, h_hat, gh);
    load_keep(keep, row, 0, H, kept);
    const T* h_prev = states.prev_row(step, b);
    T* out = states.output + row * H;
    T* final_h = h_state + b * H;
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < H; ++l) {
      const auto a = gru_activate(gi[l] + b_ih[l], gi[H + l] + b_ih[H + l], gi[2 * H + l] + b_ih[2 * H + l],
                                  gh[l] + b_hh[l], gh[H + l] + b_hh[H + l], gh[2 * H + l] + b_hh[2 * H + l]);
      const T updated = zoneout(kept[l], h_prev[l], gru_hidden(a, h_prev[l]));
      out[l] = updated;
      final_h[l] = updated;
      store_gates(gates, H, l, a.r, a.z, a.n, a.hn);
    }
    store_masked(out, recurrent_mask ? recurrent_mask + b * H : nullptr, H, states.masked_output + row * H);
    if (save) {
      GATEDRNN_IVDEP
      for (int64_t j = 0; j < 4 * H; ++j) x[j] = gates[j];  // over the projection's row
      x[10 * H] = x_stats.rstd;
      x[10 * H + 1] = h_stats.rstd;
    }
  }
};

template <typename T>
struct GruNormGradRows {
  const T* gain;                    // [6H]
  const T* saved;                   // [N, gru_norm_saved_width(H)]
  RecurrentStates<const T> states;  // h_{t-1} of each row (unmasked)
  const T* grad_output;             // [N, H]
  const T* product;                 // [B, H]: this step's d(h W_hh^T)_{t+1} @ W_hh
  T* carry;                         // [B, H]: grad_hy, then the gradient reaching h_{t-1} outside the product
  T* d_gates;                       // [N, 4H]: dr, dz, dhn, dn (the biases' gradients)
  T* d_input_proj;                  // [N, 3H]
  T* d_recurrent;                   // [N, 3H]
  ZoneoutKeep<T> keep;
  const T* recurrent_mask;  // [B, H] or null
  int64_t hidden;

  using scalar = T;
  static constexpr bool kForward = false;

  GATEDRNN_ALWAYS_INLINE void backward_row(const Step& step, int64_t b, T* scratch) const {
    const int64_t H = hidden, G = 3 * H, row = step.offset + b;
    const T* sv = saved + row * gru_norm_saved_width(H);
    const T* h_prev = states.prev_row(step, b);
    T* carried = carry + b * H;
    T* dg = d_gates + row * 4 * H;
    T* d_in = scratch;       // [3H]: dr, dz, dn
    T* d_hid = d_in + G;     // [3H]: dr, dz, dhn
    T* spare = d_hid + G;    // [3H]
    T* dh = spare + G;       // [H]
    T* kept = dh + H;        // [H]
    load_keep(keep, row, 0, H, kept);
    hidden_grad(product + b * H, recurrent_mask ? recurrent_mask + b * H : nullptr, grad_output + row * H, kept, H,
                carried, dh);
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < H; ++l) {
      const GruGates<T> a{sv[l], sv[H + l], sv[2 * H + l], sv[3 * H + l]};
      GruGateGrads<T> di, dhid;
      carried[l] += gru_backward(a, h_prev[l], dh[l], di, dhid);  // the direct part, dh z
      store_gates(dg, H, l, di.r, di.z, dhid.n, di.n);
      d_in[l] = di.r;
      d_in[H + l] = di.z;
      d_in[2 * H + l] = di.n;
      d_hid[l] = dhid.r;
      d_hid[H + l] = dhid.z;
      d_hid[2 * H + l] = dhid.n;
    }
    norm_grad(d_in, gain, sv + 4 * H, sv[10 * H], G, spare, d_input_proj + row * G);
    norm_grad(d_hid, gain + G, sv + 7 * H, sv[10 * H + 1], G, spare, d_recurrent + row * G);
  }
};

}  // namespace gatedrnn::cpu
