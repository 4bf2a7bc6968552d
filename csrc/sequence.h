// The time-step schedule of one layer and direction, shared by every forward and backward loop.
//
// Dense input [T, B, *] is handled as packed data [T*B, *] with batch_sizes = [B] * T, so one loop serves
// both. Packed data stores step t's rows contiguously from offset(t) = sum_{s<t} batch_sizes[s]; step t
// touches only its first batch_sizes[t] rows (batch_sizes shrink with t, as PyTorch packs them).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
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

}  // namespace gatedrnn
