// GRU on CUDA: one layer and direction over the whole sequence.
//
// The same structure as lstm.cu (read that first): x @ W_ih^T for every step as one GEMM, then per step one
// launch of gru_forward_step, which computes h_{t-1} @ W_hh^T for the three gates of its 32 hidden units and
// applies the update (cells.h) in registers. The biases are added in the kernel, b_hh's n part on the
// recurrent side (n needs r * (W_hn h + b_hn)). Backward: per step one launch of gru_backward_step, which
// computes [dr, dz, dhn]_{t+1} @ W_hh for its units, adds the direct part dh_{t+1} * z_{t+1} and the output
// gradient, and applies the pointwise derivative; input, weight and bias gradients after the loop
// (layer_grads.h). No allocation, host synchronisation or atomics inside the loop. reset_after=False (Cho et
// al.'s GRU) runs its own loops, gru_reset_before.cu, from the same ops.
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
#include "gru_reset_before.h"
#include "gru_steps.cuh"
#include "launch.h"
#include "layer_norm_ops.h"
#include "platform.h"
#include "step_tile.cuh"

namespace gatedrnn::cuda {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

constexpr int kGates = 3;
constexpr int kSaved = 4;  // r, z, n, hn per hidden unit; also the columns of d_gates: dr, dz, dhn, dn

// ------------------------------------------------------------------------------------------- forward

template <typename scalar_t, int RPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) gru_forward_step(const GruForwardStep<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Storage = TileStorage<scalar_t, kGates, RPT>;
  GATEDRNN_TILE_STORAGE(tile, Storage);
  const int64_t H = p.hidden;
  const auto a_rows =
      tile_rows<scalar_t, RPT>(p.step.rows, [&](int64_t b) {
        return p.masked_output ? previous_state(p.masked_output, p.masked_h0, b, p.step, H)
                               : previous_state(p.output, p.h0, b, p.step, H);
      });
  acc_t acc[kGates][RPT] = {};
  tile_matmul(tile, p.w_tiles + int64_t(blockIdx.y) * H * kGates * kTileUnits, a_rows, H, acc);

  const int64_t j = tile_unit();
  if (j >= H) return;
  for_each_thread_row<RPT>(p.step.rows, [&](int i, int64_t b) {
    const int64_t row = p.step.offset + b;
    const scalar_t* x = p.x_proj + row * kGates * H + j;
    acc_t gi[kGates], gh[kGates];
#pragma unroll
    for (int g = 0; g < kGates; ++g) {
      gi[g] = static_cast<acc_t>(x[g * H]) + (p.b_ih ? p.b_ih[g * H + j] : acc_t(0));
      gh[g] = acc[g][i] + (p.b_hh ? p.b_hh[g * H + j] : acc_t(0));
    }
    const auto a = gru_activate<acc_t>(gi[0], gi[1], gi[2], gh[0], gh[1], gh[2]);
    const acc_t h_prev = static_cast<acc_t>(previous_state(p.output, p.h0, b, p.step, H)[j]);
    acc_t h = gru_hidden(a, h_prev);
    if (p.keep.data) h = zoneout(p.keep.at(row, j), h_prev, h);
    p.output[row * H + j] = static_cast<scalar_t>(h);
    p.hy[b * H + j] = static_cast<scalar_t>(h);
    if (p.masked_output) p.masked_output[row * H + j] = static_cast<scalar_t>(h * p.recurrent_mask[b * H + j]);
    if (p.saved) {
      acc_t* saved = p.saved + row * kSaved * H + j;
      saved[0] = a.r;
      saved[H] = a.z;
      saved[2 * H] = a.n;
      saved[3 * H] = a.hn;
    }
  });
}

template <typename scalar_t>
constexpr auto gru_forward_step_instance = [](auto rpt) {  // for launch_step
  return gru_forward_step<scalar_t, decltype(rpt)::value>;
};

