// Argument validation at every op's entry (CPU and CUDA): the Python modules validate the way torch.nn
// does, but the ops are public (torch.ops.gatedrnn.*) and must never read out of bounds on bad input.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "cells.h"
#include "layer_norm.h"

namespace gatedrnn {

// Sizes of one layer-direction call. Dense input is [T, B, I]; packed input is [N, I] with batch_sizes.
struct LayerShape {
  int64_t rows;        // N: total rows of the (packed) sequence, T * B when dense
  int64_t steps;       // T
  int64_t batch;       // B: rows of the first (largest) step
  int64_t input_size;  // I
  int64_t hidden;      // H
  int64_t state;       // R: size of the recurrent state h (proj_size if projecting, else H)
};

inline void check_same_dtype_device(const char* op, const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " to have dtype ", ref.scalar_type(),
              " (the dtype of input), but got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " to be on ", ref.device(),
              " (the device of input), but got ", t.device());
}

inline void check_shape(const char* op, const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of size ", expected, ", but got ", t.sizes());
}

inline void check_float_dtype(const char* op, const at::Tensor& input) {
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": expected a floating point input (float32, float64, bfloat16 or float16), but got ", dt);
}

// Validates the packed layout: a 1-D int64 CPU tensor of positive, non-increasing sizes summing to N.
// Returns the largest batch (batch_sizes[0]).
inline int64_t check_batch_sizes(const char* op, const at::Tensor& batch_sizes, int64_t rows) {
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.scalar_type() == at::kLong && batch_sizes.device().is_cpu(), op,
              ": batch_sizes must be a 1-D int64 CPU tensor (as in a PackedSequence), but got a ", batch_sizes.dim(),
              "-D ", batch_sizes.scalar_type(), " tensor on ", batch_sizes.device());
  TORCH_CHECK(batch_sizes.size(0) > 0, op, ": batch_sizes must not be empty");
  const auto contiguous = batch_sizes.contiguous();
  const int64_t* bs = contiguous.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t t = 0; t < batch_sizes.size(0); ++t) {
    TORCH_CHECK(bs[t] > 0, op, ": batch_sizes must be positive, but batch_sizes[", t, "] = ", bs[t]);
    TORCH_CHECK(t == 0 || bs[t] <= bs[t - 1], op, ": batch_sizes must be non-increasing, but batch_sizes[", t,
                "] = ", bs[t], " > batch_sizes[", t - 1, "] = ", bs[t - 1]);
    total += bs[t];
  }
  TORCH_CHECK(total == rows, op, ": batch_sizes sum to ", total, " but the packed input has ", rows, " rows");
  return bs[0];
}

// Checks everything the forward ops share and returns the sizes. `gates` is 4 (LSTM) or 3 (GRU).
inline LayerShape check_layer_args(const char* op, int64_t gates, const at::Tensor& input,
                                   const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                                   const at::Tensor& w_ih, const at::Tensor& w_hh,
                                   const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                                   const std::optional<at::Tensor>& w_hr) {
  check_float_dtype(op, input);
  LayerShape s{};
  if (batch_sizes.has_value()) {
    TORCH_CHECK(input.dim() == 2, op, ": packed input must be 2-D [rows, input_size], but got ", input.dim(), "-D");
    s.rows = input.size(0);
    s.batch = check_batch_sizes(op, *batch_sizes, s.rows);
    s.steps = batch_sizes->size(0);
  } else {
    TORCH_CHECK(input.dim() == 3, op, ": dense input must be 3-D [seq_len, batch, input_size], but got ", input.dim(),
                "-D");
    s.steps = input.size(0);
    s.batch = input.size(1);
    s.rows = s.steps * s.batch;
  }
  s.input_size = input.size(-1);
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2, op, ": weights must be 2-D");
  TORCH_CHECK(w_ih.size(0) % gates == 0 && w_ih.size(0) > 0, op, ": weight_ih must have ", gates,
              " * hidden_size rows, but has ", w_ih.size(0));
  s.hidden = w_ih.size(0) / gates;
  s.state = s.hidden;
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(1) == s.hidden && w_hr->size(0) > 0, op,
                ": weight_hr must be [proj_size, ", s.hidden, "], but got ", w_hr->sizes());
    check_same_dtype_device(op, input, *w_hr, "weight_hr");
    s.state = w_hr->size(0);
  }
  check_same_dtype_device(op, input, w_ih, "weight_ih");
  check_same_dtype_device(op, input, w_hh, "weight_hh");
  check_same_dtype_device(op, input, h0, "hx");
  check_shape(op, w_ih, {gates * s.hidden, s.input_size}, "weight_ih");
  check_shape(op, w_hh, {gates * s.hidden, s.state}, "weight_hh");
  check_shape(op, h0, {s.batch, s.state}, "hx");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), op, ": bias_ih and bias_hh must be given together");
  if (b_ih.has_value()) {
    check_same_dtype_device(op, input, *b_ih, "bias_ih");
    check_same_dtype_device(op, input, *b_hh, "bias_hh");
    check_shape(op, *b_ih, {gates * s.hidden}, "bias_ih");
    check_shape(op, *b_hh, {gates * s.hidden}, "bias_hh");
  }
  return s;
}

