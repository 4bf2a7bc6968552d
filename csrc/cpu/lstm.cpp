// LSTM on the CPU: one layer and direction over the whole sequence.
//
// Forward: the input projection of every step is one GEMM before the loop; each step is one GEMM for
// all four gates (h_{t-1} @ W_hh^T), one fused parallel pass (activations, cell update, hidden value,
// saved activations), and with proj_size one more GEMM (h_t @ W_hr^T). Backward mirrors it and leaves
// every weight and input gradient to single GEMMs after the loop. Nothing is allocated inside a loop.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../cells.h"
#include "../checks.h"
#include "../sequence.h"
#include "loops.h"

namespace gatedrnn::cpu {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kGates = 4;

template <typename scalar_t>
void lstm_forward_loop(const std::vector<Step>& schedule, const LayerShape& s, Tensor& gates, Tensor& output2d,
                       Tensor& hy, Tensor& cy, Tensor& cells, const Tensor& w_hh, const OptTensor& w_hr, bool save) {
  const int64_t H = s.hidden, R = s.state, G = kGates * H;
  auto recurrent = at::empty({s.batch, G}, gates.options());
  auto hidden_pre_proj = w_hr.has_value() ? at::empty({s.batch, H}, gates.options()) : Tensor();
  const auto w_hh_t = w_hh.t();

  scalar_t* gate_data = gates.data_ptr<scalar_t>();
  scalar_t* out_data = output2d.data_ptr<scalar_t>();
  scalar_t* h_data = hy.data_ptr<scalar_t>();
  scalar_t* c_data = cy.data_ptr<scalar_t>();
  scalar_t* cell_data = save ? cells.data_ptr<scalar_t>() : nullptr;
  const scalar_t* rec_data = recurrent.const_data_ptr<scalar_t>();
  scalar_t* pre_proj_data = w_hr.has_value() ? hidden_pre_proj.data_ptr<scalar_t>() : nullptr;

  for (const auto& step : schedule) {
    // hy holds h_{t-1} of every active row: rows that were active last step were just updated, rows that
    // just became active (reverse direction of a packed batch) still hold h0.
    auto rec_rows = rows_of(recurrent, 0, step.rows);
    at::mm_out(rec_rows, rows_of(hy, 0, step.rows), w_hh_t);
    for_each_unit(step.rows, H, [&](int64_t b, int64_t j) {
      scalar_t* g = gate_data + (step.offset + b) * G + j;
      const scalar_t* r = rec_data + b * G + j;
      const auto a = lstm_activate<scalar_t>(g[0] + r[0], g[H] + r[H], g[2 * H] + r[2 * H], g[3 * H] + r[3 * H]);
      const scalar_t c = lstm_cell_state(a, c_data[b * H + j]);
      const scalar_t h = lstm_hidden(a, c);
      c_data[b * H + j] = c;
      if (save) {
        g[0] = a.i;
        g[H] = a.f;
        g[2 * H] = a.g;
        g[3 * H] = a.o;
        cell_data[(step.offset + b) * H + j] = c;
      }
      if (pre_proj_data) {
        pre_proj_data[b * H + j] = h;
      } else {
        out_data[(step.offset + b) * R + j] = h;
        h_data[b * R + j] = h;
      }
    });
    if (pre_proj_data) {
      auto out_rows = rows_of(output2d, step.offset, step.rows);
      at::mm_out(out_rows, rows_of(hidden_pre_proj, 0, step.rows), w_hr->t());
      rows_of(hy, 0, step.rows).copy_(out_rows);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_cpu(
    const Tensor& input_, const OptTensor& batch_sizes, const Tensor& hx_, const Tensor& cx_, const Tensor& w_ih_,
    const Tensor& w_hh_, const OptTensor& b_ih_, const OptTensor& b_hh_, const OptTensor& w_hr_, bool reverse,
    bool save) {
  constexpr const char* op = "gatedrnn::lstm_forward";
  const LayerShape s = check_layer_args(op, kGates, input_, batch_sizes, hx_, w_ih_, w_hh_, b_ih_, b_hh_, w_hr_);
  check_same_dtype_device(op, input_, cx_, "cx");
  check_shape(op, cx_, {s.batch, s.hidden}, "cx");

  const auto dtype = compute_dtype(input_.scalar_type());
  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto w_hr = to_compute(w_hr_, dtype);
  auto hy = hx_.to(dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
  auto cy = cx_.to(dtype, false, true).contiguous();

  const auto x2d = input.view({s.rows, s.input_size});
  auto gates = at::empty({s.rows, kGates * s.hidden}, input.options());
  if (b_ih_.has_value()) {
    at::addmm_out(gates, (b_ih_->to(dtype) + b_hh_->to(dtype)), x2d, w_ih.t());
  } else {
    at::mm_out(gates, x2d, w_ih.t());
  }
  auto output2d = at::empty({s.rows, s.state}, input.options());
  auto cells = save ? at::empty({s.rows, s.hidden}, input.options()) : at::empty({0}, input.options());

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_lstm_forward_cpu", [&] {
    lstm_forward_loop<scalar_t>(schedule, s, gates, output2d, hy, cy, cells, w_hh, w_hr, save);
  });

  auto output_shape = input_.sizes().vec();
  output_shape.back() = s.state;
  const auto storage = input_.scalar_type();
  if (!save) gates = at::empty({0}, input.options());
  return {output2d.view(output_shape).to(storage), hy.to(storage), cy.to(storage), gates, cells};
}

template <typename scalar_t>
void lstm_backward_loop(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& grad_out2d,
                        const Tensor& gates, const Tensor& cells, const Tensor& c0, const Tensor& w_hh,
                        const OptTensor& w_hr, Tensor& d_gates, Tensor& dh, Tensor& dc, Tensor& d_proj,
                        Tensor& hidden_pre_proj) {
  const int64_t H = s.hidden, R = s.state, G = kGates * H;
  const bool proj = w_hr.has_value();
  auto dh_pre_proj = proj ? at::empty({s.batch, H}, gates.options()) : Tensor();

  const scalar_t* gate_data = gates.const_data_ptr<scalar_t>();
  const scalar_t* cell_data = cells.const_data_ptr<scalar_t>();
  const scalar_t* c0_data = c0.const_data_ptr<scalar_t>();
  const scalar_t* grad_out_data = grad_out2d.const_data_ptr<scalar_t>();
  scalar_t* dg_data = d_gates.data_ptr<scalar_t>();
  scalar_t* dh_data = dh.data_ptr<scalar_t>();
  scalar_t* dc_data = dc.data_ptr<scalar_t>();
  const scalar_t* dh_pre_data = proj ? dh_pre_proj.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* pre_proj_data = proj ? hidden_pre_proj.data_ptr<scalar_t>() : nullptr;

  for (auto it = schedule.rbegin(); it != schedule.rend(); ++it) {
    const Step& step = *it;
    if (proj) {
      // Gradient reaching the projected output r_t, then through W_hr to the cell's hidden value.
      auto d_out_rows = rows_of(d_proj, step.offset, step.rows);
      at::add_out(d_out_rows, rows_of(grad_out2d, step.offset, step.rows), rows_of(dh, 0, step.rows));
      auto dh_pre_rows = rows_of(dh_pre_proj, 0, step.rows);
      at::mm_out(dh_pre_rows, d_out_rows, *w_hr);
    }
    for_each_unit(step.rows, H, [&](int64_t b, int64_t j) {
      const int64_t row = step.offset + b;
      const scalar_t* g = gate_data + row * G + j;
      const LstmGates<scalar_t> a{g[0], g[H], g[2 * H], g[3 * H]};
      const scalar_t c = cell_data[row * H + j];
      const scalar_t c_prev =
          b < step.prev_rows ? cell_data[(step.prev_offset + b) * H + j] : c0_data[b * H + j];
      const scalar_t d_hidden =
          proj ? dh_pre_data[b * H + j] : grad_out_data[row * R + j] + dh_data[b * R + j];
      LstmGateGrads<scalar_t> d;
      dc_data[b * H + j] = lstm_backward(a, c, c_prev, d_hidden, dc_data[b * H + j], d);
      scalar_t* dg = dg_data + row * G + j;
      dg[0] = d.i;
      dg[H] = d.f;
      dg[2 * H] = d.g;
      dg[3 * H] = d.o;
      if (proj) pre_proj_data[row * H + j] = lstm_hidden(a, c);  // recomputed for dW_hr, not saved
    });
    // h_{t-1} reaches step t only through W_hh: this overwrites the rows' gradient entirely.
    auto dh_rows = rows_of(dh, 0, step.rows);
    at::mm_out(dh_rows, rows_of(d_gates, step.offset, step.rows), w_hh);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_cpu(
    const Tensor& grad_output_, const Tensor& grad_hy_, const Tensor& grad_cy_, const Tensor& input_,
    const OptTensor& batch_sizes, const Tensor& hx_, const Tensor& cx_, const Tensor& w_ih_, const Tensor& w_hh_,
    const OptTensor& w_hr_, const Tensor& output_, const Tensor& gates_, const Tensor& cells_, bool reverse,
    bool has_bias) {
  constexpr const char* op = "gatedrnn::lstm_backward";
  const LayerShape s = check_layer_args(op, kGates, input_, batch_sizes, hx_, w_ih_, w_hh_, std::nullopt,
                                        std::nullopt, w_hr_);
  const auto dtype = compute_dtype(input_.scalar_type());
  check_shape(op, cx_, {s.batch, s.hidden}, "cx");
  check_shape(op, grad_hy_, {s.batch, s.state}, "grad_hy");
  check_shape(op, grad_cy_, {s.batch, s.hidden}, "grad_cy");
  TORCH_CHECK(grad_output_.numel() == s.rows * s.state && output_.numel() == s.rows * s.state, op,
              ": grad_output and output must have ", s.rows * s.state, " elements");
  TORCH_CHECK(gates_.numel() == s.rows * kGates * s.hidden && cells_.numel() == s.rows * s.hidden &&
                  gates_.scalar_type() == dtype && cells_.scalar_type() == dtype,
              op, ": saved activations are missing or have the wrong size; was the forward called with "
              "save_for_backward=True?");

  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto w_hr = to_compute(w_hr_, dtype);
  const auto hx = to_compute(hx_, dtype), cx = to_compute(cx_, dtype);
  const auto grad_out2d = to_compute(grad_output_, dtype).view({s.rows, s.state});
  const auto output2d = to_compute(output_, dtype).view({s.rows, s.state});
  const auto gates = gates_.contiguous().view({s.rows, kGates * s.hidden});
  const auto cells = cells_.contiguous().view({s.rows, s.hidden});
  auto dh = grad_hy_.to(dtype, false, true).contiguous();
  auto dc = grad_cy_.to(dtype, false, true).contiguous();

  auto d_gates = at::empty({s.rows, kGates * s.hidden}, input.options());
  const bool proj = w_hr.has_value();
  auto d_proj = proj ? at::empty({s.rows, s.state}, input.options()) : Tensor();
  auto hidden_pre_proj = proj ? at::empty({s.rows, s.hidden}, input.options()) : Tensor();

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_lstm_backward_cpu", [&] {
    lstm_backward_loop<scalar_t>(schedule, s, grad_out2d, gates, cells, cx, w_hh, w_hr, d_gates, dh, dc, d_proj,
                                 hidden_pre_proj);
  });

  const auto storage = input_.scalar_type();
  const auto x2d = input.view({s.rows, s.input_size});
  auto grad_input = at::mm(d_gates, w_ih).view(input_.sizes()).to(storage);
  auto grad_w_ih = at::mm(d_gates.t(), x2d).to(storage);
  auto grad_w_hh = at::mm(d_gates.t(), gather_previous_states(schedule, output2d, hx)).to(storage);
  auto grad_bias = has_bias ? d_gates.sum(0).to(storage) : at::empty({0}, input_.options());
  auto grad_w_hr = proj ? at::mm(d_proj.t(), hidden_pre_proj).to(storage) : at::empty({0}, input_.options());
  return {grad_input, dh.to(storage), dc.to(storage), grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(gatedrnn, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
}

}  // namespace gatedrnn::cpu
