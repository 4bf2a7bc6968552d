// What every device's ops do around their implementation, once for CPU and CUDA: padded input with
// `lengths` (run as the packed sequence, padded.h); weight dropout (DropConnect on W_hh, the op's
// `weight_hh_mask`: one mask for the whole call, AWD-LSTM's; the implementation runs on W_hh * mask and the
// gradient reaching the unmasked parameter is the masked weight's times the mask); input dropout (`input_mask`
// [B, I], one mask per sequence held over all steps, Keras' `dropout`: the implementation runs on x * mask, and
// the input's gradient is the dropped input's times the mask). The implementations do the rest, recurrent
// dropout (`recurrent_mask`) included: csrc/cpu/{lstm,gru}.cpp and csrc/cuda/{lstm,gru}.cu register these
// templates over their own functions; with `layer_norm`, over the device's layer_norm implementations
// (csrc/cpu/layer_norm.cpp), where it has them.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <tuple>
#include <type_traits>

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
// layer_norm (layer_norm.h) runs its own implementations, on the devices that have one: the ops' arguments
// with the layer_norm tensor in place of weight_hr (the LSTM's; it refuses a projection) or of reset_after
// (the GRU's; it is the reset_after=True cell), and as backward result the layer_norm tensor's gradient in
// place of weight_hr's (LSTM) or after the biases' (GRU).
// (Function types, so that a device declares its implementations with them: GATEDRNN_DECLARE_NORM_IMPLS.)
using LstmNormForwardFn = LstmForwardResult(const at::Tensor&, const OptTensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const OptTensor&, const OptTensor&, const at::Tensor&, bool, bool,
                                            const OptTensor&, const OptTensor&, const OptTensor&, int64_t);
using LstmNormBackwardFn = LstmBackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const OptTensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, bool, std::array<bool, 3>, const OptTensor&,
                                              const OptTensor&, const OptTensor&);
using LstmNormForward = LstmNormForwardFn*;
using LstmNormBackward = LstmNormBackwardFn*;
using GruForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using GruForward = GruForwardResult (*)(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const OptTensor&, const OptTensor&, bool, bool,
                                        const OptTensor&, const OptTensor&, int64_t, bool);
using GruBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using GruBackward = GruBackwardResult (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, bool, std::array<bool, 3>, const OptTensor&,
                                          const OptTensor&, bool);
using GruNormForwardFn = GruForwardResult(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const OptTensor&, const OptTensor&, bool, bool,
                                          const OptTensor&, const OptTensor&, int64_t, const at::Tensor&);
using GruNormBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using GruNormBackwardFn = GruNormBackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const OptTensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                                std::array<bool, 3>, const OptTensor&, const OptTensor&,
                                                const at::Tensor&);
using GruNormForward = GruNormForwardFn*;
using GruNormBackward = GruNormBackwardFn*;

// Declares a device's layer_norm implementations, {lstm,gru}_norm_{forward,backward}_SUFFIX, in the namespace
// it is used in (csrc/cpu/layer_norm_ops.h, csrc/cuda/layer_norm_ops.h).
#define GATEDRNN_DECLARE_NORM_IMPLS(SUFFIX)           \
  ::gatedrnn::LstmNormForwardFn lstm_norm_forward_##SUFFIX;   \
  ::gatedrnn::LstmNormBackwardFn lstm_norm_backward_##SUFFIX; \
  ::gatedrnn::GruNormForwardFn gru_norm_forward_##SUFFIX;     \
  ::gatedrnn::GruNormBackwardFn gru_norm_backward_##SUFFIX;
using LstmOpBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Whether an op template was given a device's layer_norm implementation (NormImpl, a function pointer) or
// none (nullptr). A type test, not `NormImpl != nullptr`: with the sanitizers GCC does not take an external
// function's address for a constant, so that comparison is no constant expression there.
template <auto NormImpl>
constexpr bool kHasNormImpl = !std::is_same_v<decltype(NormImpl), std::nullptr_t>;

