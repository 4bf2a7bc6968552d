// What a GRU backward step reads and writes besides its weights, in both forms of the cell: the plain GRU's
// BackwardTiles (gru.cpp) and the reset_after=False phases (gru_reset_before.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../cells.h"
#include "../checks.h"
#include "../sequence.h"
#include "products.h"

namespace gatedrnn::cpu {

template <typename T>
struct GruBackwardState {
  LaterRows<T> later;               // d_gates rows of the step processed before this one (the next in time)
  const T* saved;                   // [N, 4H]: the forward's saved activations
  RecurrentStates<const T> states;  // h_{t-1} of each row (unmasked)
  const T* grad_output;             // [N, H]
  T* carry;                         // [B, H]: grad_hy, then the gradient reaching h_{t-1} outside the product
  T* d_gates;                       // [N, 4H]: the pre-activation gradients
  ZoneoutKeep<T> keep;              // zoneout of h (cells.h), or none
  const T* recurrent_mask;          // [B, H] with recurrent dropout, or null
  int64_t hidden;
  Step step;
};

// `zeros`: [at least the later product's depth] zeros, the A row of rows whose state ended at a step.
template <typename T>
inline GruBackwardState<T> gru_backward_state(const at::Tensor& d_gates, const at::Tensor& zeros,
                                              const at::Tensor& saved, const at::Tensor& output2d,
                                              const at::Tensor& h0, const at::Tensor& grad_out2d, at::Tensor& carry,
                                              const std::optional<at::Tensor>& zoneout,
                                              const std::optional<at::Tensor>& recurrent_mask) {
  const int64_t H = h0.size(1);
  return {LaterRows<T>{d_gates.const_data_ptr<T>(), zeros.const_data_ptr<T>(), d_gates.size(1), 0, 0},
          saved.const_data_ptr<T>(),
          {h0.const_data_ptr<T>(), output2d.const_data_ptr<T>(), nullptr, nullptr, H},
          grad_out2d.const_data_ptr<T>(),
          carry.data_ptr<T>(),
          d_gates.data_ptr<T>(),
          zoneout_keep<T>(zoneout),
          recurrent_mask ? recurrent_mask->const_data_ptr<T>() : nullptr,
          H,
          Step{}};
}

}  // namespace gatedrnn::cpu
