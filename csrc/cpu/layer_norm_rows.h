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

// Scratch per thread for one row: a row pass never needs more than three rows of G gates and one of H units.
inline int64_t row_scratch(int64_t gates, int64_t hidden) { return 3 * gates * hidden + hidden; }

// y = gain * x^ + shift over one norm's columns of a row, x^ stored when `x_hat` is not null.
template <typename T>
GATEDRNN_ALWAYS_INLINE void normalise_into(const T* x, int64_t n, NormStats<T> stats, const T* gain, const T* shift,
                                           T* x_hat, T* y) {
  for (int64_t j = 0; j < n; ++j) {
    const T v = (x[j] - stats.mean) * stats.rstd;
    if (x_hat) x_hat[j] = v;
    y[j] = gain[j] * v + shift[j];
  }
}

// dL/dx of one norm's columns of a row from dL/dy (scratch: n values).
template <typename T>
GATEDRNN_ALWAYS_INLINE void norm_grad(const T* d_y, const T* gain, const T* x_hat, T rstd, int64_t n, T* scratch,
                                      T* d_x) {
  for (int64_t j = 0; j < n; ++j) scratch[j] = d_y[j] * gain[j];
  norm_backward(scratch, x_hat, rstd, n, d_x);
}

// ---------------------------------------------------------------------------------------------- LSTM
// pre = LN(x W_ih^T) + LN(h W_hh^T) + b_ih + b_hh; i, f, g, o from pre; c~ = f c_{t-1} + i g;
// h~ = o tanh(LN(c~)); zoneout (cells.h) on both; the state carried is c_t, not its norm.
template <typename T>
struct LstmNormRows {
  const T* gain;   // [9H]
  const T* shift;  // [9H]
  const T* bias;   // [4H]: b_ih + b_hh, or null
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

