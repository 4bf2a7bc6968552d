// CPU helpers shared by the LSTM and GRU loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../sequence.h"

namespace gatedrnn::cpu {

// Storage dtypes without a fast CPU GEMM of their own (bfloat16, float16) are computed in float32:
// states, gate math and accumulation all in float32, rounded once on output.
inline at::ScalarType compute_dtype(at::ScalarType storage) {
  return (storage == at::kBFloat16 || storage == at::kHalf) ? at::kFloat : storage;
}

inline at::Tensor to_compute(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

inline std::optional<at::Tensor> to_compute(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value()) return std::nullopt;
  return to_compute(*t, dtype);
}

inline at::Tensor rows_of(const at::Tensor& t, int64_t offset, int64_t rows) { return t.narrow(0, offset, rows); }

// Runs f(b, j) for every batch row b < rows and hidden unit j < hidden, in parallel. The grain keeps
// tiny steps (B=1, small H) on the calling thread, where a thread hand-off would cost more than the math.
template <typename F>
inline void for_each_unit(int64_t rows, int64_t hidden, const F& f) {
  constexpr int64_t kGrain = 16384;
  at::parallel_for(0, rows * hidden, kGrain, [&](int64_t begin, int64_t end) {
    int64_t b = begin / hidden;
    int64_t j = begin % hidden;
    for (int64_t k = begin; k < end; ++k) {
      f(b, j);
      if (++j == hidden) {
        j = 0;
        ++b;
      }
    }
  });
}

// The recurrent state each row saw on entry to its step, as one [N, R] matrix: the weight gradient
// dW_hh = dG^T H_prev is then a single GEMM after the backward loop.
inline at::Tensor gather_previous_states(const std::vector<Step>& schedule, const at::Tensor& output2d,
                                         const at::Tensor& h0) {
  auto prev = at::empty_like(output2d);
  for (const auto& s : schedule) {
    if (s.prev_rows > 0) rows_of(prev, s.offset, s.prev_rows).copy_(rows_of(output2d, s.prev_offset, s.prev_rows));
    if (s.rows > s.prev_rows) {
      rows_of(prev, s.offset + s.prev_rows, s.rows - s.prev_rows).copy_(rows_of(h0, s.prev_rows, s.rows - s.prev_rows));
    }
  }
  return prev;
}

}  // namespace gatedrnn::cpu