std::tuple<Tensor, Tensor, Tensor> gru_forward_cuda(const Tensor& input_, const OptTensor& batch_sizes,
                                                    const Tensor& hx_, const Tensor& w_ih_, const Tensor& w_hh_,
                                                    const OptTensor& b_ih_, const OptTensor& b_hh_, bool reverse,
                                                    bool save, const OptTensor& zoneout,
                                                    const OptTensor& recurrent_mask_, int64_t saved_rows,
                                                    bool reset_after) {
  constexpr const char* op = "gatedrnn::gru_forward";
  const LayerShape s = check_layer_args(op, kGates, input_, batch_sizes, hx_, w_ih_, w_hh_, b_ih_, b_hh_, std::nullopt);
  check_zoneout(op, input_, zoneout, s.rows, s.hidden, "zoneout");
  check_recurrent_mask(op, input_, s, std::nullopt, recurrent_mask_);
  const auto recurrent_mask = contiguous_or_none(recurrent_mask_);
  check_cuda_layer(op, input_, s.hidden);
  const DeviceGuard guard(input_.device());
  const auto [input, w_ih, w_hh, h0, no_proj, dtype, acc_dtype] =
      contiguous_inputs(input_, w_ih_, w_hh_, hx_, std::nullopt);
  const auto acc_options = input.options().dtype(acc_dtype);
  const auto to_acc = [&](const OptTensor& t) { return t ? OptTensor(t->to(acc_dtype).contiguous()) : t; };
  const OptTensor b_ih = to_acc(b_ih_), b_hh = to_acc(b_hh_);

  const int64_t H = s.hidden;
  auto x_proj = at::mm(input.view({s.rows, s.input_size}), w_ih.t());
  // saved_rows (padded.h): the saved activations keep that many rows, these rows first.
  const auto saved_kept = saved_rows_tensor(save, s.rows, saved_rows, kSaved * H, acc_options);
  auto saved = save ? saved_kept.narrow(0, 0, s.rows) : saved_kept;
  auto output2d = at::empty({s.rows, H}, input.options());
  auto hy = h0.clone();  // rows are overwritten at every step they are active in
  const auto w_tiles = forward_weight_tiles(w_hh, kGates, H);
  const bool dropout = recurrent_mask.has_value();
  const auto masked_output = dropout ? at::empty_like(output2d) : Tensor();
  const auto masked_h0 = dropout ? (h0 * *recurrent_mask).to(h0.scalar_type()) : Tensor();

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  if (!reset_after) {
    gru_reset_before_forward(schedule, {x_proj, w_hh, b_ih, b_hh, h0, output2d, hy, saved, zoneout, recurrent_mask,
                                        masked_output, masked_h0});
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gatedrnn_gru_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      GruForwardStep<scalar_t> p{w_tiles.const_data_ptr<scalar_t>(),
                                 x_proj.const_data_ptr<scalar_t>(),
                                 data_or_null<acc_t>(b_ih),
                                 data_or_null<acc_t>(b_hh),
                                 h0.const_data_ptr<scalar_t>(),
                                 output2d.data_ptr<scalar_t>(),
                                 hy.data_ptr<scalar_t>(),
                                 save ? saved.data_ptr<acc_t>() : nullptr,
                                 zoneout_keep<acc_t>(zoneout),
                                 data_or_null<acc_t>(recurrent_mask),
                                 dropout ? masked_output.data_ptr<scalar_t>() : nullptr,
                                 dropout ? masked_h0.const_data_ptr<scalar_t>() : nullptr,
                                 H,
                                 Step{}};
      for (const Step& step : schedule) {
        p.step = step;
        launch_step(step.rows, H, gru_forward_step_instance<scalar_t>, p);
      }
    });
  }

  auto output_shape = input_.sizes().vec();
  output_shape.back() = H;
  return {output2d.view(output_shape), hy, saved_kept};
}

// ------------------------------------------------------------------------------------------ backward

template <typename scalar_t, int RPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) gru_backward_step(const GruBackwardStep<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Storage = TileStorage<scalar_t, 1, RPT>;
  GATEDRNN_TILE_STORAGE(tile, Storage);
  const int64_t H = p.hidden;
  acc_t acc[1][RPT] = {};
  later_gradient_product(tile, p, kGates * H, acc);  // [dr, dz, dhn]_{t+1} @ W_hh

  const int64_t j = tile_unit();
  if (j >= H) return;
  for_each_thread_row<RPT>(p.step.rows, [&](int i, int64_t b) {
    const int64_t row = p.step.offset + b;
    // Through W_hh the gradient reaches h_t * mask with recurrent dropout.
    const acc_t through_w_hh = p.recurrent_mask ? acc[0][i] * p.recurrent_mask[b * H + j] : acc[0][i];
    const acc_t dh = through_w_hh + static_cast<acc_t>(p.grad_output[row * H + j]) + p.carry[b * H + j];
    const acc_t* sv = p.saved + row * kSaved * H + j;
    const GruGates<acc_t> a{sv[0], sv[H], sv[2 * H], sv[3 * H]};
    const acc_t h_prev = static_cast<acc_t>(previous_state(p.output, p.h0, b, p.step, H)[j]);
    GruGateGrads<acc_t> d_in, d_hid;
    if (p.keep.data) {  // h_t = k h_{t-1} + (1 - k) h~_t: the kept part passes straight to h_{t-1}
      const acc_t k = p.keep.at(row, j);
      p.carry[b * H + j] = gru_backward(a, h_prev, (acc_t(1) - k) * dh, d_in, d_hid) + k * dh;
    } else {
      p.carry[b * H + j] = gru_backward(a, h_prev, dh, d_in, d_hid);
    }
    scalar_t* dg = p.d_gates + row * kSaved * H + j;
    dg[0] = static_cast<scalar_t>(d_in.r);
    dg[H] = static_cast<scalar_t>(d_in.z);
    dg[2 * H] = static_cast<scalar_t>(d_hid.n);
    dg[3 * H] = static_cast<scalar_t>(d_in.n);
  });
}