  void forward_row(const Step& step, int64_t b, int64_t proj_row0, T* scratch) const {
    const int64_t H = hidden, G = 4 * H, row = step.offset + b;
    T* x = input_proj + (row - proj_row0) * proj_stride;
    const T* h = product + b * G;
    T* saved = cells ? cells + row * lstm_norm_cells_width(H) : nullptr;
    T* pre = scratch;            // [4H]: pre-activations, then the gates
    T* from_h = scratch + G;     // [4H]: the recurrent product's norm
    T* candidate = from_h + G;   // [H]: c~
    const auto x_stats = norm_stats(x, G), h_stats = norm_stats(h, G);
    normalise_into(x, G, x_stats, gain, shift, saved ? saved + H : nullptr, pre);
    normalise_into(h, G, h_stats, gain + G, shift + G, saved ? saved + H + G : nullptr, from_h);
    T* c = c_state + b * H;
    for (int64_t l = 0; l < H; ++l) {
      T p[4];
      for (int64_t q = 0; q < 4; ++q) p[q] = pre[q * H + l] + from_h[q * H + l] + (bias ? bias[q * H + l] : T(0));
      const auto a = lstm_activate(p[0], p[1], p[2], p[3]);
      store_gates(pre, H, l, a.i, a.f, a.g, a.o);
      candidate[l] = lstm_cell_state(a, c[l]);
    }
    const auto c_stats = norm_stats(candidate, H);
    const T* h_prev = states.prev_row(step, b);
    const T* mask = recurrent_mask ? recurrent_mask + b * H : nullptr;
    T* c_hat = saved ? saved + H + 2 * G : nullptr;
    for (int64_t l = 0; l < H; ++l) {
      const T v = (candidate[l] - c_stats.mean) * c_stats.rstd;
      const LstmGates<T> a{pre[l], pre[H + l], pre[2 * H + l], pre[3 * H + l]};
      const T h_new = zoneout(keep_h.at(row, l), h_prev[l], lstm_hidden(a, gain[2 * G + l] * v + shift[2 * G + l]));
      const T c_new = zoneout(keep_c.at(row, l), c[l], candidate[l]);
      c[l] = c_new;
      states.output[row * H + l] = h_new;
      h_state[b * H + l] = h_new;
      if (mask) states.masked_output[row * H + l] = h_new * mask[l];
      if (saved) {
        store_gates(x, H, l, a.i, a.f, a.g, a.o);
        saved[l] = c_new;
        c_hat[l] = v;
      }
    }
    if (saved) {
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

  void backward_row(const Step& step, int64_t b, T* scratch) const {
    const int64_t H = hidden, G = 4 * H, row = step.offset + b, width = lstm_norm_cells_width(H);
    const T* a_row = gates + row * G;
    const T* saved = cells + row * width;
    const T* x_hat = saved + H;
    const T* h_hat = x_hat + G;
    const T* c_hat = h_hat + G;
    const T* rstd = saved + width - 3;
    const T* c_prev = b < step.prev_rows ? cells + (step.prev_offset + b) * width : c0 + b * H;
    const T* mask = recurrent_mask ? recurrent_mask + b * H : nullptr;
    T* carried = carry + b * H;
    T* dc = dc_state + b * H;
    T* dp = d_pre + row * G;
    T* d_norm = d_cell_norm + row * H;
    T* d_candidate = scratch;  // [H]
    T* spare = scratch + H;    // [4H]
    for (int64_t l = 0; l < H; ++l) {
      T dh = (mask ? product[b * H + l] * mask[l] : product[b * H + l]) + grad_output[row * H + l] + carried[l];
      const T k_h = keep_h.at(row, l);
      carried[l] = k_h * dh;  // zoneout's kept part goes straight to h_{t-1}
      dh *= T(1) - k_h;
      const T o = a_row[3 * H + l], t = tanh_(gain[2 * G + l] * c_hat[l] + shift[2 * G + l]);
      d_norm[l] = dh * o * (T(1) - t * t);
      dp[3 * H + l] = dh * t;  // the gradient reaching o, until the gate gradients replace it
    }
    norm_grad(d_norm, gain + 2 * G, c_hat, rstd[2], H, spare, d_candidate);
    for (int64_t l = 0; l < H; ++l) {
      const LstmGates<T> a{a_row[l], a_row[H + l], a_row[2 * H + l], a_row[3 * H + l]};
      const T k_c = keep_c.at(row, l);
      const T d_total = d_candidate[l] + (T(1) - k_c) * dc[l];
      LstmGateGrads<T> d;
      lstm_gate_grads(a, c_prev[l], d_total, dp[3 * H + l], d);
      dc[l] = d_total * a.f + k_c * dc[l];
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
  const T* b_ih;   // [3H] or null (then b_hh is null too)
  const T* b_hh;
  RecurrentStates<T> states;
  T* input_proj;  // x W_ih^T of rows from the chunk's first on; with saving, the saved rows (overwritten)
  int64_t proj_stride;
  const T* product;  // [B, 3H]: this step's h_{t-1} W_hh^T
  T* h_state;        // [B, H]
  bool save;
  ZoneoutKeep<T> keep;
  const T* recurrent_mask;  // [B, H] or null
  int64_t hidden;

  void forward_row(const Step& step, int64_t b, int64_t proj_row0, T* scratch) const {
    const int64_t H = hidden, G = 3 * H, row = step.offset + b;
    T* x = input_proj + (row - proj_row0) * proj_stride;
    const T* h = product + b * G;
    T* gi = scratch;
    T* gh = scratch + G;
    const auto x_stats = norm_stats(x, G), h_stats = norm_stats(h, G);
    normalise_into(x, G, x_stats, gain, shift, save ? x + 4 * H : nullptr, gi);
    normalise_into(h, G, h_stats, gain + G, shift + G, save ? x + 7 * H : nullptr, gh);
    const T* h_prev = states.prev_row(step, b);
    const T* mask = recurrent_mask ? recurrent_mask + b * H : nullptr;
    for (int64_t l = 0; l < H; ++l) {
      T in[3], rec[3];
      for (int64_t q = 0; q < 3; ++q) {
        in[q] = gi[q * H + l] + (b_ih ? b_ih[q * H + l] : T(0));
        rec[q] = gh[q * H + l] + (b_hh ? b_hh[q * H + l] : T(0));
      }
      const auto a = gru_activate(in[0], in[1], in[2], rec[0], rec[1], rec[2]);
      const T h_new = zoneout(keep.at(row, l), h_prev[l], gru_hidden(a, h_prev[l]));
      states.output[row * H + l] = h_new;
      h_state[b * H + l] = h_new;
      if (mask) states.masked_output[row * H + l] = h_new * mask[l];
      if (save) store_gates(x, H, l, a.r, a.z, a.n, a.hn);
    }
    if (save) {
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

  void backward_row(const Step& step, int64_t b, T* scratch) const {
    const int64_t H = hidden, G = 3 * H, row = step.offset + b;
    const T* sv = saved + row * gru_norm_saved_width(H);
    const T* h_prev = states.prev_row(step, b);
    const T* mask = recurrent_mask ? recurrent_mask + b * H : nullptr;
    T* carried = carry + b * H;
    T* dg = d_gates + row * 4 * H;
    T* d_in = scratch;      // [3H]: dr, dz, dn
    T* d_hid = scratch + G;  // [3H]: dr, dz, dhn
    for (int64_t l = 0; l < H; ++l) {
      const T dh = (mask ? product[b * H + l] * mask[l] : product[b * H + l]) + grad_output[row * H + l] + carried[l];
      const T k = keep.at(row, l);
      const GruGates<T> a{sv[l], sv[H + l], sv[2 * H + l], sv[3 * H + l]};
      GruGateGrads<T> di, dhid;
      carried[l] = gru_backward(a, h_prev[l], (T(1) - k) * dh, di, dhid) + k * dh;
      store_gates(dg, H, l, di.r, di.z, dhid.n, di.n);
      d_in[l] = di.r;
      d_in[H + l] = di.z;
      d_in[2 * H + l] = di.n;
      d_hid[l] = dhid.r;
      d_hid[H + l] = dhid.z;
      d_hid[2 * H + l] = dhid.n;
    }
    T* spare = d_hid + G;  // [3H]
    norm_grad(d_in, gain, sv + 4 * H, sv[10 * H], G, spare, d_input_proj + row * G);
    norm_grad(d_hid, gain + G, sv + 7 * H, sv[10 * H + 1], G, spare, d_recurrent + row * G);
  }
};

}  // namespace gatedrnn::cpu
