// GRU on the CPU: one layer and direction over the whole sequence.
//
// Forward, for each chunk of steps (products.h): the input projection of the chunk's rows, then each step as
// one set of fused tiles: a tile computes h_{t-1} @ W_hh^T for the three gates of L hidden units and up to
// MR batch rows in registers, adds the biases (b_hh's n part on the recurrent side, since n needs
// r * (W_hn h + b_hn)), applies the activations and updates h; when training it overwrites the projection in
// place with what backward needs. Backward: a tile computes [dr, dz, dhn]_{t+1} @ W_hh for 4L hidden units
// and runs step t's derivative on it; a per-(row, unit) carry holds the direct part dh * z. Weight, bias and
// input gradients are single GEMMs/reductions after the loop. One team of threads runs a whole loop. A
// forward call of at most kInPlaceRows rows (a cell's step) reads W_ih and W_hh in place instead of packing
// them (products.h's prepare_weight).
// reset_after=False (Cho et al.'s GRU) runs its own loops, gru_reset_before.cpp, from the same ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../cells.h"
#include "../checks.h"
#include "../layer_grads.h"
#include "../op_entry.h"
#include "../sequence.h"
#include "loops.h"
#include "matmul.h"
#include "bf16.h"
#include "gru_backward_state.h"
#include "gru_reset_before.h"
#include "layer_norm_ops.h"
#include "products.h"
#include "saved_cache.h"
#include "team.h"
#include "tiles.h"
#include "workspace.h"

namespace gatedrnn::cpu {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kGates = 3;
constexpr int64_t kSaved = 4;  // r, z, n, hn per hidden unit

template <typename T>
using GruInputTiles = InputTiles<T, kGates>;  // float and double
GATEDRNN_TILE_KERNELS(run_input_tiles, GruInputTiles, "gru_input_projection")

// ------------------------------------------------------------------------------------------- forward
// One forward step over GateMajor tiles: h_{t-1} @ W_hh^T for the three gates of L units, then the cell.
// S: the type of h and of the weights (T, or bfloat16 for the bfloat16 tiles, which compute in float32
// and round h_t once).
template <typename T, typename S = T>
struct ForwardTiles : TileBase<T, kGates, S> {  // depth H
  RecurrentStates<S> states;  // h_{t-1} of each row; output: h_t out
  // Input projection (x @ W_ih^T) of rows from proj_row0 on, in rows of proj_stride. When saving these are
  // the first 3H columns of the [N, 4H] saved buffer, and the epilogue overwrites them with r, z, n, hn.
  T* input_proj;
  int64_t proj_row0, proj_stride;
  const T* bias_input;  // [3H]: b_ih + (b_hh's r and z parts, which enter the gates like b_ih), or null
  const T* bias_hn;     // [H]: the n part of b_hh (multiplied by r), or null
  S* h_state;           // [B, H]: each row's latest h_t (the final state at the end)
  ZoneoutKeep<T> keep;  // zoneout of h (cells.h), or none
  // Recurrent dropout (states.masked_*): the product reads h_{t-1} * mask; the cell itself uses h_{t-1}.
  const T* recurrent_mask;  // [B, H]: 0 or 1 / (1 - p), or null
  bool save;
  int64_t hidden, rows;
  Step step;

  const S* a_row(int64_t b) const { return states.read_row(step, b); }