template <typename scalar_t>
constexpr auto gru_backward_step_instance = [](auto rpt) {  // for launch_step
  return gru_backward_step<scalar_t, decltype(rpt)::value>;
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_cuda(
    const Tensor& grad_output_, const Tensor& grad_hy_, const Tensor& input_, const OptTensor& batch_sizes,
    const Tensor& hx_, const Tensor& w_ih_, const Tensor& w_hh_, const Tensor& output_, const Tensor& saved_,
    bool reverse, std::array<bool, 3> output_mask, const OptTensor& zoneout, const OptTensor& recurrent_mask_,
    bool reset_after) {
  constexpr const char* op = "gatedrnn::gru_backward";
  const LayerShape s =
      check_gru_backward_args(op, grad_output_, grad_hy_, input_, batch_sizes, hx_, w_ih_, w_hh_, output_, saved_);
  check_zoneout(op, input_, zoneout, s.rows, s.hidden, "zoneout");
  check_recurrent_mask(op, input_, s, std::nullopt, recurrent_mask_);
  const auto recurrent_mask = contiguous_or_none(recurrent_mask_);
  check_cuda_layer(op, input_, s.hidden);
  const DeviceGuard guard(input_.device());
  const auto [input, w_ih, w_hh, hx, no_proj, dtype, acc_dtype] =
      contiguous_inputs(input_, w_ih_, w_hh_, hx_, std::nullopt);
  const int64_t H = s.hidden;
  const auto grad_out2d = grad_output_.to(dtype).contiguous().view({s.rows, H});
  const auto output2d = output_.contiguous().view({s.rows, H});
  const auto saved = saved_.contiguous();
  auto carry = grad_hy_.to(acc_dtype, false, true).contiguous();
  auto d_gates = at::empty({s.rows, kSaved * H}, input.options());
  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  if (!reset_after) {
    gru_reset_before_backward(schedule, grad_out2d, saved, output2d, hx, w_hh, d_gates, carry, zoneout,
                              recurrent_mask);
  } else {
    const auto w_tiles = backward_weight_tiles(w_hh);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gatedrnn_gru_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      GruBackwardStep<scalar_t> p{};
      p.w_tiles = w_tiles.const_data_ptr<scalar_t>();
      p.grad_output = grad_out2d.const_data_ptr<scalar_t>();
      p.carry = carry.data_ptr<acc_t>();
      p.saved = saved.const_data_ptr<acc_t>();
      p.output = output2d.const_data_ptr<scalar_t>();
      p.h0 = hx.const_data_ptr<scalar_t>();
      p.d_gates = d_gates.data_ptr<scalar_t>();
      p.keep = zoneout_keep<acc_t>(zoneout);
      p.recurrent_mask = data_or_null<acc_t>(recurrent_mask);
      p.hidden = H;
      for (size_t k = schedule.size(); k-- > 0;) {
        const Step& step = schedule[k];
        const LaterStep later = later_step(schedule, k);
        p.later_grads = p.d_gates + later.offset * kSaved * H;
        p.later_rows = later.rows;
        p.step = step;
        launch_step(step.rows, H, gru_backward_step_instance<scalar_t>, p);
      }
    });
  }
  // h0 reaches each row's first step directly (the carry now holds the direct part of that step) and through
  // the rows of W_hh that multiply h_{t-1} itself: all three, or r's and z's when the reset comes first.
  const int64_t read_h = reset_after ? kGates * H : 2 * H;
  add_initial_state_grad(carry, d_gates.narrow(1, 0, read_h), w_hh.narrow(0, 0, read_h), schedule, recurrent_mask);

  const auto x2d = input.view({s.rows, s.input_size});
  // dW_hh from the states as the product read them.
  const auto [h_read, h0_read] = states_as_read(output2d, hx, recurrent_mask, batch_sizes);
  const LayerGradArgs args{x2d, w_ih, h_read, h0_read, schedule, !batch_sizes.has_value(),
                           reverse, output_mask, input_.sizes(), input_.options()};
  const auto g = gru_layer_grads(args, d_gates, reset_after ? Tensor() : saved.narrow(1, 3 * H, H));
  return {g.input, carry.to(dtype), g.w_ih, g.w_hh, g.b_ih, g.b_hh};
}

}  // namespace

TORCH_LIBRARY_IMPL(GATEDRNN_CUDA_LIBRARY, GATEDRNN_CUDA_DISPATCH_KEY, m) {
  m.impl("gru_forward", &gru_forward_op<gru_forward_cuda, gru_norm_forward_cuda>);
  m.impl("gru_backward", &gru_backward_op<gru_backward_cuda, gru_norm_backward_cuda>);
}

}  // namespace gatedrnn::cuda
