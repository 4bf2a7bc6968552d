// GRU with reset_after=False on CUDA: two dependent launches per step, each a block tile (step_tile.cuh) fused
// with its part of the cell (cells.h, "GRU, reset before the product"); gru.cu is the model.
//
// Forward step: gru_reset_gates_step computes h_{t-1} @ W_h[rz]^T for its 32 units, then r, z and
// rh = r * h_{t-1}; gru_candidate_step computes rh @ W_hn^T, then n and h_t. r, z, n and rh go to the saved
// buffer when saving, else to a [B, 4H] buffer of this step's rows (only z crosses to the second launch; rh
// also goes to a [B, H] buffer in the storage dtype, the second product's A). Backward step, in reverse:
// gru_update_backward_step computes [dr, dz]_{t+1} @ W_h[rz], adds the output gradient and the carry, and
// gives dz, dn and the carry's direct part dh * z; gru_reset_backward_step computes dn_t @ W_hn and gives dr
// and the carry's d(rh) * r. No allocation, host synchronisation or atomics inside the loops.
#include "gru_reset_before.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../cells.h"
#include "../checks.h"
#include "gru_steps.cuh"
#include "launch.h"
#include "platform.h"
#include "step_tile.cuh"

namespace gatedrnn::cuda {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

constexpr int kSaved = 4;  // r, z, n, rh per hidden unit; also the columns of d_gates: dr, dz, dn, dn

// ------------------------------------------------------------------------------------------- forward
// The plain GRU's parameters (gru_steps.cuh), w_tiles being W_h[rz]'s ([tiles][H][2][32]) and `saved` the r, z,
// n, rh of each row ([N, 4H] when saving, else [B, 4H] for this step's rows: gates_by_row says which); with
// recurrent dropout both products read h_{t-1} * mask.
template <typename scalar_t>
struct ResetBeforeForwardStep : GruForwardStep<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* w_candidate;  // forward_weight_tiles(W_hn): [tiles][H][1][32]
  bool gates_by_row;            // index `saved` by packed row (saving), else by batch row
  scalar_t* reset_hidden;       // [B, H]: rh, the second product's A

  __device__ __forceinline__ acc_t* gates_of(int64_t b) const {
    return this->saved + (gates_by_row ? this->step.offset + b : b) * kSaved * this->hidden;
  }
  __device__ __forceinline__ const scalar_t* read_row(int64_t b) const {
    const Step& step = this->step;
    return this->masked_output ? previous_state(this->masked_output, this->masked_h0, b, step, this->hidden)
                               : previous_state(this->output, this->h0, b, step, this->hidden);
  }
  __device__ __forceinline__ acc_t bias(int g, int64_t j) const {
    const int64_t k = g * this->hidden + j;
    return this->b_ih ? this->b_ih[k] + this->b_hh[k] : acc_t(0);
  }
};

template <typename scalar_t, int RPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    gru_reset_gates_step(const ResetBeforeForwardStep<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Storage = TileStorage<scalar_t, 2, RPT>;
  GATEDRNN_TILE_STORAGE(tile, Storage);
  const int64_t H = p.hidden;
  const auto a_rows = tile_rows<scalar_t, RPT>(p.step.rows, [&](int64_t b) { return p.read_row(b); });
  acc_t acc[2][RPT] = {};
  tile_matmul(tile, p.w_tiles + int64_t(blockIdx.y) * H * 2 * kTileUnits, a_rows, H, acc);

  const int64_t j = tile_unit();
  if (j >= H) return;
  for_each_thread_row<RPT>(p.step.rows, [&](int i, int64_t b) {
    const scalar_t* x = p.x_proj + (p.step.offset + b) * 3 * H + j;
    const acc_t r = sigmoid(static_cast<acc_t>(x[0]) + p.bias(0, j) + acc[0][i]);
    const acc_t z = sigmoid(static_cast<acc_t>(x[H]) + p.bias(1, j) + acc[1][i]);
    const acc_t rh = r * static_cast<acc_t>(p.read_row(b)[j]);
    acc_t* g = p.gates_of(b) + j;
    g[0] = r;
    g[H] = z;
    g[3 * H] = rh;
    p.reset_hidden[b * H + j] = static_cast<scalar_t>(rh);
  });
}

