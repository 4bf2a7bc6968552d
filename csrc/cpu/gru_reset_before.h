// The CPU time loops of the GRU with reset_after=False (cells.h, "GRU, reset before the product"), called by
// gru.cpp's ops; gru_reset_before.cpp has them. Both compute in T = x2d's dtype (float or double).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "../checks.h"
#include "../sequence.h"

namespace gatedrnn::cpu {

// Forward over the schedule. bias: [3H] b_ih + b_hh (all of b_hh enters the pre-activations directly here), or
// none. saved: [N, 4H] when `save` (r, z, n, rh written), else ignored. output2d [N, H] and hy [B, H] are
// written; hy starts as h0.
void gru_reset_before_forward(const std::vector<Step>& schedule, const LayerShape& s, const at::Tensor& x2d,
                              const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                              const at::Tensor& h0, at::Tensor& saved, at::Tensor& output2d, at::Tensor& hy, bool save,
                              const std::optional<at::Tensor>& zoneout,
                              const std::optional<at::Tensor>& recurrent_mask);

// Backward over the schedule: fills d_gates [N, 4H] with [dr, dz, dn, dn] (gru_layer_grads' layout, whose
// hidden-side n gradient is dn itself here) and leaves in `carry` (grad_hy in) the gradient reaching h0 except
// the part through W_h[rz], which the caller adds.
void gru_reset_before_backward(const std::vector<Step>& schedule, const LayerShape& s, const at::Tensor& grad_out2d,
                               const at::Tensor& saved, const at::Tensor& output2d, const at::Tensor& h0,
                               const at::Tensor& w_hh, at::Tensor& d_gates, at::Tensor& carry,
                               const std::optional<at::Tensor>& zoneout,
                               const std::optional<at::Tensor>& recurrent_mask);

}  // namespace gatedrnn::cpu
