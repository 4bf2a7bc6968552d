// Host-side helpers of the CUDA ops: the once-per-call weight re-layout into block tiles, the per-step launch
// geometry, and the checks every CUDA entry makes beyond checks.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <type_traits>
#include <vector>

#include "../sequence.h"
#include "platform.h"
#include "step_tile.cuh"

namespace gatedrnn::cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A fresh contiguous copy of a re-laid-out view. Never the caller's memory (which .contiguous() would return
// when the view happens to be contiguous already): stage_chunk reads the tiles with vector loads of up to
// 16 bytes, and only a fresh allocation is sure to be aligned for them.
inline at::Tensor fresh_tiles(const at::Tensor& view) {
  auto tiles = at::empty(view.sizes(), view.options());
  tiles.copy_(view);
  return tiles;
}

// W_hh [G*H, R] as the forward kernels read it: [ceil(H/J)][R][G][J] (J = kTileUnits), so that the G*J rows
// of one block's hidden units are one contiguous slab, k-major. Units past H are zero rows.
inline at::Tensor forward_weight_tiles(const at::Tensor& w_hh, int64_t gates, int64_t hidden) {
  const int64_t R = w_hh.size(1), tiles = ceil_div(hidden, kTileUnits), padded = tiles * kTileUnits;
  auto w = w_hh.contiguous().view({gates, hidden, R});
  if (padded != hidden) w = at::constant_pad_nd(w, {0, 0, 0, padded - hidden});
  return fresh_tiles(w.view({gates, tiles, kTileUnits, R}).permute({1, 3, 0, 2}));
}

// W_hh [K, R], transposed, as the backward kernels read it (dh_{t-1} = dG_t @ W_hh, block tiles over the
// columns of W_hh): [ceil(R/J)][K][J], columns past R zero.
inline at::Tensor backward_weight_tiles(const at::Tensor& w_hh) {
  const int64_t K = w_hh.size(0), R = w_hh.size(1), tiles = ceil_div(R, kTileUnits), padded = tiles * kTileUnits;
  auto w = w_hh.contiguous();
  if (padded != R) w = at::constant_pad_nd(w, {0, padded - R});
  return fresh_tiles(w.view({K, tiles, kTileUnits}).permute({1, 0, 2}));
}

// Checks the CUDA entries add to checks.h: a CUDA input, and a grid the hardware can launch.
inline void check_cuda_layer(const char* op, const at::Tensor& input, int64_t units) {
  TORCH_CHECK(on_kernel_device(input), op, ": the CUDA kernel got input on ", input.device());
  TORCH_CHECK(ceil_div(units, kTileUnits) <= 65535, op, ": hidden_size ", units,
              " is too large for the CUDA kernels (at most ", 65535 * kTileUnits, ")");
}

// The tensors every CUDA entry reads, contiguous, and the dtypes it computes in: storage (the input's) and
// accumulation (float32 for half/bfloat16 storage, else the same).
struct LayerInputs {
  at::Tensor input, w_ih, w_hh, h0;
  std::optional<at::Tensor> w_hr;
  at::ScalarType dtype, acc_dtype;
};

inline LayerInputs contiguous_inputs(const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const at::Tensor& h0, const std::optional<at::Tensor>& w_hr) {
  return {input.contiguous(),
          w_ih.contiguous(),
          w_hh.contiguous(),
          h0.contiguous(),
          w_hr.has_value() ? std::optional<at::Tensor>(w_hr->contiguous()) : std::nullopt,
          input.scalar_type(),
          at::toOpMathType(input.scalar_type())};
}

// Launches one step's kernel over `rows` batch rows and `units` hidden units, with the rows per thread the
// step's size asks for (rows_per_thread): choose_kernel(std::integral_constant<int, RPT>{}) returns the kernel
// instance for RPT (each kernel file defines one such chooser per kernel template, NAME_instance<scalar_t>).
template <typename ChooseKernel, typename Params>
void launch_step(int64_t rows, int64_t units, const ChooseKernel& choose_kernel, const Params& params) {
  if (rows == 0) return;  // an empty batch: nothing to compute, and a zero grid is a launch error
  const int rpt = rows_per_thread(rows, ceil_div(units, kTileUnits), multiprocessor_count());
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, int64_t(kRowGroups) * rpt)),
                  static_cast<unsigned>(ceil_div(units, kTileUnits)));
  const dim3 block(kTileUnits, kRowGroups);
  if (rpt == 1) {
    launch_kernel(choose_kernel(std::integral_constant<int, 1>{}), grid, block, params);
  } else if (rpt == 2) {
    launch_kernel(choose_kernel(std::integral_constant<int, 2>{}), grid, block, params);
  } else {
    launch_kernel(choose_kernel(std::integral_constant<int, 4>{}), grid, block, params);
  }
}

// In backward order, step k's kernel also computes dG @ W_hh for the step processed just after it (in
// forward order): that step's first packed row, and how many of step k's rows fed it (its prev_rows; none
// after the last step).
struct LaterStep {
  int64_t offset = 0, rows = 0;
};

inline LaterStep later_step(const std::vector<Step>& schedule, size_t k) {
  if (k + 1 >= schedule.size()) return {};
  return {schedule[k + 1].offset, schedule[k + 1].prev_rows};
}

// Adds to grad_h0 the gradient reaching h0 through W_hh: each row's first step (processing order) is the
// only one that reads h0. d_hidden: [N, K] gradients of the recurrent pre-activations (K = rows of W_hh).
inline void add_initial_state_grad(at::Tensor& grad_h0, const at::Tensor& d_hidden, const at::Tensor& w_hh,
                                   const std::vector<Step>& schedule,
                                   const std::optional<at::Tensor>& recurrent_mask = std::nullopt) {
  for (const Step& step : schedule) {
    if (step.rows == step.prev_rows) continue;
    const int64_t first = step.prev_rows, count = step.rows - step.prev_rows;
    auto through_w_hh = at::mm(d_hidden.narrow(0, step.offset + first, count), w_hh);
    // With recurrent dropout the product read h0 * mask.
    if (recurrent_mask) through_w_hh.mul_(recurrent_mask->narrow(0, first, count));
    grad_h0.narrow(0, first, count).add_(through_w_hh);
  }
}

// A typed pointer to an optional tensor's data, or null.
template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

}  // namespace gatedrnn::cuda