template <typename scalar_t, int RPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    gru_candidate_step(const ResetBeforeForwardStep<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Storage = TileStorage<scalar_t, 1, RPT>;
  GATEDRNN_TILE_STORAGE(tile, Storage);
  const int64_t H = p.hidden;
  const auto a_rows = tile_rows<scalar_t, RPT>(p.step.rows, [&](int64_t b) { return p.reset_hidden + b * H; });
  acc_t acc[1][RPT] = {};
  tile_matmul(tile, p.w_candidate + int64_t(blockIdx.y) * H * kTileUnits, a_rows, H, acc);

  const int64_t j = tile_unit();
  if (j >= H) return;
  for_each_thread_row<RPT>(p.step.rows, [&](int i, int64_t b) {
    const int64_t row = p.step.offset + b;
    const acc_t x_n = static_cast<acc_t>(p.x_proj[row * 3 * H + 2 * H + j]);
    acc_t* g = p.gates_of(b) + j;
    const acc_t n = gru_reset_before_candidate(x_n + p.bias(2, j), acc[0][i]);
    const acc_t h_prev = static_cast<acc_t>(previous_state(p.output, p.h0, b, p.step, H)[j]);
    acc_t h = gru_hidden(GruGates<acc_t>{g[0], g[H], n, acc_t(0)}, h_prev);
    if (p.keep.data) h = zoneout(p.keep.at(row, j), h_prev, h);
    g[2 * H] = n;
    p.output[row * H + j] = static_cast<scalar_t>(h);
    p.hy[b * H + j] = static_cast<scalar_t>(h);
    if (p.masked_output) p.masked_output[row * H + j] = static_cast<scalar_t>(h * p.recurrent_mask[b * H + j]);
  });
}

template <typename scalar_t>
constexpr auto gru_reset_gates_step_instance = [](auto rpt) {  // for launch_step
  return gru_reset_gates_step<scalar_t, decltype(rpt)::value>;
};

template <typename scalar_t>
constexpr auto gru_candidate_step_instance = [](auto rpt) {
  return gru_candidate_step<scalar_t, decltype(rpt)::value>;
};

// ------------------------------------------------------------------------------------------ backward
// The plain GRU's parameters (gru_steps.cuh), w_tiles being W_h[rz]'s ([tiles][2H][32]), `saved` holding r, z,
// n, rh, d_gates getting dr, dz, dn, dn, and the carry the gradient reaching h_{t-1} except through W_h[rz].
template <typename scalar_t>
struct ResetBeforeBackwardStep : GruBackwardStep<scalar_t> {
  const scalar_t* w_candidate;  // backward_weight_tiles(W_hn): [tiles][H][32]
};

template <typename scalar_t, int RPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    gru_update_backward_step(const ResetBeforeBackwardStep<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Storage = TileStorage<scalar_t, 1, RPT>;
  GATEDRNN_TILE_STORAGE(tile, Storage);
  const int64_t H = p.hidden;
  acc_t acc[1][RPT] = {};
  later_gradient_product(tile, p, 2 * H, acc);  // [dr, dz]_{t+1} @ W_h[rz]

  const int64_t j = tile_unit();
  if (j >= H) return;
  for_each_thread_row<RPT>(p.step.rows, [&](int i, int64_t b) {
    const int64_t row = p.step.offset + b;
    // Through W_h[rz] the gradient reaches h_t * mask with recurrent dropout.
    const acc_t through_w = p.recurrent_mask ? acc[0][i] * p.recurrent_mask[b * H + j] : acc[0][i];
    const acc_t dh = through_w + static_cast<acc_t>(p.grad_output[row * H + j]) + p.carry[b * H + j];
    const acc_t* sv = p.saved + row * kSaved * H + j;
    const acc_t h_prev = static_cast<acc_t>(previous_state(p.output, p.h0, b, p.step, H)[j]);
    const acc_t k = p.keep.at(row, j);  // h_t = k h_{t-1} + (1 - k) h~_t; 0 without zoneout
    GruUpdateGrads<acc_t> d;
    p.carry[b * H + j] = gru_reset_before_update_backward(sv[H], sv[2 * H], h_prev, (acc_t(1) - k) * dh, d) + k * dh;
    scalar_t* dg = p.d_gates + row * kSaved * H + j;
    dg[H] = static_cast<scalar_t>(d.z);
    dg[2 * H] = static_cast<scalar_t>(d.n);
    dg[3 * H] = static_cast<scalar_t>(d.n);
  });
}

template <typename scalar_t, int RPT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    gru_reset_backward_step(const ResetBeforeBackwardStep<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Storage = TileStorage<scalar_t, 1, RPT>;
  GATEDRNN_TILE_STORAGE(tile, Storage);
  const int64_t H = p.hidden;
  // This step's dn, column 2H of its d_gates rows.
  const auto a_rows = tile_rows<scalar_t, RPT>(
      p.step.rows, [&](int64_t b) { return p.d_gates + (p.step.offset + b) * kSaved * H + 2 * H; });
  acc_t acc[1][RPT] = {};
  tile_matmul(tile, p.w_candidate + int64_t(blockIdx.y) * H * kTileUnits, a_rows, H, acc);

  const int64_t j = tile_unit();
  if (j >= H) return;
  for_each_thread_row<RPT>(p.step.rows, [&](int i, int64_t b) {
    const int64_t row = p.step.offset + b;
    const acc_t r = p.saved[row * kSaved * H + j];
    const acc_t m = p.recurrent_mask ? p.recurrent_mask[b * H + j] : acc_t(1);  // rh = r * h_{t-1} * mask
    const acc_t h_prev = static_cast<acc_t>(previous_state(p.output, p.h0, b, p.step, H)[j]);
    p.d_gates[row * kSaved * H + j] = static_cast<scalar_t>(gru_reset_before_reset_backward(r, h_prev * m, acc[0][i]));
    p.carry[b * H + j] += acc[0][i] * r * m;
  });
}

