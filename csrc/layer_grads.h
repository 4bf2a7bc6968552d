// The gradients computed after a backward time loop, on any device: input, weight and bias gradients are
// large GEMMs and reductions over all rows of the pre-activation gradients (DESIGN.md principle 4). The CPU
// and CUDA backward ops differ only in how they fill d_gates; everything here is plain ATen.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <vector>

#include "sequence.h"

namespace gatedrnn {

inline at::Tensor rows_of(const at::Tensor& t, int64_t offset, int64_t rows) { return t.narrow(0, offset, rows); }

// c (+)= a @ b through ATen (any device).
inline void aten_matmul(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

using Matmul = void (*)(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// A new [a.size(0), b.size(1)] product through `matmul`.
inline at::Tensor product(Matmul matmul, const at::Tensor& a, const at::Tensor& b) {
  auto c = at::empty({a.size(0), b.size(1)}, a.options());
  matmul(c, a, b, false);
  return c;
}

// The recurrent state each row saw on entry to its step, as one [N, R] matrix (packed sequences).
inline at::Tensor gather_previous_states(const std::vector<Step>& schedule, const at::Tensor& output2d,
                                         const at::Tensor& h0) {
  auto prev = at::empty_like(output2d);
  for (const auto& s : schedule) {
    if (s.prev_rows > 0) rows_of(prev, s.offset, s.prev_rows).copy_(rows_of(output2d, s.prev_offset, s.prev_rows));
    if (s.rows > s.prev_rows) {
      rows_of(prev, s.offset + s.prev_rows, s.rows - s.prev_rows).copy_(rows_of(h0, s.prev_rows, s.rows - s.prev_rows));
    }
  }
  return prev;
}

// dW_hh = dG_hidden^T @ H_prev, H_prev[row] being the state the row saw on entry to its step: h0 for the
// first step, the previous step's output after. Dense input needs no gathered copy of H_prev: its rows
// are the output shifted by one step (B rows), and h0 for the first step.
inline at::Tensor recurrent_weight_grad(Matmul matmul, const at::Tensor& d_hidden, const at::Tensor& output2d,
                                        const at::Tensor& h0, const std::vector<Step>& schedule, bool dense,
                                        bool reverse) {
  if (!dense) return product(matmul, d_hidden.t(), gather_previous_states(schedule, output2d, h0));
  const int64_t rows = output2d.size(0), batch = h0.size(0), later = rows - batch;
  if (rows == 0) return at::zeros({d_hidden.size(1), h0.size(1)}, d_hidden.options());  // T = 0
  // Forward: rows [B, N) saw output rows [0, N - B). Reverse: rows [0, N - B) saw output rows [B, N).
  const auto d_first = d_hidden.narrow(0, reverse ? later : 0, batch);
  auto grad = product(matmul, d_first.t(), h0);
  if (later > 0) {
    matmul(grad, d_hidden.narrow(0, reverse ? 0 : batch, later).t(), output2d.narrow(0, reverse ? batch : 0, later),
           true);
  }
  return grad;
}

// What every backward op needs to finish: the layer's forward tensors (all in the dtype the loop computed in),
// which gradients were asked for, and the dtype and shape to return them in.
struct LayerGradArgs {
  const at::Tensor& x2d;       // [N, I]
  const at::Tensor& w_ih;      // [G*H, I]
  const at::Tensor& output2d;  // [N, R]: h_t of every row
  const at::Tensor& h0;        // [B, R]
  const std::vector<Step>& schedule;
  bool dense, reverse;
  std::array<bool, 3> output_mask;  // input, weights, biases
  at::IntArrayRef input_shape;
  at::TensorOptions storage;  // dtype and device of the returned gradients
  Matmul matmul = aten_matmul;  // the device's fastest c (+)= a @ b
};

inline at::Tensor no_grad_tensor(const LayerGradArgs& a) { return at::empty({0}, a.storage); }

struct LstmGrads {
  at::Tensor input, w_ih, w_hh, bias, w_hr;
};

// The gradients that flow through the two products, from d_input_proj [N, G*H], the gradient reaching the
// input projection x @ W_ih^T, and d_recurrent [N, G*H], the one reaching h_{t-1} @ W_hh^T: the input's, W_ih's
// and W_hh's. They are the same tensor (the pre-activation gradients) unless layer_norm sits between the
// products and the gates.
struct ProductGrads {
  at::Tensor input, w_ih, w_hh;
};

inline ProductGrads product_grads(const LayerGradArgs& a, const at::Tensor& d_input_proj,
                                  const at::Tensor& d_recurrent) {
  const auto [want_input, want_weights, want_bias] = a.output_mask;
  const auto dtype = a.storage.dtype();
  ProductGrads g{no_grad_tensor(a), no_grad_tensor(a), no_grad_tensor(a)};
  if (want_input) g.input = product(a.matmul, d_input_proj, a.w_ih).view(a.input_shape).to(dtype);
  if (want_weights) {
    g.w_ih = product(a.matmul, d_input_proj.t(), a.x2d).to(dtype);
    g.w_hh = recurrent_weight_grad(a.matmul, d_recurrent, a.output2d, a.h0, a.schedule, a.dense, a.reverse).to(dtype);
  }
  return g;
}

// product_grads of a layer_norm backward (CPU and CUDA): from the forward's tensors in the dtype the loop ran in
// (x2d [N, I], output2d [N, H], h0 [B, H]); `input` is the op's input, whose shape and dtype the gradients get.
// dW_hh is taken from the states as the product read them (times recurrent dropout's mask).
inline ProductGrads norm_product_grads(const at::Tensor& x2d, const at::Tensor& w_ih, const at::Tensor& output2d,
                                       const at::Tensor& h0, const std::optional<at::Tensor>& recurrent_mask,
                                       const std::optional<at::Tensor>& batch_sizes, const std::vector<Step>& schedule,
                                       bool reverse, std::array<bool, 3> output_mask, const at::Tensor& input,
                                       const at::Tensor& d_input_proj, const at::Tensor& d_recurrent,
                                       Matmul matmul = aten_matmul) {
  const auto [h_read, h0_read] = states_as_read(output2d, h0, recurrent_mask, batch_sizes);
  const LayerGradArgs args{x2d,     w_ih,        h_read,       h0_read,         schedule, !batch_sizes.has_value(),
                           reverse, output_mask, input.sizes(), input.options(), matmul};
  return product_grads(args, d_input_proj, d_recurrent);
}

// d_gates: [N, 4H] pre-activation gradients (i, f, g, o). With a projection, d_proj [N, R] is the gradient
// reaching each projected output and pre_proj [N, H] the hidden values before the projection.
inline LstmGrads lstm_layer_grads(const LayerGradArgs& a, const at::Tensor& d_gates, const at::Tensor& d_proj,
                                  const at::Tensor& pre_proj) {
  const auto [want_input, want_weights, want_bias] = a.output_mask;
  const auto dtype = a.storage.dtype();
  const auto products = product_grads(a, d_gates, d_gates);
  LstmGrads g{products.input, products.w_ih, products.w_hh, no_grad_tensor(a), no_grad_tensor(a)};
  if (want_weights && d_proj.defined()) g.w_hr = product(a.matmul, d_proj.t(), pre_proj).to(dtype);
  if (want_bias) g.bias = d_gates.sum(0).to(dtype);
  return g;
}

// One norm's part of a layer_norm tensor's gradient (layer_norm.h): its normalised rows x_hat and the gradient
// d_out reaching its output, [N, n] each (any row strides), for columns [offset, offset + n) of the gradient.
struct NormGradPart {
  at::Tensor x_hat, d_out;
  int64_t offset;
};

// The layer_norm tensor's gradient [2, columns]: the gains' row sum_rows d_out * x_hat, the biases' sum_rows
// d_out, through ATen (the CUDA ops'; the CPU's own column loop, layer_norm.cpp, keeps no [N, n] temporary).
inline at::Tensor norm_param_grads(const std::vector<NormGradPart>& parts, int64_t columns) {
  auto grad = at::empty({2, columns}, parts.front().x_hat.options());
  for (const auto& part : parts) {
    const int64_t n = part.x_hat.size(1);
    grad[0].narrow(0, part.offset, n).copy_((part.d_out * part.x_hat).sum(0));
    grad[1].narrow(0, part.offset, n).copy_(part.d_out.sum(0));
  }
  return grad;
}

// The parts of the layer_norm LSTM's gradient, from its saved `cells` rows (layer_norm.h's layout), d_pre (the
// pre-activation gradients, which both product norms' outputs get) and d_cell_norm (the cell norm's output's).
inline std::vector<NormGradPart> lstm_norm_grad_parts(const at::Tensor& cells, const at::Tensor& d_pre,
                                                      const at::Tensor& d_cell_norm) {
  const int64_t H = d_cell_norm.size(1), G = 4 * H;
  return {{cells.narrow(1, H, G), d_pre, 0}, {cells.narrow(1, H + G, G), d_pre, G},
          {cells.narrow(1, H + 2 * G, H), d_cell_norm, 2 * G}};
}

// The parts of the layer_norm GRU's gradient, from its `saved` rows and d_gates [dr, dz, dhn, dn]: the input
// norm's output got [dr, dz, dn], the recurrent one's [dr, dz, dhn] (as in gru_layer_grads).
inline std::vector<NormGradPart> gru_norm_grad_parts(const at::Tensor& saved, const at::Tensor& d_gates) {
  const int64_t H = d_gates.size(1) / 4, G = 3 * H;
  return {{saved.narrow(1, 4 * H, 2 * H), d_gates.narrow(1, 0, 2 * H), 0},
          {saved.narrow(1, 6 * H, H), d_gates.narrow(1, 3 * H, H), 2 * H},
          {saved.narrow(1, 7 * H, G), d_gates.narrow(1, 0, G), G}};
}

struct GruGrads {
  at::Tensor input, w_ih, w_hh, b_ih, b_hh;
};

// d_gates: [N, 4H] = [dr, dz, dhn, dn]. The r and z gradients are the same on the input and the hidden
// side, so the hidden side's [dr, dz, dhn] are columns [0, 3H) and the input side's [dr, dz, dn] are columns
// [0, 2H) and [3H, 4H). With reset_after=False (cells.h) dhn is dn, and `reset_hidden` ([N, H], any row
// stride) holds r * h_{t-1} of every row as W_hn's product read it: W_hh's n rows get dn^T @ reset_hidden
// instead of dn^T @ h_{t-1}. Undefined for the plain GRU.
inline GruGrads gru_layer_grads(const LayerGradArgs& a, const at::Tensor& d_gates,
                                const at::Tensor& reset_hidden = at::Tensor()) {
  const auto [want_input, want_weights, want_bias] = a.output_mask;
  const auto dtype = a.storage.dtype();
  const int64_t H = d_gates.size(1) / 4;
  const auto d_rz = d_gates.narrow(1, 0, 2 * H), d_n = d_gates.narrow(1, 3 * H, H);
  GruGrads g{no_grad_tensor(a), no_grad_tensor(a), no_grad_tensor(a), no_grad_tensor(a), no_grad_tensor(a)};
  if (want_input) {
    auto grad_input = product(a.matmul, d_rz, a.w_ih.narrow(0, 0, 2 * H));
    a.matmul(grad_input, d_n, a.w_ih.narrow(0, 2 * H, H), true);
    g.input = grad_input.view(a.input_shape).to(dtype);
  }
  if (want_weights) {
    auto grad_w_ih = at::empty_like(a.w_ih);
    auto grad_w_ih_rz = grad_w_ih.narrow(0, 0, 2 * H), grad_w_ih_n = grad_w_ih.narrow(0, 2 * H, H);
    a.matmul(grad_w_ih_rz, d_rz.t(), a.x2d, false);
    a.matmul(grad_w_ih_n, d_n.t(), a.x2d, false);
    g.w_ih = grad_w_ih.to(dtype);
    const int64_t read_h = reset_hidden.defined() ? 2 * H : 3 * H;  // W_hh's rows that read h_{t-1}
    auto grad_w_hh =
        recurrent_weight_grad(a.matmul, d_gates.narrow(1, 0, read_h), a.output2d, a.h0, a.schedule, a.dense, a.reverse);
    if (reset_hidden.defined()) {
      const auto rh = reset_hidden.to(d_gates.scalar_type());
      grad_w_hh = at::cat({grad_w_hh, product(a.matmul, d_gates.narrow(1, 2 * H, H).t(), rh)});
    }
    g.w_hh = grad_w_hh.to(dtype);
  }
  if (want_bias) {
    const auto sums = d_gates.sum(0);
    g.b_ih = at::cat({sums.narrow(0, 0, 2 * H), sums.narrow(0, 3 * H, H)}).to(dtype);
    g.b_hh = sums.narrow(0, 0, 3 * H).to(dtype);
  }
  return g;
}

}  // namespace gatedrnn