  template <int L, bool kSave, bool kBias, bool kZoneout, bool kDropout>
  GATEDRNN_ALWAYS_INLINE void cell(const T* acc, int64_t b, int64_t j0, int64_t width) const {
    const int64_t H = hidden, row = step.offset + b;
    T* gi = input_proj + (row - proj_row0) * proj_stride + j0;
    const S* h = states.prev_row(step, b) + j0;
    const T* mask = kDropout ? recurrent_mask + b * H + j0 : nullptr;
    S* masked = kDropout ? states.masked_output + row * H + j0 : nullptr;
    S* out = states.output + row * H + j0;
    S* hs = h_state + b * H + j0;
    T keep_hidden[kZoneout ? L : 1];
    if constexpr (kZoneout) load_keep(keep, row, j0, width, keep_hidden);
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < width; ++l) {
      T in[kGates];
      for (int64_t q = 0; q < kGates; ++q) in[q] = gi[q * H + l] + (kBias ? bias_input[q * H + j0 + l] : T(0));
      const T gh_n = kBias ? acc[2 * L + l] + bias_hn[j0 + l] : acc[2 * L + l];
      const auto a = gru_activate<T>(in[0], in[1], in[2], acc[l], acc[L + l], gh_n);
      const T h_prev = from_storage<T>(h[l]);
      T h_new = gru_hidden(a, h_prev);
      if constexpr (kZoneout) h_new = zoneout(keep_hidden[l], h_prev, h_new);
      out[l] = to_storage<S>(h_new);
      hs[l] = to_storage<S>(h_new);
      if constexpr (kDropout) masked[l] = to_storage<S>(h_new * mask[l]);
      if constexpr (kSave) store_gates(gi, H, l, a.r, a.z, a.n, a.hn);  // this row of the saved buffer
    }
  }

  template <int L, bool kZoneout, bool kDropout>
  GATEDRNN_ALWAYS_INLINE void finish_rows(const T* acc, int64_t b0, int64_t n, int64_t j0, int64_t width) const {
    for (int64_t r = 0; r < n; ++r) {
      const T* a = acc + r * kGates * L;
      if (bias_hn) {
        save ? cell<L, true, true, kZoneout, kDropout>(a, b0 + r, j0, width)
             : cell<L, false, true, kZoneout, kDropout>(a, b0 + r, j0, width);
      } else {
        save ? cell<L, true, false, kZoneout, kDropout>(a, b0 + r, j0, width)
             : cell<L, false, false, kZoneout, kDropout>(a, b0 + r, j0, width);
      }
    }
  }

  template <int L>
  GATEDRNN_ALWAYS_INLINE void finish(const T* acc, int64_t b0, int64_t n, int64_t p) const {
    const int64_t j0 = p * L, width = std::min<int64_t>(L, hidden - j0);
    if (states.masked_output) {
      keep.data ? finish_rows<L, true, true>(acc, b0, n, j0, width)
                : finish_rows<L, false, true>(acc, b0, n, j0, width);
    } else {
      keep.data ? finish_rows<L, true, false>(acc, b0, n, j0, width)
                : finish_rows<L, false, false>(acc, b0, n, j0, width);
    }
  }
};

GATEDRNN_TILE_KERNELS(run_forward_tiles, ForwardTiles, "gru_forward_step")
#ifdef GATEDRNN_HAVE_BF16_TILES
using Bf16InputTiles = InputTiles<float, kGates, c10::BFloat16>;
GATEDRNN_BF16_TILE_KERNEL(run_input_tiles, Bf16InputTiles, "gru_input_projection_bf16")
using Bf16ForwardTiles = ForwardTiles<float, c10::BFloat16>;
GATEDRNN_BF16_TILE_KERNEL(run_forward_tiles, Bf16ForwardTiles, "gru_forward_step_bf16")
#endif