// Refuses layer_norm where the device has no implementation of it, and what no implementation supports.
template <bool kHasImpl>
inline void check_layer_norm_runs(const char* op, const at::Tensor& input, const OptTensor& w_hr, bool reset_after) {
  TORCH_CHECK(kHasImpl, op, ": layer_norm has no kernel for ", input.device().type(),
              " tensors yet; run the layer on the CPU");
  TORCH_CHECK(!w_hr.has_value(), op, ": layer_norm does not support a projection (weight_hr, proj_size > 0)");
  TORCH_CHECK(reset_after, op, ": layer_norm does not support reset_after=False");
}

template <LstmForward Impl, auto NormImpl = nullptr>
LstmForwardResult lstm_forward_op(const at::Tensor& input, const OptTensor& batch_sizes, const at::Tensor& hx,
                                  const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                  const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, bool reverse,
                                  bool save, const OptTensor& lengths, const OptTensor& zoneout,
                                  const OptTensor& zoneout_cell, const OptTensor& weight_hh_mask,
                                  const OptTensor& recurrent_mask, const OptTensor& input_mask,
                                  const OptTensor& layer_norm) {
  constexpr const char* op = "gatedrnn::lstm_forward";
  static_assert(!kHasNormImpl<NormImpl> || std::is_same_v<decltype(NormImpl), LstmNormForward>);
  if (layer_norm) check_layer_norm_runs<kHasNormImpl<NormImpl>>(op, input, w_hr, true);
  const auto w_hh_run = dropped_weight(op, w_hh, weight_hh_mask);
  const auto run = [&](const at::Tensor& x, const OptTensor& sizes, const at::Tensor& h, const at::Tensor& c,
                       const OptTensor& keep_h, const OptTensor& keep_c, const OptTensor& mask, int64_t saved_rows) {
    if constexpr (kHasNormImpl<NormImpl>) {
      if (layer_norm) {
        return NormImpl(x, sizes, h, c, w_ih, w_hh_run, b_ih, b_hh, *layer_norm, reverse, save, keep_h, keep_c, mask,
                        saved_rows);
      }
    }
    return Impl(x, sizes, h, c, w_ih, w_hh_run, b_ih, b_hh, w_hr, reverse, save, keep_h, keep_c, mask, saved_rows);
  };
  const auto x_run = dropped_input(op, input, batch_sizes, input_mask);
  const auto plan = maybe_plan_packing(op, input, batch_sizes, lengths);
  if (!plan) return run(x_run, batch_sizes, hx, cx, zoneout, zoneout_cell, recurrent_mask, 0);
  const PackedPlan& p = *plan;
  auto [output, hy, cy, gates, cells] =
      run(gather_packed(p, x_run), p.batch_sizes, to_packed_order(op, p, hx, "hx"), to_packed_order(op, p, cx, "cx"),
          gather_packed(p, zoneout), gather_packed(p, zoneout_cell), packed_order(op, p, recurrent_mask),
          p.steps * p.batch);
  return {scatter_padded(p, output), to_padded_order(p, hy), to_padded_order(p, cy), gates, cells};
}