template <typename scalar_t>
constexpr auto gru_update_backward_step_instance = [](auto rpt) {
  return gru_update_backward_step<scalar_t, decltype(rpt)::value>;
};

template <typename scalar_t>
constexpr auto gru_reset_backward_step_instance = [](auto rpt) {
  return gru_reset_backward_step<scalar_t, decltype(rpt)::value>;
};

}  // namespace

void gru_reset_before_forward(const std::vector<Step>& schedule, const GruResetBeforeForward& f) {
  const int64_t H = f.w_hh.size(1), B = f.h0.size(0);
  const bool save = f.saved.numel() > 0;
  const auto acc_dtype = at::toOpMathType(f.x_proj.scalar_type());
  const auto step_gates = save ? f.saved : at::empty({B, kSaved * H}, f.x_proj.options().dtype(acc_dtype));
  const auto reset_hidden = at::empty({B, H}, f.x_proj.options());
  const auto w_gates = forward_weight_tiles(f.w_hh.narrow(0, 0, 2 * H), 2, H);
  const auto w_candidate = forward_weight_tiles(f.w_hh.narrow(0, 2 * H, H), 1, H);
  const bool dropout = f.recurrent_mask.has_value();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.x_proj.scalar_type(),
                                  "gatedrnn_gru_reset_before_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ResetBeforeForwardStep<scalar_t> p{{w_gates.const_data_ptr<scalar_t>(),
                                        f.x_proj.const_data_ptr<scalar_t>(),
                                        data_or_null<acc_t>(f.b_ih),
                                        data_or_null<acc_t>(f.b_hh),
                                        f.h0.const_data_ptr<scalar_t>(),
                                        f.output2d.data_ptr<scalar_t>(),
                                        f.hy.data_ptr<scalar_t>(),
                                        step_gates.data_ptr<acc_t>(),
                                        zoneout_keep<acc_t>(f.zoneout),
                                        data_or_null<acc_t>(f.recurrent_mask),
                                        dropout ? f.masked_output.data_ptr<scalar_t>() : nullptr,
                                        dropout ? f.masked_h0.const_data_ptr<scalar_t>() : nullptr,
                                        H,
                                        Step{}},
                                       w_candidate.const_data_ptr<scalar_t>(),
                                       save,
                                       reset_hidden.data_ptr<scalar_t>()};
    for (const Step& step : schedule) {
      p.step = step;
      launch_step(step.rows, H, gru_reset_gates_step_instance<scalar_t>, p);
      launch_step(step.rows, H, gru_candidate_step_instance<scalar_t>, p);
    }
  });
}

void gru_reset_before_backward(const std::vector<Step>& schedule, const Tensor& grad_out2d, const Tensor& saved,
                               const Tensor& output2d, const Tensor& h0, const Tensor& w_hh, Tensor& d_gates,
                               Tensor& carry, const OptTensor& zoneout, const OptTensor& recurrent_mask) {
  const int64_t H = w_hh.size(1);
  const auto w_gates = backward_weight_tiles(w_hh.narrow(0, 0, 2 * H));
  const auto w_candidate = backward_weight_tiles(w_hh.narrow(0, 2 * H, H));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d_gates.scalar_type(),
                                  "gatedrnn_gru_reset_before_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ResetBeforeBackwardStep<scalar_t> p{};
    p.w_tiles = w_gates.const_data_ptr<scalar_t>();
    p.w_candidate = w_candidate.const_data_ptr<scalar_t>();
    p.grad_output = grad_out2d.const_data_ptr<scalar_t>();
    p.carry = carry.data_ptr<acc_t>();
    p.saved = saved.const_data_ptr<acc_t>();
    p.output = output2d.const_data_ptr<scalar_t>();
    p.h0 = h0.const_data_ptr<scalar_t>();
    p.d_gates = d_gates.data_ptr<scalar_t>();
    p.keep = zoneout_keep<acc_t>(zoneout);
    p.recurrent_mask = data_or_null<acc_t>(recurrent_mask);
    p.hidden = H;
    for (size_t k = schedule.size(); k-- > 0;) {
      const LaterStep later = later_step(schedule, k);
      p.later_grads = p.d_gates + later.offset * kSaved * H;
      p.later_rows = later.rows;
      p.step = schedule[k];
      launch_step(p.step.rows, H, gru_update_backward_step_instance<scalar_t>, p);
      launch_step(p.step.rows, H, gru_reset_backward_step_instance<scalar_t>, p);
    }
  });
}

}  // namespace gatedrnn::cuda