// A tensor the op reads or writes besides the weights: it must be on the input's device (a kernel would
// otherwise read another device's memory) and have the expected number of elements.
inline void check_device_and_numel(const char* op, const at::Tensor& input, const at::Tensor& t, int64_t numel,
                                   const char* name) {
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name, " to be on ", input.device(),
              " (the device of input), but got ", t.device());
  TORCH_CHECK(t.numel() == numel, op, ": expected ", name, " to have ", numel, " elements, but got ", t.numel());
}

// Saved activations are kept in the op-math dtype: float32 for half/bfloat16 storage, else the input's dtype.
inline void check_saved(const char* op, const at::Tensor& input, const at::Tensor& saved, int64_t numel,
                        const char* name) {
  TORCH_CHECK(saved.device() == input.device() && saved.numel() == numel &&
                  saved.scalar_type() == at::toOpMathType(input.scalar_type()),
              op, ": saved activations (", name,
              ") are missing or have the wrong size, dtype or device; was the forward called with "
              "save_for_backward=True?");
}

// Zoneout keep values (cells.h): [rows, columns] in the op-math dtype, on the input's device, any strides.
inline void check_zoneout(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& keep,
                          int64_t rows, int64_t columns, const char* name) {
  if (!keep.has_value()) return;
  const auto expected = at::toOpMathType(input.scalar_type());
  TORCH_CHECK(keep->scalar_type() == expected && keep->device() == input.device(), op, ": expected ", name,
              " to be a ", expected, " tensor on ", input.device(), ", but got a ", keep->scalar_type(),
              " tensor on ", keep->device());
  TORCH_CHECK(keep->dim() == 2 && keep->size(0) == rows && keep->size(1) == columns, op, ": expected ", name,
              " of size [", rows, ", ", columns, "] (one value per input row and unit), but got ", keep->sizes());
}

template <typename acc_t>
ZoneoutKeep<acc_t> zoneout_keep(const std::optional<at::Tensor>& keep) {
  if (!keep.has_value()) return {};
  return {keep->const_data_ptr<acc_t>(), keep->stride(0), keep->stride(1)};
}

// The LSTM's zoneout acts on h and c as the recurrence sees them; with a projection h is another state.
inline void check_lstm_zoneout(const char* op, const at::Tensor& input, const LayerShape& s,
                               const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& zoneout,
                               const std::optional<at::Tensor>& zoneout_cell) {
  TORCH_CHECK(!w_hr.has_value() || (!zoneout.has_value() && !zoneout_cell.has_value()), op,
              ": zoneout with a projection (proj_size) is not supported");
  check_zoneout(op, input, zoneout, s.rows, s.hidden, "zoneout");
  check_zoneout(op, input, zoneout_cell, s.rows, s.hidden, "zoneout_cell");
}