template <LstmBackward Impl, auto NormImpl = nullptr>
LstmOpBackwardResult lstm_backward_op(const at::Tensor& grad_output, const at::Tensor& grad_hy,
                                      const at::Tensor& grad_cy, const at::Tensor& input, const OptTensor& batch_sizes,
                                      const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                                      const at::Tensor& w_hh, const OptTensor& w_hr, const at::Tensor& output,
                                      const at::Tensor& gates, const at::Tensor& cells, bool reverse,
                                      std::array<bool, 3> output_mask, const OptTensor& lengths,
                                      const OptTensor& zoneout, const OptTensor& zoneout_cell,
                                      const OptTensor& weight_hh_mask, const OptTensor& recurrent_mask,
                                      const OptTensor& input_mask, const OptTensor& layer_norm) {
  constexpr const char* op = "gatedrnn::lstm_backward";
  static_assert(!kHasNormImpl<NormImpl> || std::is_same_v<decltype(NormImpl), LstmNormBackward>);
  if (layer_norm) check_layer_norm_runs<kHasNormImpl<NormImpl>>(op, input, w_hr, true);
  const auto w_hh_run = dropped_weight(op, w_hh, weight_hh_mask);
  // The implementation's gradients, the layer_norm tensor's last (empty without it).
  const auto run = [&](const at::Tensor& d_out, const at::Tensor& d_hy, const at::Tensor& d_cy, const at::Tensor& x,
                       const OptTensor& sizes, const at::Tensor& h, const at::Tensor& c, const at::Tensor& out,
                       const at::Tensor& saved_gates, const at::Tensor& saved_cells, const OptTensor& keep_h,
                       const OptTensor& keep_c, const OptTensor& mask) -> LstmOpBackwardResult {
    if constexpr (kHasNormImpl<NormImpl>) {
      if (layer_norm) {
        auto [d_x, d_h, d_c, d_w_ih, d_w_hh, d_bias, d_norm] =
            NormImpl(d_out, d_hy, d_cy, x, sizes, h, c, w_ih, w_hh_run, *layer_norm, out, saved_gates, saved_cells,
                     reverse, output_mask, keep_h, keep_c, mask);
        return {d_x, d_h, d_c, d_w_ih, d_w_hh, d_bias, at::empty({0}, d_bias.options()), d_norm};
      }
    }
    auto [d_x, d_h, d_c, d_w_ih, d_w_hh, d_bias, d_w_hr] =
        Impl(d_out, d_hy, d_cy, x, sizes, h, c, w_ih, w_hh_run, w_hr, out, saved_gates, saved_cells, reverse,
             output_mask, keep_h, keep_c, mask);
    return {d_x, d_h, d_c, d_w_ih, d_w_hh, d_bias, d_w_hr, at::empty({0}, d_bias.options())};
  };
  const auto x_run = dropped_input(op, input, batch_sizes, input_mask);
  const auto plan = maybe_plan_packing(op, input, batch_sizes, lengths);
  if (!plan) {
    auto grads = run(grad_output, grad_hy, grad_cy, x_run, batch_sizes, hx, cx, output, gates, cells, zoneout,
                     zoneout_cell, recurrent_mask);
    std::get<0>(grads) = undropped_input_grad(std::get<0>(grads), batch_sizes, input_mask);
    std::get<4>(grads) = undropped_grad(std::get<4>(grads), weight_hh_mask);
    return grads;
  }
  const PackedPlan& p = *plan;
  auto [d_input, d_hx, d_cx, d_w_ih, d_w_hh, d_bias, d_w_hr, d_norm] =
      run(gather_packed(p, grad_output), to_packed_order(op, p, grad_hy, "grad_hy"),
          to_packed_order(op, p, grad_cy, "grad_cy"), gather_packed(p, x_run), p.batch_sizes,
          to_packed_order(op, p, hx, "hx"), to_packed_order(op, p, cx, "cx"), gather_packed(p, output),
          packed_saved(op, p, gates), packed_saved(op, p, cells), gather_packed(p, zoneout),
          gather_packed(p, zoneout_cell), packed_order(op, p, recurrent_mask));
  return {undropped_input_grad(padded_grad(p, d_input), batch_sizes, input_mask), to_padded_order(p, d_hx),
          to_padded_order(p, d_cx), d_w_ih, undropped_grad(d_w_hh, weight_hh_mask), d_bias, d_w_hr, d_norm};
}

template <GruForward Impl, auto NormImpl = nullptr>
GruForwardResult gru_forward_op(const at::Tensor& input, const OptTensor& batch_sizes, const at::Tensor& hx,
                                const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                                const OptTensor& b_hh, bool reverse, bool save, const OptTensor& lengths,
                                const OptTensor& zoneout, const OptTensor& weight_hh_mask,
                                const OptTensor& recurrent_mask, const OptTensor& input_mask, bool reset_after,
                                const OptTensor& layer_norm) {
  constexpr const char* op = "gatedrnn::gru_forward";
  static_assert(!kHasNormImpl<NormImpl> || std::is_same_v<decltype(NormImpl), GruNormForward>);
  if (layer_norm) check_layer_norm_runs<kHasNormImpl<NormImpl>>(op, input, std::nullopt, reset_after);
  const auto w_hh_run = dropped_weight(op, w_hh, weight_hh_mask);
  const auto run = [&](const at::Tensor& x, const OptTensor& sizes, const at::Tensor& h, const OptTensor& keep,
                       const OptTensor& mask, int64_t saved_rows) {
    if constexpr (kHasNormImpl<NormImpl>) {
      if (layer_norm) {
        return NormImpl(x, sizes, h, w_ih, w_hh_run, b_ih, b_hh, reverse, save, keep, mask, saved_rows, *layer_norm);
      }
    }
    return Impl(x, sizes, h, w_ih, w_hh_run, b_ih, b_hh, reverse, save, keep, mask, saved_rows, reset_after);
  };
  const auto x_run = dropped_input(op, input, batch_sizes, input_mask);
  const auto plan = maybe_plan_packing(op, input, batch_sizes, lengths);
  if (!plan) return run(x_run, batch_sizes, hx, zoneout, recurrent_mask, 0);
  const PackedPlan& p = *plan;
  auto [output, hy, saved] = run(gather_packed(p, x_run), p.batch_sizes, to_packed_order(op, p, hx, "hx"),
                                 gather_packed(p, zoneout), packed_order(op, p, recurrent_mask), p.steps * p.batch);
  return {scatter_padded(p, output), to_padded_order(p, hy), saved};
}