// T: the type computed in; S: the type of x, h and the weights (T, or bfloat16 with T float, inference only).
template <typename T, typename S = T>
void gru_forward_loop(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& x2d, const Tensor& w_ih,
                      const Tensor& w_hh, const OptTensor& bias_input, const OptTensor& b_hh, const Tensor& h0,
                      Tensor& saved, Tensor& output2d, Tensor& hy, bool save, const OptTensor& zoneout,
                      const OptTensor& recurrent_mask) {
  const int64_t H = s.hidden, G = kGates * H, L = lanes_for<S>();
  TORCH_INTERNAL_ASSERT((std::is_same_v<S, T>) || !save);
  std::array<Tensor, 2> masked;
  const auto states = recurrent_states<S>(h0, output2d, recurrent_mask, masked);
  const int64_t unit_tiles = tile_count(G, kGates, L, Columns::GateMajor);
  const auto chunks = plan_chunks(schedule, chunk_rows(G * int64_t(sizeof(T))));
  if (!save) saved = chunk_buffer(chunks, G, x2d.options().dtype(c10::CppTypeToScalarType<T>::value));
  const int64_t stride = saved.stride(0);

  InputTiles<T, kGates, S> input{{nullptr, 0, s.input_size}, x2d.const_data_ptr<S>(), nullptr, stride, H, 0, 0};
  ForwardTiles<T, S> cell{{nullptr, 0, H},
                          states,
                          saved.data_ptr<T>(),
                          0,
                          stride,
                          bias_input.has_value() ? bias_input->const_data_ptr<T>() : nullptr,
                          b_hh.has_value() ? b_hh->const_data_ptr<T>() + 2 * H : nullptr,
                          hy.data_ptr<S>(),
                          zoneout_keep<T>(zoneout),
                          recurrent_mask ? recurrent_mask->const_data_ptr<T>() : nullptr,
                          save,
                          H,
                          0,
                          Step{}};
  const Tensor ih = prepare_weight(input, w_ih, Columns::GateMajor, Scratch::PackedInput, s.rows);
  const Tensor hh = prepare_weight(cell, w_hh, Columns::GateMajor, Scratch::PackedRecurrent, s.rows);

  run_team([&](const Team& team) {
    const auto run_input = [](const auto& in, int64_t b, int64_t e) { run_input_tiles(in, b, e); };
    forward_chunks(team, chunks, schedule, save, unit_tiles, input, cell, run_input, [&](const auto& st) {
      const auto share = share_of(tile_items(st, unit_tiles), team.tid, team.threads);
      run_forward_tiles(st, share.begin, share.end);
      team.barrier();
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> gru_forward_cpu(const Tensor& input_, const OptTensor& batch_sizes,
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
  // bfloat16 inference on the bfloat16 tiles (bf16.h): x, h and the weights stay bfloat16, the projection
  // buffer and the biases are float32. Otherwise (reset_after=False included) everything in the compute dtype.
  const bool bf16 = input_.scalar_type() == at::kBFloat16 && !save && reset_after && bf16_tiles_available();
  const auto dtype = compute_dtype(input_.scalar_type());
  const auto kept = bf16 ? at::kBFloat16 : dtype;  // the dtype of x, h and the weights in the loop
  const auto input = to_compute(input_, kept), w_ih = to_compute(w_ih_, kept), w_hh = to_compute(w_hh_, kept);
  const auto b_ih = to_compute(b_ih_, dtype), b_hh = to_compute(b_hh_, dtype);
  // h0 and hy are separate: hy is written by the rows' last steps while other rows may still read h0.
  const auto h0 = to_compute(hx_, kept);
  auto hy = hx_.to(kept, false, true).contiguous();

  const auto x2d = input.view({s.rows, s.input_size});
  // When saving, the projection is written straight into the saved buffer, whose rows the step's epilogue
  // then overwrites with r, z, n, hn.
  // saved_rows (padded.h): the saved activations keep that many rows, these rows first.
  auto saved_kept =
      saved_rows_tensor(save, s.rows, saved_rows, kSaved * s.hidden, input.options().dtype(dtype), saved_empty);
  auto saved = save ? saved_kept.narrow(0, 0, s.rows) : Tensor();
  OptTensor bias_input;
  if (b_ih.has_value()) {
    // b_hh's r and z parts enter the gates exactly like b_ih's; its n part is multiplied by r, unless the reset
    // comes before the product.
    const auto hn_zeros = at::zeros({s.hidden}, b_hh->options());
    bias_input = reset_after ? *b_ih + at::cat({b_hh->narrow(0, 0, 2 * s.hidden), hn_zeros}) : *b_ih + *b_hh;
  }
  auto output2d = at::empty({s.rows, s.hidden}, input.options());

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  if (!reset_after) {
    gru_reset_before_forward(schedule, s, x2d, w_ih, w_hh, bias_input, h0, saved, output2d, hy, save, zoneout,
                             recurrent_mask);
  } else
#ifdef GATEDRNN_HAVE_BF16_TILES
  if (bf16) {
    gru_forward_loop<float, c10::BFloat16>(schedule, s, x2d, w_ih, w_hh, bias_input, b_hh, h0, saved, output2d,
                                           hy, false, zoneout, recurrent_mask);
  } else
#endif
  {
    AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_gru_forward_cpu", [&] {
      gru_forward_loop<scalar_t>(schedule, s, x2d, w_ih, w_hh, bias_input, b_hh, h0, saved, output2d, hy, save,
                                 zoneout, recurrent_mask);
    });
  }

  auto output_shape = input_.sizes().vec();
  output_shape.back() = s.hidden;
  const auto storage = input_.scalar_type();
  return {output2d.view(output_shape).to(storage), hy.to(storage), saved_kept};
}

// ------------------------------------------------------------------------------------------ backward
// Pre-activation gradients, one [N, 4H] buffer: [dr, dz, dhn, dn]. The r and z gradients are the same on
// the input and the hidden side, so the hidden side's [dr, dz, dhn] are the first 3H columns and the input
// side's [dr, dz, dn] are columns 0..2H and 3H..4H.
constexpr int64_t kGradCols = 4;

// One backward step over Contiguous tiles of 4L hidden units: dh_t = grad_output + carry + [dr, dz,
// dhn]_{t+1} @ W_hh, then step t's derivative; the carry becomes the direct part dh_t * z reaching h_{t-1}.
// saved: r, z, n, hn; d_gates: dr, dz, dhn, dn; the carry: the direct part of the gradient reaching h_{t-1}.
template <typename T>
struct BackwardTiles : TileBase<T, 4>, GruBackwardState<T> {
  using State = GruBackwardState<T>;  // members of a dependent base, named here for the code below
  using State::carry, State::d_gates, State::grad_output, State::hidden, State::keep, State::later,
      State::recurrent_mask, State::saved, State::states, State::step;
  static constexpr int kGroups = 4;
  int64_t rows;

  const T* a_row(int64_t b) const { return later.row(b); }

  template <int L>
  GATEDRNN_ALWAYS_INLINE void finish(const T* acc, int64_t b0, int64_t n, int64_t p) const {
    if (recurrent_mask) {
      keep.data ? finish_rows<L, true, true>(acc, b0, n, p) : finish_rows<L, false, true>(acc, b0, n, p);
    } else {
      keep.data ? finish_rows<L, true, false>(acc, b0, n, p) : finish_rows<L, false, false>(acc, b0, n, p);
    }
  }

  template <int L, bool kZoneout, bool kDropout>
  GATEDRNN_ALWAYS_INLINE void finish_rows(const T* acc, int64_t b0, int64_t n, int64_t p) const {
    const int64_t H = hidden, j0 = p * kGroups * L, width = std::min<int64_t>(kGroups * L, H - j0);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t b = b0 + r, row = step.offset + b;
      const T* a = acc + r * kGroups * L;
      const T* sv = saved + row * kSaved * H + j0;
      const T* h_prev = states.prev_row(step, b) + j0;
      const T* d_out = grad_output + row * H + j0;
      T* cr = carry + b * H + j0;
      T* dg = d_gates + row * kGradCols * H + j0;
      T keep_hidden[kZoneout ? kGroups * L : 1];
      if constexpr (kZoneout) load_keep(keep, row, j0, width, keep_hidden);
      const T* mask = kDropout ? recurrent_mask + b * H + j0 : nullptr;
      GATEDRNN_IVDEP
      for (int64_t l = 0; l < width; ++l) {
        const GruGates<T> g{sv[l], sv[H + l], sv[2 * H + l], sv[3 * H + l]};
        GruGateGrads<T> d_in, d_hid;
        // Through W_hh the gradient reaches h_t * mask with recurrent dropout.
        const T dh = (kDropout ? a[l] * mask[l] : a[l]) + d_out[l] + cr[l];
        if constexpr (kZoneout) {  // h_t = k h_{t-1} + (1 - k) h~_t: the kept part passes straight to h_{t-1}
          const T k = keep_hidden[l];
          cr[l] = gru_backward(g, h_prev[l], (T(1) - k) * dh, d_in, d_hid) + k * dh;
        } else {
          cr[l] = gru_backward(g, h_prev[l], dh, d_in, d_hid);
        }
        store_gates(dg, H, l, d_in.r, d_in.z, d_hid.n, d_in.n);
      }
    }
  }
};

GATEDRNN_TILE_KERNELS(run_backward_tiles, BackwardTiles, "gru_backward_step")

template <typename T>
void gru_backward_loop(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& grad_out2d,
                       const Tensor& saved, const Tensor& output2d, const Tensor& h0, const Tensor& w_hh,
                       Tensor& d_gates, Tensor& carry, const OptTensor& zoneout, const OptTensor& recurrent_mask) {
  const int64_t H = s.hidden, L = tile_lanes<T>();
  // dh = [dr, dz, dhn] @ W_hh ([3H, H]): the weight is [K, N], packed from its transpose.
  const auto hh = pack_for_later_steps(schedule, w_hh, L, Scratch::PackedRecurrent);
  const auto zeros = at::zeros({kGates * H}, w_hh.options());
  const int64_t unit_tiles = tile_count(H, 4, L, Columns::Contiguous);
  BackwardTiles<T> cell{
      {hh.const_data_ptr<T>(), hh.stride(0), kGates * H},
      gru_backward_state<T>(d_gates, zeros, saved, output2d, h0, grad_out2d, carry, zoneout, recurrent_mask),
      0};
  run_team([&](const Team& team) {
    auto st = cell;
    for (size_t k = schedule.size(); k-- > 0;) {
      st.k = point_at_later_step(st.later, schedule, k, kGates * H);
      st.step = schedule[k];
      st.rows = st.step.rows;
      const auto share = share_of(tile_items(st, unit_tiles), team.tid, team.threads);
      run_backward_tiles(st, share.begin, share.end);
      team.barrier();
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_cpu(
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
  const auto dtype = compute_dtype(input_.scalar_type());
  const int64_t H = s.hidden;
  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto hx = to_compute(hx_, dtype);
  const auto grad_out2d = to_compute(grad_output_, dtype).view({s.rows, H});
  const auto output2d = to_compute(output_, dtype).view({s.rows, H});
  const auto saved = saved_.contiguous().view({s.rows, kSaved * H});
  auto dh = grad_hy_.to(dtype, false, true).contiguous();  // the carry: grad_hy in, dh0's direct part out

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  auto d_gates = scratch_tensor(Scratch::Gates, {s.rows, kGradCols * H}, input.options());
  // The rows of W_hh that multiply h_{t-1} itself: all three, or only r's and z's when the reset comes first.
  const int64_t read_h = reset_after ? kGates * H : 2 * H;
  if (reset_after) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_gru_backward_cpu", [&] {
      gru_backward_loop<scalar_t>(schedule, s, grad_out2d, saved, output2d, hx, w_hh, d_gates, dh, zoneout,
                                  recurrent_mask);
    });
  } else {
    gru_reset_before_backward(schedule, s, grad_out2d, saved, output2d, hx, w_hh, d_gates, dh, zoneout,
                              recurrent_mask);
  }
  // dh0 = its direct part (left in the carry by each row's first step) + that step's gradients @ those rows
  add_initial_state_grad(dh, schedule, d_gates.narrow(1, 0, read_h), w_hh.narrow(0, 0, read_h), recurrent_mask);

  const auto x2d = input.view({s.rows, s.input_size});
  // dW_hh from the states as the product read them.
  const auto [h_read, h0_read] = states_as_read(output2d, hx, recurrent_mask, batch_sizes);
  const LayerGradArgs args{x2d, w_ih, h_read, h0_read, schedule, !batch_sizes.has_value(),
                           reverse, output_mask, input_.sizes(), input_.options(), cpu_matmul};
  const auto g = gru_layer_grads(args, d_gates, reset_after ? Tensor() : saved.narrow(1, 3 * H, H));
  return {g.input, dh.to(input_.scalar_type()), g.w_ih, g.w_hh, g.b_ih, g.b_hh};
}

}  // namespace

TORCH_LIBRARY_IMPL(gatedrnn, CPU, m) {
  m.impl("gru_forward", &gru_forward_op<gru_forward_cpu, gru_norm_forward_cpu>);
  m.impl("gru_backward", &gru_backward_op<gru_backward_cpu, gru_norm_backward_cpu>);
}

}  // namespace gatedrnn::cpu