// A per-sequence dropout mask (recurrent_mask [B, state], input_mask [B, input_size]): values 0 or 1 / (1 - p),
// in the op-math dtype (recurrent) or the input's (input), on the input's device.
inline void check_sequence_mask(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& mask,
                                at::ScalarType dtype, int64_t batch, int64_t columns, const char* name) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->scalar_type() == dtype && mask->device() == input.device(), op, ": expected ", name, " to be a ",
              dtype, " tensor on ", input.device(), ", but got a ", mask->scalar_type(), " tensor on ",
              mask->device());
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == batch && mask->size(1) == columns, op, ": expected ", name,
              " of size [", batch, ", ", columns, "] (one value per sequence and unit), but got ", mask->sizes());
}

inline void check_recurrent_mask(const char* op, const at::Tensor& input, const LayerShape& s,
                                 const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(!w_hr.has_value() || !mask.has_value(), op,
              ": recurrent dropout with a projection (proj_size) is not supported");
  check_sequence_mask(op, input, mask, at::toOpMathType(input.scalar_type()), s.batch, s.state, "recurrent_mask");
}

inline std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : t;
}

inline LayerShape check_lstm_forward_args(const char* op, const at::Tensor& input,
                                          const std::optional<at::Tensor>& batch_sizes, const at::Tensor& hx,
                                          const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                          const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                                          const std::optional<at::Tensor>& w_hr) {
  const LayerShape s = check_layer_args(op, 4, input, batch_sizes, hx, w_ih, w_hh, b_ih, b_hh, w_hr);
  check_same_dtype_device(op, input, cx, "cx");
  check_shape(op, cx, {s.batch, s.hidden}, "cx");
  return s;
}

inline LayerShape check_lstm_backward_args(const char* op, const at::Tensor& grad_output, const at::Tensor& grad_hy,
                                           const at::Tensor& grad_cy, const at::Tensor& input,
                                           const std::optional<at::Tensor>& batch_sizes, const at::Tensor& hx,
                                           const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                           const std::optional<at::Tensor>& w_hr, const at::Tensor& output,
                                           const at::Tensor& gates, const at::Tensor& cells,
                                           int64_t cells_width = 0) {
  const LayerShape s = check_lstm_forward_args(op, input, batch_sizes, hx, cx, w_ih, w_hh, std::nullopt, std::nullopt,
                                               w_hr);
  check_device_and_numel(op, input, grad_output, s.rows * s.state, "grad_output");
  check_device_and_numel(op, input, output, s.rows * s.state, "output");
  check_device_and_numel(op, input, grad_hy, s.batch * s.state, "grad_hy");
  check_shape(op, grad_hy, {s.batch, s.state}, "grad_hy");
  check_device_and_numel(op, input, grad_cy, s.batch * s.hidden, "grad_cy");
  check_shape(op, grad_cy, {s.batch, s.hidden}, "grad_cy");
  check_saved(op, input, gates, s.rows * 4 * s.hidden, "gates");
  // cells_width: columns per row, 0 for H (c_t); with layer_norm c_t and the norms (layer_norm.h).
  check_saved(op, input, cells, s.rows * (cells_width ? cells_width : s.hidden), "cells");
  return s;
}

inline LayerShape check_gru_backward_args(const char* op, const at::Tensor& grad_output, const at::Tensor& grad_hy,
                                          const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                                          const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                          const at::Tensor& output, const at::Tensor& saved,
                                          int64_t saved_width = 0) {
  const LayerShape s =
      check_layer_args(op, 3, input, batch_sizes, hx, w_ih, w_hh, std::nullopt, std::nullopt, std::nullopt);
  check_device_and_numel(op, input, grad_output, s.rows * s.hidden, "grad_output");
  check_device_and_numel(op, input, output, s.rows * s.hidden, "output");
  check_device_and_numel(op, input, grad_hy, s.batch * s.hidden, "grad_hy");
  check_shape(op, grad_hy, {s.batch, s.hidden}, "grad_hy");
  // saved_width: columns per row, 0 for 4H (r, z, n, hn); with layer_norm those and the norms (layer_norm.h).
  check_saved(op, input, saved, s.rows * (saved_width ? saved_width : 4 * s.hidden), "r, z, n, hn");
  return s;
}

