// The op schemas, for csrc/gatedrnn.cpp (torch.ops.gatedrnn) and for the CUDA emulation test library
// (torch.ops.gatedrnn_emulated, see csrc/cuda/platform.h).
//
// One forward op per layer and direction over the whole sequence, and its backward op. Dense input is
// [T, B, I]; packed input is [N, I] with `batch_sizes` (a PackedSequence's). Weights are passed exactly as
// torch.nn stores them. Dense input may come with `lengths`, one per batch row (padded.h). `zoneout` and
// `zoneout_cell` are keep values [rows, state] (cells.h), `weight_hh_mask` a DropConnect mask like weight_hh
// (op_entry.h), `recurrent_mask` [B, state] and `input_mask` [B, input_size] per-sequence dropout masks; the
// GRU's `reset_after` False is Cho et al.'s original cell (cells.h); `layer_norm` [2, norms * H] the gains and
// biases of the LayerNorm variant (layer_norm.h), whose saved tensors are wider and whose backward returns its
// gradient. A backward op gets the same ones as its forward. The forward returns, besides output and final state, the
// activations its backward needs (empty tensors when save_for_backward is false). The backward ops compute the
// gradients of the initial state always and, as output_mask says, those of the input, the weights and the
// biases; the gradients not asked for (and those of absent biases or projections) come back as empty tensors.
#pragma once

#include <torch/library.h>

namespace gatedrnn {

inline void define_ops(torch::Library& m) {
  m.def(
      "lstm_forward(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, bool reverse, bool save_for_backward, "
      "Tensor? lengths=None, Tensor? zoneout=None, Tensor? zoneout_cell=None, Tensor? weight_hh_mask=None, "
      "Tensor? recurrent_mask=None, Tensor? input_mask=None, Tensor? layer_norm=None) "
      "-> (Tensor output, Tensor hy, Tensor cy, Tensor gates, Tensor cells)");
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor? batch_sizes, "
      "Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, Tensor? weight_hr, Tensor output, Tensor gates, "
      "Tensor cells, bool reverse, bool[3] output_mask, Tensor? lengths=None, Tensor? zoneout=None, "
      "Tensor? zoneout_cell=None, Tensor? weight_hh_mask=None, Tensor? recurrent_mask=None, "
      "Tensor? input_mask=None, Tensor? layer_norm=None) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_weight_ih, Tensor grad_weight_hh, "
      "Tensor grad_bias, Tensor grad_weight_hr, Tensor grad_layer_norm)");
  m.def(
      "gru_forward(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, bool reverse, bool save_for_backward, Tensor? lengths=None, "
      "Tensor? zoneout=None, Tensor? weight_hh_mask=None, Tensor? recurrent_mask=None, Tensor? input_mask=None, "
      "bool reset_after=True, Tensor? layer_norm=None) "
      "-> (Tensor output, Tensor hy, Tensor saved)");
  m.def(
      "gru_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor? batch_sizes, Tensor hx, "
      "Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor saved, bool reverse, bool[3] output_mask, "
      "Tensor? lengths=None, Tensor? zoneout=None, Tensor? weight_hh_mask=None, Tensor? recurrent_mask=None, "
      "Tensor? input_mask=None, bool reset_after=True, Tensor? layer_norm=None) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, "
      "Tensor grad_bias_hh, Tensor grad_layer_norm)");
}

}  // namespace gatedrnn
