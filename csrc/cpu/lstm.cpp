// LSTM on the CPU: one layer and direction over the whole sequence.
//
// Forward: the input projection of every step is one GEMM before the loop; each step is one GEMM for
// all four gates (h_{t-1} @ W_hh^T), one fused parallel pass (biases, activations, cell update, hidden
// value, saved activations), and with proj_size one more GEMM (h_t @ W_hr^T). Backward mirrors it and leaves
// every weight and input gradient to single GEMMs after the loop. Nothing is allocated inside a loop.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../cells.h"
#include "../checks.h"
#include "../layer_grads.h"
#include "../sequence.h"
#include "blas.h"
#include "loops.h"
#include "workspace.h"

namespace gatedrnn::cpu {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kGates = 4;

// ------------------------------------------------------------------------------------------- forward
// One step's buffers. Row b of the step is packed row offset + b.
template <typename T>
struct ForwardStep {
  T* gates;            // [N, 4H]: input projection in; activations out when saving
  const T* bias;       // [4H]: b_ih + b_hh, or null
  const T* recurrent;  // [B, 4H]: h_{t-1} @ W_hh^T
  T* c_state;          // [B, H]: c_{t-1} in, c_t out
  T* output;           // [N, R]: h_t (without projection)
  T* h_state;          // [B, R]: h_t (without projection)
  T* cells;            // [N, H]: saved c_t, or null
  T* pre_proj;         // [B, H]: h_t before projection, or null without projection
  int64_t hidden, state, offset;
};

template <typename T, bool kSave, bool kProj, bool kBias>
GATEDRNN_ALWAYS_INLINE void forward_span(const ForwardStep<T>& s, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = s.hidden, row = s.offset + b;
  T* g = s.gates + row * kGates * H;
  const T* r = s.recurrent + b * kGates * H;
  T* c = s.c_state + b * H;
  GATEDRNN_IVDEP
  for (int64_t j = j0; j < j1; ++j) {
    T pre[kGates];
    for (int64_t k = 0; k < kGates; ++k) pre[k] = g[k * H + j] + r[k * H + j] + (kBias ? s.bias[k * H + j] : T(0));
    const auto a = lstm_activate<T>(pre[0], pre[1], pre[2], pre[3]);
    const T c_new = lstm_cell_state(a, c[j]);
    const T h_new = lstm_hidden(a, c_new);
    c[j] = c_new;
    if constexpr (kSave) {
      store_gates(g, H, j, a.i, a.f, a.g, a.o);
      s.cells[row * H + j] = c_new;
    }
    if constexpr (kProj) {
      s.pre_proj[b * H + j] = h_new;
    } else {
      s.output[row * s.state + j] = h_new;
      s.h_state[b * s.state + j] = h_new;
    }
  }
}

template <typename T, bool kBias>
GATEDRNN_ALWAYS_INLINE void forward_span_biased(const ForwardStep<T>& s, int64_t b, int64_t j0, int64_t j1) {
  if (s.cells) {
    s.pre_proj ? forward_span<T, true, true, kBias>(s, b, j0, j1) : forward_span<T, true, false, kBias>(s, b, j0, j1);
  } else {
    s.pre_proj ? forward_span<T, false, true, kBias>(s, b, j0, j1) : forward_span<T, false, false, kBias>(s, b, j0, j1);
  }
}

template <typename T>
GATEDRNN_ALWAYS_INLINE void forward_span_any(const ForwardStep<T>& s, int64_t b, int64_t j0, int64_t j1) {
  s.bias ? forward_span_biased<T, true>(s, b, j0, j1) : forward_span_biased<T, false>(s, b, j0, j1);
}

GATEDRNN_SPAN_KERNELS(run_forward_span, ForwardStep, forward_span_any)

template <typename scalar_t>
void lstm_forward_loop(const std::vector<Step>& schedule, const LayerShape& s, Tensor& gates, const OptTensor& bias,
                       Tensor& output2d, Tensor& hy, Tensor& cy, Tensor& cells, const Tensor& w_hh,
                       const OptTensor& w_hr, bool save) {
  const int64_t H = s.hidden, R = s.state, G = kGates * H;
  const bool proj = w_hr.has_value();
  auto recurrent = at::empty({s.batch, G}, gates.options());
  auto hidden_pre_proj = proj ? at::empty({s.batch, H}, gates.options()) : Tensor();
  const StepGemm<scalar_t> recurrent_gemm(w_hh, /*transposed=*/true, s.batch, s.steps);
  const auto proj_gemm =
      proj ? std::optional<StepGemm<scalar_t>>(std::in_place, *w_hr, true, s.batch, s.steps) : std::nullopt;

  scalar_t* h_state = hy.data_ptr<scalar_t>();
  scalar_t* output = output2d.data_ptr<scalar_t>();
  ForwardStep<scalar_t> args{gates.data_ptr<scalar_t>(),
                             bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
                             recurrent.const_data_ptr<scalar_t>(),
                             cy.data_ptr<scalar_t>(),
                             output,
                             h_state,
                             save ? cells.data_ptr<scalar_t>() : nullptr,
                             proj ? hidden_pre_proj.data_ptr<scalar_t>() : nullptr,
                             H,
                             R,
                             0};
  for (const auto& step : schedule) {
    // h_state holds h_{t-1} of every active row: rows that were active last step were just updated, rows
    // that just became active (reverse direction of a packed batch) still hold h0.
    recurrent_gemm.run(h_state, step.rows, recurrent.data_ptr<scalar_t>(), /*accumulate=*/false);
    args.offset = step.offset;
    for_each_span(step.rows, H, [&](int64_t b, int64_t j0, int64_t j1) { run_forward_span(args, b, j0, j1); });
    if (proj) {
      scalar_t* out_rows = output + step.offset * R;
      proj_gemm->run(args.pre_proj, step.rows, out_rows, false);
      std::memcpy(h_state, out_rows, sizeof(scalar_t) * step.rows * R);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_cpu(const Tensor& input_, const OptTensor& batch_sizes,
                                                                    const Tensor& hx_, const Tensor& cx_,
                                                                    const Tensor& w_ih_, const Tensor& w_hh_,
                                                                    const OptTensor& b_ih_, const OptTensor& b_hh_,
                                                                    const OptTensor& w_hr_, bool reverse, bool save) {
  constexpr const char* op = "gatedrnn::lstm_forward";
  const LayerShape s = check_lstm_forward_args(op, input_, batch_sizes, hx_, cx_, w_ih_, w_hh_, b_ih_, b_hh_, w_hr_);

  const auto dtype = compute_dtype(input_.scalar_type());
  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto w_hr = to_compute(w_hr_, dtype);
  auto hy = hx_.to(dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
  auto cy = cx_.to(dtype, false, true).contiguous();

  const auto x2d = input.view({s.rows, s.input_size});
  // The biases are added in the fused pass: a bias in the GEMM would cost a pass over all N x 4H first.
  auto gates = save ? at::empty({s.rows, kGates * s.hidden}, input.options())
                    : scratch_tensor(Scratch::Gates, {s.rows, kGates * s.hidden}, input.options());
  at::mm_out(gates, x2d, w_ih.t());
  const OptTensor bias =
      b_ih_.has_value() ? OptTensor((b_ih_->to(dtype) + b_hh_->to(dtype)).contiguous()) : std::nullopt;
  auto output2d = at::empty({s.rows, s.state}, input.options());
  auto cells = save ? at::empty({s.rows, s.hidden}, input.options()) : at::empty({0}, input.options());

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_lstm_forward_cpu", [&] {
    lstm_forward_loop<scalar_t>(schedule, s, gates, bias, output2d, hy, cy, cells, w_hh, w_hr, save);
  });

  auto output_shape = input_.sizes().vec();
  output_shape.back() = s.state;
  const auto storage = input_.scalar_type();
  if (!save) gates = at::empty({0}, input.options());
  return {output2d.view(output_shape).to(storage), hy.to(storage), cy.to(storage), gates, cells};
}

// ------------------------------------------------------------------------------------------ backward
template <typename T>
struct BackwardStep {
  const T* gates;        // [N, 4H] saved activations
  const T* cells;        // [N, H] saved c_t
  const T* c0;           // [B, H]
  const T* grad_output;  // [N, R]
  const T* dh_state;     // [B, R]: gradient reaching h_t from step t+1 (without projection)
  const T* dh_pre_proj;  // [B, H]: gradient reaching h_t before the projection, or null
  T* dc_state;           // [B, H]: gradient reaching c_t in, c_{t-1} out
  T* d_gates;            // [N, 4H] pre-activation gradients
  T* pre_proj;           // [N, H]: recomputed h_t before projection (for dW_hr), or null
  int64_t hidden, state, offset, prev_offset, prev_rows;
};

template <typename T, bool kProj>
GATEDRNN_ALWAYS_INLINE void backward_span(const BackwardStep<T>& s, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = s.hidden, row = s.offset + b;
  const T* g = s.gates + row * kGates * H;
  const T* c = s.cells + row * H;
  // c_{t-1}: the previous step's saved cell state, or c0 for a row's first step.
  const T* c_prev = b < s.prev_rows ? s.cells + (s.prev_offset + b) * H : s.c0 + b * H;
  T* dc = s.dc_state + b * H;
  T* dg = s.d_gates + row * kGates * H;
  GATEDRNN_IVDEP
  for (int64_t j = j0; j < j1; ++j) {
    const LstmGates<T> a{g[j], g[H + j], g[2 * H + j], g[3 * H + j]};
    T d_hidden;
    if constexpr (kProj) {
      d_hidden = s.dh_pre_proj[b * H + j];
      s.pre_proj[row * H + j] = lstm_hidden(a, c[j]);  // recomputed for dW_hr, not saved
    } else {
      d_hidden = s.grad_output[row * s.state + j] + s.dh_state[b * s.state + j];
    }
    LstmGateGrads<T> d;
    dc[j] = lstm_backward(a, c[j], c_prev[j], d_hidden, dc[j], d);
    store_gates(dg, H, j, d.i, d.f, d.g, d.o);
  }
}

template <typename T>
GATEDRNN_ALWAYS_INLINE void backward_span_any(const BackwardStep<T>& s, int64_t b, int64_t j0, int64_t j1) {
  s.pre_proj ? backward_span<T, true>(s, b, j0, j1) : backward_span<T, false>(s, b, j0, j1);
}

GATEDRNN_SPAN_KERNELS(run_backward_span, BackwardStep, backward_span_any)

template <typename scalar_t>
void lstm_backward_loop(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& grad_out2d,
                        const Tensor& gates, const Tensor& cells, const Tensor& c0, const Tensor& w_hh,
                        const OptTensor& w_hr, Tensor& d_gates, Tensor& dh, Tensor& dc, Tensor& d_proj,
                        Tensor& hidden_pre_proj) {
  const int64_t R = s.state, G = kGates * s.hidden;
  const bool proj = w_hr.has_value();
  auto dh_pre_proj = proj ? at::empty({s.batch, s.hidden}, gates.options()) : Tensor();
  const StepGemm<scalar_t> recurrent_gemm(w_hh, /*transposed=*/false, s.batch, s.steps);
  const auto proj_gemm =
      proj ? std::optional<StepGemm<scalar_t>>(std::in_place, *w_hr, false, s.batch, s.steps) : std::nullopt;
  const scalar_t* grad_out = grad_out2d.const_data_ptr<scalar_t>();
  scalar_t* dh_state = dh.data_ptr<scalar_t>();
  scalar_t* d_out_proj = proj ? d_proj.data_ptr<scalar_t>() : nullptr;
  BackwardStep<scalar_t> args{gates.const_data_ptr<scalar_t>(),
                              cells.const_data_ptr<scalar_t>(),
                              c0.const_data_ptr<scalar_t>(),
                              grad_out2d.const_data_ptr<scalar_t>(),
                              dh.const_data_ptr<scalar_t>(),
                              proj ? dh_pre_proj.const_data_ptr<scalar_t>() : nullptr,
                              dc.data_ptr<scalar_t>(),
                              d_gates.data_ptr<scalar_t>(),
                              proj ? hidden_pre_proj.data_ptr<scalar_t>() : nullptr,
                              s.hidden,
                              s.state,
                              0,
                              0,
                              0};
  for (auto it = schedule.rbegin(); it != schedule.rend(); ++it) {
    const Step& step = *it;
    if (proj) {
      // Gradient reaching the projected output r_t, then through W_hr to the cell's hidden value.
      scalar_t* d_out_rows = d_out_proj + step.offset * R;
      const scalar_t* g_out_rows = grad_out + step.offset * R;
      for (int64_t i = 0; i < step.rows * R; ++i) d_out_rows[i] = g_out_rows[i] + dh_state[i];
      proj_gemm->run(d_out_rows, step.rows, const_cast<scalar_t*>(args.dh_pre_proj), false);
    }
    args.offset = step.offset;
    args.prev_offset = step.prev_offset;
    args.prev_rows = step.prev_rows;
    for_each_span(step.rows, s.hidden, [&](int64_t b, int64_t j0, int64_t j1) { run_backward_span(args, b, j0, j1); });
    // h_{t-1} reaches step t only through W_hh: this overwrites the rows' gradient entirely.
    recurrent_gemm.run(args.d_gates + step.offset * G, step.rows, dh_state, /*accumulate=*/false);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_cpu(
    const Tensor& grad_output_, const Tensor& grad_hy_, const Tensor& grad_cy_, const Tensor& input_,
    const OptTensor& batch_sizes, const Tensor& hx_, const Tensor& cx_, const Tensor& w_ih_, const Tensor& w_hh_,
    const OptTensor& w_hr_, const Tensor& output_, const Tensor& gates_, const Tensor& cells_, bool reverse,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "gatedrnn::lstm_backward";
  const LayerShape s = check_lstm_backward_args(op, grad_output_, grad_hy_, grad_cy_, input_, batch_sizes, hx_, cx_,
                                                w_ih_, w_hh_, w_hr_, output_, gates_, cells_);
  const auto dtype = compute_dtype(input_.scalar_type());

  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto w_hr = to_compute(w_hr_, dtype);
  const auto hx = to_compute(hx_, dtype), cx = to_compute(cx_, dtype);
  const auto grad_out2d = to_compute(grad_output_, dtype).view({s.rows, s.state});
  const auto output2d = to_compute(output_, dtype).view({s.rows, s.state});
  const auto gates = gates_.contiguous().view({s.rows, kGates * s.hidden});
  const auto cells = cells_.contiguous().view({s.rows, s.hidden});
  auto dh = grad_hy_.to(dtype, false, true).contiguous();
  auto dc = grad_cy_.to(dtype, false, true).contiguous();

  auto d_gates = scratch_tensor(Scratch::Gates, {s.rows, kGates * s.hidden}, input.options());
  const bool proj = w_hr.has_value();
  auto d_proj = proj ? scratch_tensor(Scratch::Projection, {s.rows, s.state}, input.options()) : Tensor();
  auto hidden_pre_proj = proj ? scratch_tensor(Scratch::PreProjection, {s.rows, s.hidden}, input.options()) : Tensor();

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_lstm_backward_cpu", [&] {
    lstm_backward_loop<scalar_t>(schedule, s, grad_out2d, gates, cells, cx, w_hh, w_hr, d_gates, dh, dc, d_proj,
                                 hidden_pre_proj);
  });

  const auto x2d = input.view({s.rows, s.input_size});
  const LayerGradArgs args{x2d, w_ih, output2d, hx, schedule, !batch_sizes.has_value(),
                           reverse, output_mask, input_.sizes(), input_.options()};
  const auto g = lstm_layer_grads(args, d_gates, d_proj, hidden_pre_proj);
  const auto storage = input_.scalar_type();
  return {g.input, dh.to(storage), dc.to(storage), g.w_ih, g.w_hh, g.bias, g.w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(gatedrnn, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
}

}  // namespace gatedrnn::cpu
