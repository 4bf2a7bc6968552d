// What every device's ops do around their implementation, once for CPU and CUDA: padded input with
// `lengths` (run as the packed sequence, padded.h); weight dropout (DropConnect on W_hh, the op's
// `weight_hh_mask`: one mask for the whole call, AWD-LSTM's; the implementation runs on W_hh * mask and the
// gradient reaching the unmasked parameter is the masked weight's times the mask); input dropout (`input_mask`
// [B, I], one mask per sequence held over all steps, Keras' `dropout`: the implementation runs on x * mask, and
// the input's gradient is the dropped input's times the mask). The implementations do the rest, recurrent
// dropout (`recurrent_mask`) included: csrc/cpu/{lstm,gru}.cpp and csrc/cuda/{lstm,gru}.cu register these
// templates over their own functions.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <tuple>

#include "padded.h"

namespace gatedrnn {

// The weight W_hh the implementation runs on: weight_hh * mask with weight dropout, else weight_hh itself.
inline at::Tensor dropped_weight(const char* op, const at::Tensor& w_hh, const OptTensor& mask) {
  if (!mask.has_value()) return w_hh;
  TORCH_CHECK(mask->sizes() == w_hh.sizes() && mask->scalar_type() == w_hh.scalar_type() &&
                  mask->device() == w_hh.device(),
              op, ": expected weight_hh_mask to be like weight_hh (", w_hh.scalar_type(), " ", w_hh.sizes(), " on ",
              w_hh.device(), "), but got ", mask->scalar_type(), " ", mask->sizes(), " on ", mask->device());
  return w_hh * *mask;
}

// Input dropout: every row of the (dense or packed) input times its sequence's mask.
inline at::Tensor dropped_input(const char* op, const at::Tensor& input, const OptTensor& batch_sizes,
                                const OptTensor& mask) {
  if (!mask.has_value()) return input;
  TORCH_CHECK(input.dim() == (batch_sizes.has_value() ? 2 : 3), op, ": input must be ",
              batch_sizes.has_value() ? "2-D (packed)" : "3-D (dense)", ", but got ", input.dim(), "-D");
  int64_t batch = input.size(1);  // dense [T, B, I]
  if (batch_sizes.has_value()) batch = batch_sizes->numel() ? batch_sizes->select(0, 0).item<int64_t>() : 0;
  check_sequence_mask(op, input, mask, input.scalar_type(), batch, input.size(-1), "input_mask");
  return times_sequence_rows(input.reshape({-1, input.size(-1)}), *mask, batch_sizes).view(input.sizes());
}

// The input's gradient from the dropped input's (one not asked for, 1-D and empty, stays so).
inline at::Tensor undropped_input_grad(const at::Tensor& grad, const OptTensor& batch_sizes, const OptTensor& mask) {
  if (!mask.has_value() || grad.dim() < 2) return grad;
  return times_sequence_rows(grad.reshape({-1, grad.size(-1)}), *mask, batch_sizes).view(grad.sizes());
}

// The gradient of the unmasked weight from that of the masked one (empty when not asked for stays empty).
inline at::Tensor undropped_grad(const at::Tensor& grad, const OptTensor& mask) {
  return mask.has_value() && grad.numel() > 0 ? grad * *mask : grad;
}

// The device implementations' signatures: the ops' without `lengths`, `weight_hh_mask` and `input_mask`, and the
// forward with one more argument, the number of rows to allocate for saved activations (0: as many as the input
// has), before the GRU's reset_after.
using LstmForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LstmForward = LstmForwardResult (*)(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                          const OptTensor&, bool, bool, const OptTensor&, const OptTensor&,
                                          const OptTensor&, int64_t);
using LstmBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LstmBackward = LstmBackwardResult (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, bool, std::array<bool, 3>,
                                            const OptTensor&, const OptTensor&, const OptTensor&);
using GruForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using GruForward = GruForwardResult (*)(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const OptTensor&, const OptTensor&, bool, bool,
                                        const OptTensor&, const OptTensor&, int64_t, bool);
using GruBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using GruBackward = GruBackwardResult (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, bool, std::array<bool, 3>, const OptTensor&,
                                          const OptTensor&, bool);

template <LstmForward Impl>
LstmForwardResult lstm_forward_op(const at::Tensor& input, const OptTensor& batch_sizes, const at::Tensor& hx,
                                  const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                  const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, bool reverse,
                                  bool save, const OptTensor& lengths, const OptTensor& zoneout,
                                  const OptTensor& zoneout_cell, const OptTensor& weight_hh_mask,
                                  const OptTensor& recurrent_mask, const OptTensor& input_mask) {
  constexpr const char* op = "gatedrnn::lstm_forward";
  const auto w_hh_run = dropped_weight(op, w_hh, weight_hh_mask);
  const auto x_run = dropped_input(op, input, batch_sizes, input_mask);
  const auto plan = maybe_plan_packing(op, input, batch_sizes, lengths);
  if (!plan) {
    return Impl(x_run, batch_sizes, hx, cx, w_ih, w_hh_run, b_ih, b_hh, w_hr, reverse, save, zoneout, zoneout_cell,
                recurrent_mask, 0);
  }
  const PackedPlan& p = *plan;
  auto [output, hy, cy, gates, cells] =
      Impl(gather_packed(p, x_run), p.batch_sizes, to_packed_order(op, p, hx, "hx"), to_packed_order(op, p, cx, "cx"),
           w_ih, w_hh_run, b_ih, b_hh, w_hr, reverse, save, gather_packed(p, zoneout), gather_packed(p, zoneout_cell),
           packed_order(op, p, recurrent_mask), p.steps * p.batch);
  return {scatter_padded(p, output), to_padded_order(p, hy), to_padded_order(p, cy), gates, cells};
}

template <LstmBackward Impl>
LstmBackwardResult lstm_backward_op(const at::Tensor& grad_output, const at::Tensor& grad_hy,
                                    const at::Tensor& grad_cy, const at::Tensor& input, const OptTensor& batch_sizes,
                                    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                                    const at::Tensor& w_hh, const OptTensor& w_hr, const at::Tensor& output,
                                    const at::Tensor& gates, const at::Tensor& cells, bool reverse,
                                    std::array<bool, 3> output_mask, const OptTensor& lengths,
                                    const OptTensor& zoneout, const OptTensor& zoneout_cell,
                                    const OptTensor& weight_hh_mask, const OptTensor& recurrent_mask,
                                    const OptTensor& input_mask) {
  constexpr const char* op = "gatedrnn::lstm_backward";
  const auto w_hh_run = dropped_weight(op, w_hh, weight_hh_mask);
  const auto x_run = dropped_input(op, input, batch_sizes, input_mask);
  const auto plan = maybe_plan_packing(op, input, batch_sizes, lengths);
  if (!plan) {
    auto grads = Impl(grad_output, grad_hy, grad_cy, x_run, batch_sizes, hx, cx, w_ih, w_hh_run, w_hr, output, gates,
                      cells, reverse, output_mask, zoneout, zoneout_cell, recurrent_mask);
    std::get<0>(grads) = undropped_input_grad(std::get<0>(grads), batch_sizes, input_mask);
    std::get<4>(grads) = undropped_grad(std::get<4>(grads), weight_hh_mask);
    return grads;
  }
  const PackedPlan& p = *plan;
  auto [d_input, d_hx, d_cx, d_w_ih, d_w_hh, d_bias, d_w_hr] =
      Impl(gather_packed(p, grad_output), to_packed_order(op, p, grad_hy, "grad_hy"),
           to_packed_order(op, p, grad_cy, "grad_cy"), gather_packed(p, x_run), p.batch_sizes,
           to_packed_order(op, p, hx, "hx"), to_packed_order(op, p, cx, "cx"), w_ih, w_hh_run, w_hr,
           gather_packed(p, output), packed_saved(op, p, gates), packed_saved(op, p, cells), reverse, output_mask,
           gather_packed(p, zoneout), gather_packed(p, zoneout_cell), packed_order(op, p, recurrent_mask));
  return {undropped_input_grad(padded_grad(p, d_input), batch_sizes, input_mask), to_padded_order(p, d_hx),
          to_padded_order(p, d_cx), d_w_ih, undropped_grad(d_w_hh, weight_hh_mask), d_bias, d_w_hr};
}

template <GruForward Impl>
GruForwardResult gru_forward_op(const at::Tensor& input, const OptTensor& batch_sizes, const at::Tensor& hx,
                                const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                                const OptTensor& b_hh, bool reverse, bool save, const OptTensor& lengths,
                                const OptTensor& zoneout, const OptTensor& weight_hh_mask,
                                const OptTensor& recurrent_mask, const OptTensor& input_mask, bool reset_after) {
  constexpr const char* op = "gatedrnn::gru_forward";
  const auto w_hh_run = dropped_weight(op, w_hh, weight_hh_mask);
  const auto x_run = dropped_input(op, input, batch_sizes, input_mask);
  const auto plan = maybe_plan_packing(op, input, batch_sizes, lengths);
  if (!plan) {
    return Impl(x_run, batch_sizes, hx, w_ih, w_hh_run, b_ih, b_hh, reverse, save, zoneout, recurrent_mask, 0,
                reset_after);
  }
  const PackedPlan& p = *plan;
  auto [output, hy, saved] =
      Impl(gather_packed(p, x_run), p.batch_sizes, to_packed_order(op, p, hx, "hx"), w_ih, w_hh_run, b_ih, b_hh,
           reverse, save, gather_packed(p, zoneout), packed_order(op, p, recurrent_mask), p.steps * p.batch,
           reset_after);
  return {scatter_padded(p, output), to_padded_order(p, hy), saved};
}

template <GruBackward Impl>
GruBackwardResult gru_backward_op(const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& input,
                                  const OptTensor& batch_sizes, const at::Tensor& hx, const at::Tensor& w_ih,
                                  const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& saved,
                                  bool reverse, std::array<bool, 3> output_mask, const OptTensor& lengths,
                                  const OptTensor& zoneout, const OptTensor& weight_hh_mask,
                                  const OptTensor& recurrent_mask, const OptTensor& input_mask, bool reset_after) {
  constexpr const char* op = "gatedrnn::gru_backward";
  const auto w_hh_run = dropped_weight(op, w_hh, weight_hh_mask);
  const auto x_run = dropped_input(op, input, batch_sizes, input_mask);
  const auto plan = maybe_plan_packing(op, input, batch_sizes, lengths);
  if (!plan) {
    auto grads = Impl(grad_output, grad_hy, x_run, batch_sizes, hx, w_ih, w_hh_run, output, saved, reverse,
                      output_mask, zoneout, recurrent_mask, reset_after);
    std::get<0>(grads) = undropped_input_grad(std::get<0>(grads), batch_sizes, input_mask);
    std::get<3>(grads) = undropped_grad(std::get<3>(grads), weight_hh_mask);
    return grads;
  }
  const PackedPlan& p = *plan;
  auto [d_input, d_hx, d_w_ih, d_w_hh, d_b_ih, d_b_hh] =
      Impl(gather_packed(p, grad_output), to_packed_order(op, p, grad_hy, "grad_hy"), gather_packed(p, x_run),
           p.batch_sizes, to_packed_order(op, p, hx, "hx"), w_ih, w_hh_run, gather_packed(p, output),
           packed_saved(op, p, saved), reverse, output_mask, gather_packed(p, zoneout),
           packed_order(op, p, recurrent_mask), reset_after);
  return {undropped_input_grad(padded_grad(p, d_input), batch_sizes, input_mask), to_padded_order(p, d_hx), d_w_ih,
          undropped_grad(d_w_hh, weight_hh_mask), d_b_ih, d_b_hh};
}

}  // namespace gatedrnn
