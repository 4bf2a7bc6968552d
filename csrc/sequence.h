// The time-step schedule of one layer and direction, shared by every forward and backward loop.
//
// Dense input [T, B, *] is handled as packed data [T*B, *] with batch_sizes = [B] * T, so one loop serves
// both. Packed data stores step t's rows contiguously from offset(t) = sum_{s<t} batch_sizes[s]; step t
// touches only its first batch_sizes[t] rows (batch_sizes shrink with t, as PyTorch packs them).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>
#include <vector>

namespace gatedrnn {

struct Step {
  int64_t offset;       // first row of this step in the packed data
  int64_t rows;         // active batch rows at this step
  int64_t prev_offset;  // first row of the step processed just before (its outputs feed this one)
  int64_t prev_rows;    // rows [0, prev_rows) take their previous state from prev_offset; the rest from h0/c0
};

// Steps in processing order: t = 0..T-1, or T-1..0 when `reverse`. In the reverse direction a sequence
// starts at its own last element: rows that become active at step t start from the initial state.
inline std::vector<Step> make_schedule(const std::optional<at::Tensor>& batch_sizes, int64_t dense_steps,
                                       int64_t dense_batch, bool reverse) {
  std::vector<int64_t> sizes;
  if (batch_sizes.has_value()) {
    const auto& bs = *batch_sizes;
    auto acc = bs.accessor<int64_t, 1>();
    sizes.reserve(bs.size(0));
    for (int64_t t = 0; t < bs.size(0); ++t) sizes.push_back(acc[t]);
  } else {
    sizes.assign(dense_steps, dense_batch);
  }
  const int64_t T = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> offsets(T, 0);
  for (int64_t t = 1; t < T; ++t) offsets[t] = offsets[t - 1] + sizes[t - 1];

  std::vector<Step> steps;
  steps.reserve(T);
  for (int64_t k = 0; k < T; ++k) {
    const int64_t t = reverse ? T - 1 - k : k;
    Step s{offsets[t], sizes[t], 0, 0};
    if (k > 0) {
      const int64_t prev_t = reverse ? t + 1 : t - 1;
      s.prev_offset = offsets[prev_t];
      s.prev_rows = std::min(sizes[t], sizes[prev_t]);
    }
    steps.push_back(s);
  }
  return steps;
}

// rows2d [N, C] (dense input's T * B rows, or a packed sequence's rows) times the values of each row's sequence,
// per_sequence [B, C]: a per-sequence mask (recurrent and input dropout) applied at every step.
inline at::Tensor times_sequence_rows(const at::Tensor& rows2d, const at::Tensor& per_sequence,
                                      const std::optional<at::Tensor>& batch_sizes) {
  const int64_t B = per_sequence.size(0), C = per_sequence.size(1);
  if (B == 0 || rows2d.size(0) == 0) return rows2d.clone();
  if (!batch_sizes.has_value()) return (rows2d.reshape({-1, B, C}) * per_sequence).reshape({-1, C});
  auto result = at::empty_like(rows2d);
  const auto sizes = batch_sizes->contiguous();
  const int64_t* n = sizes.const_data_ptr<int64_t>();
  for (int64_t t = 0, offset = 0; t < sizes.size(0); offset += n[t], ++t) {
    auto rows = result.narrow(0, offset, n[t]);
    at::mul_out(rows, rows2d.narrow(0, offset, n[t]), per_sequence.narrow(0, 0, n[t]));
  }
  return result;
}

// The states every step's recurrent product read: h_{t-1} of each row and h0, times the recurrent dropout
// mask when there is one (for dW_hh).
inline std::pair<at::Tensor, at::Tensor> states_as_read(const at::Tensor& output2d, const at::Tensor& h0,
                                                        const std::optional<at::Tensor>& recurrent_mask,
                                                        const std::optional<at::Tensor>& batch_sizes) {
  if (!recurrent_mask.has_value()) return {output2d, h0};
  const auto mask = recurrent_mask->to(output2d.scalar_type());
  return {times_sequence_rows(output2d, mask, batch_sizes), h0 * mask};
}

}  // namespace gatedrnn