template <GruBackward Impl, auto NormImpl = nullptr>
GruNormBackwardResult gru_backward_op(const at::Tensor& grad_output, const at::Tensor& grad_hy,
                                      const at::Tensor& input, const OptTensor& batch_sizes, const at::Tensor& hx,
                                      const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output,
                                      const at::Tensor& saved, bool reverse, std::array<bool, 3> output_mask,
                                      const OptTensor& lengths, const OptTensor& zoneout,
                                      const OptTensor& weight_hh_mask, const OptTensor& recurrent_mask,
                                      const OptTensor& input_mask, bool reset_after, const OptTensor& layer_norm) {
  constexpr const char* op = "gatedrnn::gru_backward";
  static_assert(!kHasNormImpl<NormImpl> || std::is_same_v<decltype(NormImpl), GruNormBackward>);
  if (layer_norm) check_layer_norm_runs<kHasNormImpl<NormImpl>>(op, input, std::nullopt, reset_after);
  const auto w_hh_run = dropped_weight(op, w_hh, weight_hh_mask);
  // The implementation's gradients, the layer_norm tensor's last (empty without it).
  const auto run = [&](const at::Tensor& d_out, const at::Tensor& d_hy, const at::Tensor& x, const OptTensor& sizes,
                       const at::Tensor& h, const at::Tensor& out, const at::Tensor& saved_rows,
                       const OptTensor& keep, const OptTensor& mask) -> GruNormBackwardResult {
    if constexpr (kHasNormImpl<NormImpl>) {
      if (layer_norm) {
        return NormImpl(d_out, d_hy, x, sizes, h, w_ih, w_hh_run, out, saved_rows, reverse, output_mask, keep, mask,
                        *layer_norm);
      }
    }
    auto [d_x, d_h, d_w_ih, d_w_hh, d_b_ih, d_b_hh] = Impl(d_out, d_hy, x, sizes, h, w_ih, w_hh_run, out, saved_rows,
                                                           reverse, output_mask, keep, mask, reset_after);
    return {d_x, d_h, d_w_ih, d_w_hh, d_b_ih, d_b_hh, at::empty({0}, d_h.options())};
  };
  const auto x_run = dropped_input(op, input, batch_sizes, input_mask);
  const auto plan = maybe_plan_packing(op, input, batch_sizes, lengths);
  if (!plan) {
    auto grads = run(grad_output, grad_hy, x_run, batch_sizes, hx, output, saved, zoneout, recurrent_mask);
    std::get<0>(grads) = undropped_input_grad(std::get<0>(grads), batch_sizes, input_mask);
    std::get<3>(grads) = undropped_grad(std::get<3>(grads), weight_hh_mask);
    return grads;
  }
  const PackedPlan& p = *plan;
  auto [d_input, d_hx, d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_norm] =
      run(gather_packed(p, grad_output), to_packed_order(op, p, grad_hy, "grad_hy"), gather_packed(p, x_run),
          p.batch_sizes, to_packed_order(op, p, hx, "hx"), gather_packed(p, output), packed_saved(op, p, saved),
          gather_packed(p, zoneout), packed_order(op, p, recurrent_mask));
  return {undropped_input_grad(padded_grad(p, d_input), batch_sizes, input_mask), to_padded_order(p, d_hx), d_w_ih,
          undropped_grad(d_w_hh, weight_hh_mask), d_b_ih, d_b_hh, d_norm};
}

}  // namespace gatedrnn
