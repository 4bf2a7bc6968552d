// LSTM on CUDA: one layer and direction over the whole sequence.
//
// Forward: x @ W_ih^T for every step is one cuBLAS GEMM before the loop. Each step is then one launch of
// lstm_forward_step: every block computes h_{t-1} @ W_hh^T for all four gates of its 32 hidden units
// (step_tile.cuh) and applies the cell update (cells.h) in registers; only h_t, the float cell state, and when
// training the activations backward needs are written. With proj_size, a GEMM per step projects h_t.
// Backward: each step is one launch of lstm_backward_step, which computes the gradient reaching h_t through
// W_hh (dG_{t+1} @ W_hh, from the step processed before it) and applies the pointwise derivative in the same
// kernel; input, weight and bias gradients are GEMMs after the loop (layer_grads.h). No kernel allocates,
// synchronises the host or uses atomics: results are deterministic and a training step can be captured in a
// CUDA graph. The launches and GEMMs all run on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../cells.h"
#include "../checks.h"
#include "../layer_grads.h"
#include "../op_entry.h"
#include "../sequence.h"
#include "launch.h"
#include "layer_norm_ops.h"
#include "platform.h"
#include "step_tile.cuh"

namespace gatedrnn::cuda {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

constexpr int kGates = 4;

// ------------------------------------------------------------------------------------------- forward
template <typename scalar_t>
struct LstmForwardStep {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* w_tiles;  // forward_weight_tiles(W_hh): [tiles][R][4][32]
  const scalar_t* x_proj;   // [N, 4H]: x @ W_ih^T (aliases `gates` when scalar_t is acc_t and saving)
  const acc_t* bias;        // [4H]: b_ih + b_hh, or null
  const scalar_t* h0;       // [B, R]
  scalar_t* output;         // [N, R]: h_t; the previous step's rows are this step's h_{t-1}
  scalar_t* hy;             // [B, R]: h_t of every row (without projection)
  scalar_t* pre_proj;       // [B, H]: h_t before the projection (written instead of output/hy), or null
  acc_t* c_state;           // [B, H]: c_{t-1} in, c_t out
  acc_t* gates;             // [N, 4H]: saved activations, or null
  acc_t* cells;             // [N, H]: saved c_t, or null
  ZoneoutKeep<acc_t> keep_h, keep_c;  // zoneout (cells.h), without a projection only
  // Recurrent dropout (without a projection): the product reads h_{t-1} * mask, which each step writes beside
  // h_t; all null without it.
  const acc_t* recurrent_mask;  // [B, R]: 0 or 1 / (1 - p), one per sequence and unit
  scalar_t* masked_output;      // [N, R]
  const scalar_t* masked_h0;    // [B, R]
  int64_t hidden, state;
  Step step;  // this step's rows (sequence.h)
};

template <typename scalar_t, int RPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) lstm_forward_step(const LstmForwardStep<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Storage = TileStorage<scalar_t, kGates, RPT>;
  GATEDRNN_TILE_STORAGE(tile, Storage);
  // h_{t-1} as the product reads it: the previous step's output row, or h0 for a row's first step (their
  // masked copies with recurrent dropout).
  const scalar_t* previous = p.masked_output ? p.masked_output : p.output;
  const scalar_t* first = p.masked_output ? p.masked_h0 : p.h0;
  const auto a_rows = tile_rows<scalar_t, RPT>(p.step.rows, [&](int64_t b) {
    return b < p.step.prev_rows ? previous + (p.step.prev_offset + b) * p.state : first + b * p.state;
  });
  acc_t acc[kGates][RPT] = {};
  tile_matmul(tile, p.w_tiles + int64_t(blockIdx.y) * p.state * kGates * kTileUnits, a_rows, p.state, acc);

  const int64_t H = p.hidden, j = tile_unit();
  if (j >= H) return;
  for_each_thread_row<RPT>(p.step.rows, [&](int i, int64_t b) {
    const int64_t row = p.step.offset + b;
    const scalar_t* x = p.x_proj + row * kGates * H + j;
    acc_t pre[kGates];
#pragma unroll
    for (int g = 0; g < kGates; ++g) {
      pre[g] = acc[g][i] + static_cast<acc_t>(x[g * H]) + (p.bias ? p.bias[g * H + j] : acc_t(0));
    }
    const auto a = lstm_activate<acc_t>(pre[0], pre[1], pre[2], pre[3]);
    const acc_t c_prev = p.c_state[b * H + j];
    acc_t c = lstm_cell_state(a, c_prev);
    acc_t h = lstm_hidden(a, c);
    if (p.keep_h.data) {  // both from the cell's own update (cells.h); R = H without a projection
      const scalar_t* h_prev =
          b < p.step.prev_rows ? p.output + (p.step.prev_offset + b) * p.state : p.h0 + b * p.state;
      h = zoneout(p.keep_h.at(row, j), static_cast<acc_t>(h_prev[j]), h);
    }
    if (p.keep_c.data) c = zoneout(p.keep_c.at(row, j), c_prev, c);
    p.c_state[b * H + j] = c;
    if (p.gates) {  // x was read above: overwriting it in place is safe
      acc_t* saved = p.gates + row * kGates * H + j;
      saved[0] = a.i;
      saved[H] = a.f;
      saved[2 * H] = a.g;
      saved[3 * H] = a.o;
      p.cells[row * H + j] = c;
    }
    if (p.pre_proj) {
      p.pre_proj[b * H + j] = static_cast<scalar_t>(h);
    } else {
      p.output[row * p.state + j] = static_cast<scalar_t>(h);
      p.hy[b * p.state + j] = static_cast<scalar_t>(h);
      if (p.masked_output) {
        p.masked_output[row * p.state + j] = static_cast<scalar_t>(h * p.recurrent_mask[b * p.state + j]);
      }
    }
  });
}

