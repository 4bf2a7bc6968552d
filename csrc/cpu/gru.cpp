// GRU on the CPU: one layer and direction over the whole sequence.
//
// Forward: the input projection (with b_ih) of every step is one GEMM before the loop; each step is one
// GEMM for all three gates (h_{t-1} @ W_hh^T + b_hh, kept apart from the input side because n needs
// r * (W_hn h + b_hn)) and one fused parallel pass. Backward: per step one fused pass and one GEMM for
// dh_{t-1}; weight, bias and input gradients are single GEMMs/reductions after the loop.
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

constexpr int64_t kGates = 3;
constexpr int64_t kSaved = 4;  // r, z, n, hn per hidden unit

template <typename scalar_t>
void gru_forward_loop(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& input_proj,
                      Tensor& output2d, Tensor& hy, Tensor& saved, const Tensor& w_hh, const OptTensor& b_hh,
                      bool save) {
  const int64_t H = s.hidden, G = kGates * H;
  auto recurrent = at::empty({s.batch, G}, input_proj.options());
  const auto w_hh_t = w_hh.t();

  const scalar_t* gi_data = input_proj.const_data_ptr<scalar_t>();
  const scalar_t* gh_data = recurrent.const_data_ptr<scalar_t>();
  scalar_t* out_data = output2d.data_ptr<scalar_t>();
  scalar_t* h_data = hy.data_ptr<scalar_t>();
  scalar_t* saved_data = save ? saved.data_ptr<scalar_t>() : nullptr;

  for (const auto& step : schedule) {
    // hy holds h_{t-1} of every active row (see lstm.cpp).
    auto rec_rows = rows_of(recurrent, 0, step.rows);
    if (b_hh.has_value()) {
      at::addmm_out(rec_rows, *b_hh, rows_of(hy, 0, step.rows), w_hh_t);
    } else {
      at::mm_out(rec_rows, rows_of(hy, 0, step.rows), w_hh_t);
    }
    for_each_unit(step.rows, H, [&](int64_t b, int64_t j) {
      const int64_t row = step.offset + b;
      const scalar_t* gi = gi_data + row * G + j;
      const scalar_t* gh = gh_data + b * G + j;
      const auto a = gru_activate<scalar_t>(gi[0], gi[H], gi[2 * H], gh[0], gh[H], gh[2 * H]);
      const scalar_t h = gru_hidden(a, h_data[b * H + j]);
      h_data[b * H + j] = h;
      out_data[row * H + j] = h;
      if (save) {
        scalar_t* sv = saved_data + row * kSaved * H + j;
        sv[0] = a.r;
        sv[H] = a.z;
        sv[2 * H] = a.n;
        sv[3 * H] = a.hn;
      }
    });
  }
}

std::tuple<Tensor, Tensor, Tensor> gru_forward_cpu(const Tensor& input_, const OptTensor& batch_sizes,
                                                   const Tensor& hx_, const Tensor& w_ih_, const Tensor& w_hh_,
                                                   const OptTensor& b_ih_, const OptTensor& b_hh_, bool reverse,
                                                   bool save) {
  constexpr const char* op = "gatedrnn::gru_forward";
  const LayerShape s =
      check_layer_args(op, kGates, input_, batch_sizes, hx_, w_ih_, w_hh_, b_ih_, b_hh_, std::nullopt);
  const auto dtype = compute_dtype(input_.scalar_type());
  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto b_ih = to_compute(b_ih_, dtype), b_hh = to_compute(b_hh_, dtype);
  auto hy = hx_.to(dtype, false, true).contiguous();

  const auto x2d = input.view({s.rows, s.input_size});
  auto input_proj = b_ih.has_value() ? at::addmm(*b_ih, x2d, w_ih.t()) : at::mm(x2d, w_ih.t());
  auto output2d = at::empty({s.rows, s.hidden}, input.options());
  auto saved = save ? at::empty({s.rows, kSaved * s.hidden}, input.options()) : at::empty({0}, input.options());

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_gru_forward_cpu", [&] {
    gru_forward_loop<scalar_t>(schedule, s, input_proj, output2d, hy, saved, w_hh, b_hh, save);
  });

  auto output_shape = input_.sizes().vec();
  output_shape.back() = s.hidden;
  const auto storage = input_.scalar_type();
  return {output2d.view(output_shape).to(storage), hy.to(storage), saved};
}

