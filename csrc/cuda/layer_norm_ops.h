// The CUDA implementations of the layer_norm LSTM and GRU (layer_norm.cu), with op_entry.h's LstmNorm* and
// GruNorm* signatures; lstm.cu and gru.cu register them beside the plain cells' under the same ops.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

#include "../op_entry.h"

namespace gatedrnn::cuda {

LstmForwardResult lstm_norm_forward_cuda(const at::Tensor& input, const OptTensor& batch_sizes, const at::Tensor& hx,
                                        const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                        const OptTensor& b_ih, const OptTensor& b_hh, const at::Tensor& layer_norm,
                                        bool reverse, bool save, const OptTensor& zoneout,
                                        const OptTensor& zoneout_cell, const OptTensor& recurrent_mask,
                                        int64_t saved_rows);

LstmBackwardResult lstm_norm_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_hy,
                                          const at::Tensor& grad_cy, const at::Tensor& input,
                                          const OptTensor& batch_sizes, const at::Tensor& hx, const at::Tensor& cx,
                                          const at::Tensor& w_ih, const at::Tensor& w_hh,
                                          const at::Tensor& layer_norm, const at::Tensor& output,
                                          const at::Tensor& gates, const at::Tensor& cells, bool reverse,
                                          std::array<bool, 3> output_mask, const OptTensor& zoneout,
                                          const OptTensor& zoneout_cell, const OptTensor& recurrent_mask);

GruForwardResult gru_norm_forward_cuda(const at::Tensor& input, const OptTensor& batch_sizes, const at::Tensor& hx,
                                      const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                                      const OptTensor& b_hh, bool reverse, bool save, const OptTensor& zoneout,
                                      const OptTensor& recurrent_mask, int64_t saved_rows,
                                      const at::Tensor& layer_norm);

GruNormBackwardResult gru_norm_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_hy,
                                            const at::Tensor& input, const OptTensor& batch_sizes,
                                            const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                            const at::Tensor& output, const at::Tensor& saved, bool reverse,
                                            std::array<bool, 3> output_mask, const OptTensor& zoneout,
                                            const OptTensor& recurrent_mask, const at::Tensor& layer_norm);

}  // namespace gatedrnn::cuda