// A layer_norm tensor (layer_norm.h): [2, norms * H], gains then biases, like the input and on its device.
inline void check_layer_norm(const char* op, const at::Tensor& input, const at::Tensor& layer_norm, int64_t columns) {
  TORCH_CHECK(layer_norm.scalar_type() == input.scalar_type() && layer_norm.device() == input.device(), op,
              ": expected layer_norm to be a ", input.scalar_type(), " tensor on ", input.device(), ", but got a ",
              layer_norm.scalar_type(), " tensor on ", layer_norm.device());
  TORCH_CHECK(layer_norm.dim() == 2 && layer_norm.size(0) == 2 && layer_norm.size(1) == columns, op,
              ": expected layer_norm of size [2, ", columns, "] (the norms' gains, then their biases), but got ",
              layer_norm.sizes());
}

// The layer_norm ops' entry checks, CPU and CUDA alike: the plain cell's (without a projection), zoneout's, the
// recurrent mask's and the layer_norm tensor's.
inline LayerShape check_lstm_norm_forward(const char* op, const at::Tensor& input,
                                          const std::optional<at::Tensor>& batch_sizes, const at::Tensor& hx,
                                          const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                          const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                                          const std::optional<at::Tensor>& zoneout,
                                          const std::optional<at::Tensor>& zoneout_cell,
                                          const std::optional<at::Tensor>& recurrent_mask,
                                          const at::Tensor& layer_norm) {
  const LayerShape s = check_lstm_forward_args(op, input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, std::nullopt);
  check_lstm_zoneout(op, input, s, std::nullopt, zoneout, zoneout_cell);
  check_recurrent_mask(op, input, s, std::nullopt, recurrent_mask);
  check_layer_norm(op, input, layer_norm, lstm_norm_columns(s.hidden));
  return s;
}

inline LayerShape check_lstm_norm_backward(
    const char* op, const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const std::optional<at::Tensor>& zoneout, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& recurrent_mask, const at::Tensor& layer_norm) {
  const int64_t width = lstm_norm_cells_width(w_hh.dim() == 2 ? w_hh.size(1) : 0);
  const LayerShape s = check_lstm_backward_args(op, grad_output, grad_hy, grad_cy, input, batch_sizes, hx, cx, w_ih,
                                                w_hh, std::nullopt, output, gates, cells, width);
  check_lstm_zoneout(op, input, s, std::nullopt, zoneout, zoneout_cell);
  check_recurrent_mask(op, input, s, std::nullopt, recurrent_mask);
  check_layer_norm(op, input, layer_norm, lstm_norm_columns(s.hidden));
  return s;
}

inline LayerShape check_gru_norm_forward(const char* op, const at::Tensor& input,
                                         const std::optional<at::Tensor>& batch_sizes, const at::Tensor& hx,
                                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                                         const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                                         const std::optional<at::Tensor>& zoneout,
                                         const std::optional<at::Tensor>& recurrent_mask,
                                         const at::Tensor& layer_norm) {
  const LayerShape s = check_layer_args(op, 3, input, batch_sizes, hx, w_ih, w_hh, b_ih, b_hh, std::nullopt);
  check_zoneout(op, input, zoneout, s.rows, s.hidden, "zoneout");
  check_recurrent_mask(op, input, s, std::nullopt, recurrent_mask);
  check_layer_norm(op, input, layer_norm, gru_norm_columns(s.hidden));
  return s;
}

inline LayerShape check_gru_norm_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& grad_hy,
                                          const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                                          const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                          const at::Tensor& output, const at::Tensor& saved,
                                          const std::optional<at::Tensor>& zoneout,
                                          const std::optional<at::Tensor>& recurrent_mask,
                                          const at::Tensor& layer_norm) {
  const int64_t width = gru_norm_saved_width(w_hh.dim() == 2 ? w_hh.size(1) : 0);
  const LayerShape s =
      check_gru_backward_args(op, grad_output, grad_hy, input, batch_sizes, hx, w_ih, w_hh, output, saved, width);
  check_zoneout(op, input, zoneout, s.rows, s.hidden, "zoneout");
  check_recurrent_mask(op, input, s, std::nullopt, recurrent_mask);
  check_layer_norm(op, input, layer_norm, gru_norm_columns(s.hidden));
  return s;
}

}  // namespace gatedrnn