template <typename scalar_t>
void gru_backward_loop(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& grad_out2d,
                       const Tensor& saved, const Tensor& prev_states, const Tensor& w_hh, Tensor& d_input_gates,
                       Tensor& d_hidden_gates, Tensor& dh) {
  const int64_t H = s.hidden, G = kGates * H;
  const scalar_t* saved_data = saved.const_data_ptr<scalar_t>();
  const scalar_t* prev_data = prev_states.const_data_ptr<scalar_t>();
  const scalar_t* grad_out_data = grad_out2d.const_data_ptr<scalar_t>();
  scalar_t* dgi_data = d_input_gates.data_ptr<scalar_t>();
  scalar_t* dgh_data = d_hidden_gates.data_ptr<scalar_t>();
  scalar_t* dh_data = dh.data_ptr<scalar_t>();

  for (auto it = schedule.rbegin(); it != schedule.rend(); ++it) {
    const Step& step = *it;
    for_each_unit(step.rows, H, [&](int64_t b, int64_t j) {
      const int64_t row = step.offset + b;
      const scalar_t* sv = saved_data + row * kSaved * H + j;
      const GruGates<scalar_t> a{sv[0], sv[H], sv[2 * H], sv[3 * H]};
      GruGateGrads<scalar_t> d_in, d_hid;
      const scalar_t d_h = grad_out_data[row * H + j] + dh_data[b * H + j];
      dh_data[b * H + j] = gru_backward(a, prev_data[row * H + j], d_h, d_in, d_hid);
      scalar_t* dgi = dgi_data + row * G + j;
      scalar_t* dgh = dgh_data + row * G + j;
      dgi[0] = d_in.r;
      dgi[H] = d_in.z;
      dgi[2 * H] = d_in.n;
      dgh[0] = d_hid.r;
      dgh[H] = d_hid.z;
      dgh[2 * H] = d_hid.n;
    });
    // dh_{t-1} = (direct part, written above) + dG_hidden @ W_hh
    rows_of(dh, 0, step.rows).addmm_(rows_of(d_hidden_gates, step.offset, step.rows), w_hh);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_cpu(
    const Tensor& grad_output_, const Tensor& grad_hy_, const Tensor& input_, const OptTensor& batch_sizes,
    const Tensor& hx_, const Tensor& w_ih_, const Tensor& w_hh_, const Tensor& output_, const Tensor& saved_,
    bool reverse, bool has_bias) {
  constexpr const char* op = "gatedrnn::gru_backward";
  const LayerShape s = check_layer_args(op, kGates, input_, batch_sizes, hx_, w_ih_, w_hh_, std::nullopt,
                                        std::nullopt, std::nullopt);
  const auto dtype = compute_dtype(input_.scalar_type());
  check_shape(op, grad_hy_, {s.batch, s.hidden}, "grad_hy");
  TORCH_CHECK(grad_output_.numel() == s.rows * s.hidden && output_.numel() == s.rows * s.hidden, op,
              ": grad_output and output must have ", s.rows * s.hidden, " elements");
  TORCH_CHECK(saved_.numel() == s.rows * kSaved * s.hidden && saved_.scalar_type() == dtype, op,
              ": saved activations are missing or have the wrong size; was the forward called with "
              "save_for_backward=True?");

  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto hx = to_compute(hx_, dtype);
  const auto grad_out2d = to_compute(grad_output_, dtype).view({s.rows, s.hidden});
  const auto output2d = to_compute(output_, dtype).view({s.rows, s.hidden});
  const auto saved = saved_.contiguous().view({s.rows, kSaved * s.hidden});
  auto dh = grad_hy_.to(dtype, false, true).contiguous();

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  const auto prev_states = gather_previous_states(schedule, output2d, hx);
  auto d_input_gates = at::empty({s.rows, kGates * s.hidden}, input.options());
  auto d_hidden_gates = at::empty({s.rows, kGates * s.hidden}, input.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_gru_backward_cpu", [&] {
    gru_backward_loop<scalar_t>(schedule, s, grad_out2d, saved, prev_states, w_hh, d_input_gates, d_hidden_gates,
                                dh);
  });

  const auto storage = input_.scalar_type();
  const auto x2d = input.view({s.rows, s.input_size});
  auto grad_input = at::mm(d_input_gates, w_ih).view(input_.sizes()).to(storage);
  auto grad_w_ih = at::mm(d_input_gates.t(), x2d).to(storage);
  auto grad_w_hh = at::mm(d_hidden_gates.t(), prev_states).to(storage);
  auto grad_b_ih = has_bias ? d_input_gates.sum(0).to(storage) : at::empty({0}, input_.options());
  auto grad_b_hh = has_bias ? d_hidden_gates.sum(0).to(storage) : at::empty({0}, input_.options());
  return {grad_input, dh.to(storage), grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

}  // namespace

TORCH_LIBRARY_IMPL(gatedrnn, CPU, m) {
  m.impl("gru_forward", &gru_forward_cpu);
  m.impl("gru_backward", &gru_backward_cpu);
}

}  // namespace gatedrnn::cpu
