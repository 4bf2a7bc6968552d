// The CUDA time loops of the GRU with reset_after=False (cells.h, "GRU, reset before the product"), called by
// gru.cu's ops; gru_reset_before.cu has them.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "../sequence.h"

namespace gatedrnn::cuda {

// The tensors of a forward call, all contiguous, prepared by gru.cu's op as for the plain GRU.
struct GruResetBeforeForward {
  const at::Tensor& x_proj;  // [N, 3H]: x @ W_ih^T
  const at::Tensor& w_hh;    // [3H, H]
  const std::optional<at::Tensor>& b_ih;  // [3H] in the accumulation dtype, or none
  const std::optional<at::Tensor>& b_hh;
  const at::Tensor& h0;             // [B, H]
  at::Tensor& output2d;             // [N, H]
  at::Tensor& hy;                   // [B, H], h0's values in
  at::Tensor& saved;                // [N, 4H] (r, z, n, rh out) when saving, else empty
  const std::optional<at::Tensor>& zoneout;
  const std::optional<at::Tensor>& recurrent_mask;  // [B, H], or none (then the masked_* are undefined)
  const at::Tensor& masked_output;                  // [N, H]
  const at::Tensor& masked_h0;                      // [B, H]
};

void gru_reset_before_forward(const std::vector<Step>& schedule, const GruResetBeforeForward& f);

// Backward over the schedule: fills d_gates [N, 4H] with [dr, dz, dn, dn] (gru_layer_grads' layout) and
// leaves in carry ([B, H], accumulation dtype, grad_hy in) the gradient reaching h0 except the part through
// W_h[rz], which the caller adds.
void gru_reset_before_backward(const std::vector<Step>& schedule, const at::Tensor& grad_out2d,
                               const at::Tensor& saved, const at::Tensor& output2d, const at::Tensor& h0,
                               const at::Tensor& w_hh, at::Tensor& d_gates, at::Tensor& carry,
                               const std::optional<at::Tensor>& zoneout,
                               const std::optional<at::Tensor>& recurrent_mask);

}  // namespace gatedrnn::cuda