template <typename scalar_t>
constexpr auto lstm_forward_step_instance = [](auto rpt) {  // for launch_step
  return lstm_forward_step<scalar_t, decltype(rpt)::value>;
};

template <typename scalar_t>
void lstm_forward_loop(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& x_proj,
                       const OptTensor& bias, const Tensor& h0, const Tensor& w_hh, const OptTensor& w_hr,
                       Tensor& output2d, Tensor& hy, Tensor& c_state, Tensor& gates, Tensor& cells, bool save,
                       const OptTensor& zoneout, const OptTensor& zoneout_cell, const OptTensor& recurrent_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool proj = w_hr.has_value(), dropout = recurrent_mask.has_value();
  const auto w_tiles = forward_weight_tiles(w_hh, kGates, s.hidden);
  auto pre_proj = proj ? at::empty({s.batch, s.hidden}, output2d.options()) : Tensor();
  const auto masked_output = dropout ? at::empty_like(output2d) : Tensor();
  const auto masked_h0 = dropout ? (h0 * *recurrent_mask).to(h0.scalar_type()) : Tensor();
  LstmForwardStep<scalar_t> p{w_tiles.const_data_ptr<scalar_t>(),
                              x_proj.const_data_ptr<scalar_t>(),
                              data_or_null<acc_t>(bias),
                              h0.const_data_ptr<scalar_t>(),
                              output2d.data_ptr<scalar_t>(),
                              hy.data_ptr<scalar_t>(),
                              proj ? pre_proj.data_ptr<scalar_t>() : nullptr,
                              c_state.data_ptr<acc_t>(),
                              save ? gates.data_ptr<acc_t>() : nullptr,
                              save ? cells.data_ptr<acc_t>() : nullptr,
                              zoneout_keep<acc_t>(zoneout),
                              zoneout_keep<acc_t>(zoneout_cell),
                              data_or_null<acc_t>(recurrent_mask),
                              dropout ? masked_output.data_ptr<scalar_t>() : nullptr,
                              dropout ? masked_h0.const_data_ptr<scalar_t>() : nullptr,
                              s.hidden,
                              s.state,
                              Step{}};
  for (const Step& step : schedule) {
    p.step = step;
    launch_step(step.rows, s.hidden, lstm_forward_step_instance<scalar_t>, p);
    if (proj) {
      auto out_rows = output2d.narrow(0, step.offset, step.rows);
      at::mm_out(out_rows, pre_proj.narrow(0, 0, step.rows), w_hr->t());
      hy.narrow(0, 0, step.rows).copy_(out_rows);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_cuda(const Tensor& input_, const OptTensor& batch_sizes,
                                                                     const Tensor& hx_, const Tensor& cx_,
                                                                     const Tensor& w_ih_, const Tensor& w_hh_,
                                                                     const OptTensor& b_ih_, const OptTensor& b_hh_,
                                                                     const OptTensor& w_hr_, bool reverse, bool save,
                                                                     const OptTensor& zoneout,
                                                                     const OptTensor& zoneout_cell,
                                                                     const OptTensor& recurrent_mask_,
                                                                     int64_t saved_rows) {
  constexpr const char* op = "gatedrnn::lstm_forward";
  const LayerShape s = check_lstm_forward_args(op, input_, batch_sizes, hx_, cx_, w_ih_, w_hh_, b_ih_, b_hh_, w_hr_);
  check_lstm_zoneout(op, input_, s, w_hr_, zoneout, zoneout_cell);
  check_recurrent_mask(op, input_, s, w_hr_, recurrent_mask_);
  const auto recurrent_mask = contiguous_or_none(recurrent_mask_);
  check_cuda_layer(op, input_, s.hidden);
  const DeviceGuard guard(input_.device());
  const auto [input, w_ih, w_hh, h0, w_hr, dtype, acc_dtype] = contiguous_inputs(input_, w_ih_, w_hh_, hx_, w_hr_);
  const auto acc_options = input.options().dtype(acc_dtype);

  const int64_t G = kGates * s.hidden;
  // saved_rows (padded.h): the saved activations keep that many rows, these rows first.
  const auto gates_kept = saved_rows_tensor(save, s.rows, saved_rows, G, acc_options);
  const auto cells_kept = saved_rows_tensor(save, s.rows, saved_rows, s.hidden, acc_options);
  auto gates = save ? gates_kept.narrow(0, 0, s.rows) : gates_kept;
  auto cells = save ? cells_kept.narrow(0, 0, s.rows) : cells_kept;
  // In float32/float64 training the saved activations overwrite the input projection in place.
  auto x_proj = save && dtype == acc_dtype ? gates : at::empty({s.rows, G}, input.options());
  at::mm_out(x_proj, input.view({s.rows, s.input_size}), w_ih.t());
  const OptTensor bias = b_ih_.has_value() ? OptTensor((b_ih_->to(acc_dtype) + b_hh_->to(acc_dtype)).contiguous())
                                           : std::nullopt;
  auto output2d = at::empty({s.rows, s.state}, input.options());
  auto hy = h0.clone();  // rows are overwritten at every step they are active in
  auto c_state = cx_.to(acc_dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gatedrnn_lstm_forward_cuda", [&] {
    lstm_forward_loop<scalar_t>(schedule, s, x_proj, bias, h0, w_hh, w_hr, output2d, hy, c_state, gates, cells, save,
                                zoneout, zoneout_cell, recurrent_mask);
  });

  auto output_shape = input_.sizes().vec();
  output_shape.back() = s.state;
  return {output2d.view(output_shape), hy, c_state.to(dtype), gates_kept, cells_kept};
}

// ------------------------------------------------------------------------------------------ backward
template <typename scalar_t>
struct LstmBackwardStep {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* w_tiles;      // backward_weight_tiles(W_hh): [tiles][4H][32]
  const scalar_t* later_grads;  // d_gates rows of the step processed after this one (its row b: + b * 4H)
  int64_t later_rows;           // rows of this step that fed that later step (0: none, or with projection)
  const scalar_t* grad_h;       // gradient reaching h_t other than through W_hh: row b at + b * grad_h_stride
  int64_t grad_h_stride;
  acc_t* carry;                // [B, H] or null: grad_hy, for rows whose last step this is; then zero, or with
                               // zoneout the kept part k_h dh_t that reaches h_{t-1} directly
  const acc_t* gates;          // [N, 4H] saved activations
  const acc_t* cells;          // [N, H] saved c_t
  const acc_t* c0;             // [B, H]
  acc_t* dc_state;             // [B, H]: gradient reaching c_t in, c_{t-1} out
  scalar_t* d_gates;           // [N, 4H]: pre-activation gradients out
  scalar_t* pre_proj;          // [N, H]: recomputed h_t before the projection (for dW_hr), or null
  ZoneoutKeep<acc_t> keep_h, keep_c;  // zoneout (cells.h), without a projection only
  const acc_t* recurrent_mask;        // [B, H] with recurrent dropout (no projection), or null
  int64_t hidden;
  Step step;  // this step's rows (sequence.h)
};

template <typename scalar_t, int RPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) lstm_backward_step(const LstmBackwardStep<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Storage = TileStorage<scalar_t, 1, RPT>;
  GATEDRNN_TILE_STORAGE(tile, Storage);
  const int64_t H = p.hidden, G = kGates * H;
  acc_t acc[1][RPT] = {};
  later_rows_product(tile, p.w_tiles, p.later_grads, p.later_rows, G, G, acc);

  const int64_t j = tile_unit();
  if (j >= H) return;
  for_each_thread_row<RPT>(p.step.rows, [&](int i, int64_t b) {
    const int64_t row = p.step.offset + b;
    // Through W_hh the gradient reaches h_t * mask with recurrent dropout.
    const acc_t through_w_hh = p.recurrent_mask ? acc[0][i] * p.recurrent_mask[b * H + j] : acc[0][i];
    acc_t dh = through_w_hh + static_cast<acc_t>(p.grad_h[b * p.grad_h_stride + j]);
    if (p.carry) dh += p.carry[b * H + j];
    const acc_t* g = p.gates + row * G + j;
    const LstmGates<acc_t> a{g[0], g[H], g[2 * H], g[3 * H]};
    acc_t c = p.cells[row * H + j];
    // c_{t-1}: the previous step's saved cell state, or c0 for a row's first step.
    const acc_t c_prev = b < p.step.prev_rows ? p.cells[(p.step.prev_offset + b) * H + j] : p.c0[b * H + j];
    acc_t dc = p.dc_state[b * H + j], dc_kept = acc_t(0);
    if (p.keep_h.data || p.keep_c.data) {
      // The kept parts pass straight to step t-1 (h's through the carry); the rest goes through the cell's
      // own derivative at c~ = f c_{t-1} + i g, recomputed since c_t is saved zoned out (as on the CPU).
      const acc_t k_h = p.keep_h.at(row, j), k_c = p.keep_c.at(row, j);
      p.carry[b * H + j] = k_h * dh;
      dh *= acc_t(1) - k_h;
      dc_kept = k_c * dc;
      dc *= acc_t(1) - k_c;
      c = lstm_cell_state(a, c_prev);
    } else if (p.carry) {
      p.carry[b * H + j] = acc_t(0);
    }
    LstmGateGrads<acc_t> d;
    p.dc_state[b * H + j] = lstm_backward(a, c, c_prev, dh, dc, d) + dc_kept;
    scalar_t* dg = p.d_gates + row * G + j;
    dg[0] = static_cast<scalar_t>(d.i);
    dg[H] = static_cast<scalar_t>(d.f);
    dg[2 * H] = static_cast<scalar_t>(d.g);
    dg[3 * H] = static_cast<scalar_t>(d.o);
    if (p.pre_proj) p.pre_proj[row * H + j] = static_cast<scalar_t>(lstm_hidden(a, c));
  });
}

template <typename scalar_t>
constexpr auto lstm_backward_step_instance = [](auto rpt) {  // for launch_step
  return lstm_backward_step<scalar_t, decltype(rpt)::value>;
};

// Runs the backward time loop, filling d_gates (and d_proj/pre_proj with a projection); returns the
// gradient reaching h0, in acc dtype.
template <typename scalar_t>
Tensor lstm_backward_loop(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& grad_out2d,
                          const Tensor& grad_hy, const Tensor& gates, const Tensor& cells, const Tensor& c0,
                          const Tensor& w_hh, const OptTensor& w_hr, Tensor& dc_state, Tensor& d_gates, Tensor& d_proj,
                          Tensor& pre_proj, const OptTensor& zoneout, const OptTensor& zoneout_cell,
                          const OptTensor& recurrent_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = s.hidden, G = kGates * H;
  const bool proj = w_hr.has_value();
  const auto acc_dtype = at::toOpMathType(grad_out2d.scalar_type());
  LstmBackwardStep<scalar_t> p{};
  p.gates = gates.const_data_ptr<acc_t>();
  p.cells = cells.const_data_ptr<acc_t>();
  p.c0 = c0.const_data_ptr<acc_t>();
  p.dc_state = dc_state.data_ptr<acc_t>();
  p.d_gates = d_gates.data_ptr<scalar_t>();
  p.keep_h = zoneout_keep<acc_t>(zoneout);
  p.keep_c = zoneout_keep<acc_t>(zoneout_cell);
  p.recurrent_mask = data_or_null<acc_t>(recurrent_mask);
  p.hidden = H;

  if (proj) {
    // The projection needs all of dh_t before any unit's derivative: per step, the gradient reaching the
    // projected output (grad_output + dh_state) goes through W_hr, then the kernel runs with no GEMM of its
    // own, then dh_state = dG_t @ W_hh (as on the CPU). dh_state ends as the gradient reaching h0.
    auto dh_state = grad_hy.clone();
    auto dh_pre_proj = at::empty({s.batch, H}, grad_out2d.options());
    p.grad_h = dh_pre_proj.const_data_ptr<scalar_t>();
    p.grad_h_stride = H;
    p.pre_proj = pre_proj.data_ptr<scalar_t>();
    for (auto it = schedule.rbegin(); it != schedule.rend(); ++it) {
      const Step& step = *it;
      auto d_out_rows = d_proj.narrow(0, step.offset, step.rows);
      at::add_out(d_out_rows, grad_out2d.narrow(0, step.offset, step.rows), dh_state.narrow(0, 0, step.rows));
      auto dh_pre_rows = dh_pre_proj.narrow(0, 0, step.rows);
      at::mm_out(dh_pre_rows, d_out_rows, *w_hr);
      p.step = step;
      launch_step(step.rows, H, lstm_backward_step_instance<scalar_t>, p);
      auto dh_rows = dh_state.narrow(0, 0, step.rows);
      at::mm_out(dh_rows, d_gates.narrow(0, step.offset, step.rows), w_hh);
    }
    return dh_state.to(acc_dtype);
  }

  const auto w_tiles = backward_weight_tiles(w_hh);
  auto carry = grad_hy.to(acc_dtype, false, true).contiguous();
  p.w_tiles = w_tiles.const_data_ptr<scalar_t>();
  p.grad_h_stride = H;
  p.carry = carry.data_ptr<acc_t>();
  for (size_t k = schedule.size(); k-- > 0;) {
    const Step& step = schedule[k];
    const LaterStep later = later_step(schedule, k);
    p.later_grads = p.d_gates + later.offset * G;
    p.later_rows = later.rows;
    p.grad_h = grad_out2d.const_data_ptr<scalar_t>() + step.offset * H;
    p.step = step;
    launch_step(step.rows, H, lstm_backward_step_instance<scalar_t>, p);
  }
  // h0 reaches each row's first step through W_hh (the kernels zeroed the carry of every active row), and
  // directly with zoneout (the carry holds k_h dh of that step).
  add_initial_state_grad(carry, d_gates, w_hh, schedule, recurrent_mask);
  return carry;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_cuda(
    const Tensor& grad_output_, const Tensor& grad_hy_, const Tensor& grad_cy_, const Tensor& input_,
    const OptTensor& batch_sizes, const Tensor& hx_, const Tensor& cx_, const Tensor& w_ih_, const Tensor& w_hh_,
    const OptTensor& w_hr_, const Tensor& output_, const Tensor& gates_, const Tensor& cells_, bool reverse,
    std::array<bool, 3> output_mask, const OptTensor& zoneout, const OptTensor& zoneout_cell,
    const OptTensor& recurrent_mask_) {
  constexpr const char* op = "gatedrnn::lstm_backward";
  const LayerShape s = check_lstm_backward_args(op, grad_output_, grad_hy_, grad_cy_, input_, batch_sizes, hx_, cx_,
                                                w_ih_, w_hh_, w_hr_, output_, gates_, cells_);
  check_lstm_zoneout(op, input_, s, w_hr_, zoneout, zoneout_cell);
  check_recurrent_mask(op, input_, s, w_hr_, recurrent_mask_);
  const auto recurrent_mask = contiguous_or_none(recurrent_mask_);
  check_cuda_layer(op, input_, s.hidden);
  const DeviceGuard guard(input_.device());
  const auto [input, w_ih, w_hh, hx, w_hr, dtype, acc_dtype] = contiguous_inputs(input_, w_ih_, w_hh_, hx_, w_hr_);
  const auto cx = cx_.to(acc_dtype).contiguous();
  const auto grad_out2d = grad_output_.to(dtype).contiguous().view({s.rows, s.state});
  const auto grad_hy = grad_hy_.to(dtype).contiguous();
  const auto output2d = output_.contiguous().view({s.rows, s.state});
  const auto gates = gates_.contiguous(), cells = cells_.contiguous();
  auto dc_state = grad_cy_.to(acc_dtype, false, true).contiguous();

  auto d_gates = at::empty({s.rows, kGates * s.hidden}, input.options());
  const bool proj = w_hr.has_value();
  auto d_proj = proj ? at::empty({s.rows, s.state}, input.options()) : Tensor();
  auto pre_proj = proj ? at::empty({s.rows, s.hidden}, input.options()) : Tensor();

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  Tensor grad_h0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gatedrnn_lstm_backward_cuda", [&] {
    grad_h0 = lstm_backward_loop<scalar_t>(schedule, s, grad_out2d, grad_hy, gates, cells, cx, w_hh, w_hr, dc_state,
                                           d_gates, d_proj, pre_proj, zoneout, zoneout_cell, recurrent_mask);
  });

  const auto x2d = input.view({s.rows, s.input_size});
  // dW_hh from the states as the product read them.
  const auto [h_read, h0_read] = states_as_read(output2d, hx, recurrent_mask, batch_sizes);
  const LayerGradArgs args{x2d, w_ih, h_read, h0_read, schedule, !batch_sizes.has_value(),
                           reverse, output_mask, input_.sizes(), input_.options()};
  const auto g = lstm_layer_grads(args, d_gates, d_proj, pre_proj);
  return {g.input, grad_h0.to(dtype), dc_state.to(dtype), g.w_ih, g.w_hh, g.bias, g.w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(GATEDRNN_CUDA_LIBRARY, GATEDRNN_CUDA_DISPATCH_KEY, m) {
  m.impl("lstm_forward", &lstm_forward_op<lstm_forward_cuda, lstm_norm_forward_cuda>);
  m.impl("lstm_backward", &lstm_backward_op<lstm_backward_cuda, lstm_norm_backward_cuda>);
}

}  // namespace gatedrnn::cuda
