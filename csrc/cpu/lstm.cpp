// LSTM on the CPU: one layer and direction over the whole sequence.
//
// Forward, for each chunk of steps (products.h): the input projection of the chunk's rows (tile products),
// then each step as one set of fused tiles: a tile computes h_{t-1} @ W_hh^T for all four gates of L hidden
// units and up to MR batch rows in registers, adds the projection and the biases and runs the cell update
// (cells.h) before anything is written; with proj_size, one more product h_t @ W_hr^T per step. Backward
// mirrors it: a tile computes dG_{t+1} @ W_hh for L*4 hidden units and runs step t's cell derivative on the
// result; the weight and input gradients are single GEMMs after the loop (layer_grads.h). One team of
// threads runs a whole loop, a barrier between dependent phases; nothing is allocated inside it. A forward
// call of at most kInPlaceRows rows (a cell's step) reads W_ih and W_hh in place instead of packing them
// (products.h's prepare_weight).
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

constexpr int64_t kGates = 4;

template <typename T>
using LstmInputTiles = InputTiles<T, kGates>;
GATEDRNN_TILE_KERNELS(run_input_tiles, LstmInputTiles, "lstm_input_projection")
GATEDRNN_TILE_KERNELS(run_store_tiles, ProductTiles, "lstm_projection")

// ------------------------------------------------------------------------------------------- forward
// One forward step over GateMajor tiles: h_{t-1} @ W_hh^T for the four gates of L units, then the cell.
// S: the type of the recurrent state h and of the weights (T, or bfloat16 for the bfloat16 tiles, which
// compute in float32 and round h_t once).
template <typename T, typename S = T>
struct ForwardTiles : TileBase<T, kGates, S> {  // depth R
  RecurrentStates<S> states;  // h_{t-1} of each row; output: h_t out (without projection)
  // Input projection (x @ W_ih^T) of rows from proj_row0 on, in rows of proj_stride (4H); activations out
  // when saving.
  T* input_proj;
  int64_t proj_row0, proj_stride;
  const T* bias;  // [4H]: b_ih + b_hh, or null
  T* c_state;     // [B, H]: c_{t-1} in, c_t out
  S* h_state;     // [B, R]: each row's latest h_t (the final state at the end)
  T* cells;       // [N, H]: saved c_t, or null
  T* pre_proj;    // [B, H]: h_t before the projection, or null
  ZoneoutKeep<T> keep_h, keep_c;  // without a projection only
  // Recurrent dropout (without a projection; states.masked_*): the product reads h_{t-1} * mask.
  const T* recurrent_mask;  // [B, R]: 0 or 1 / (1 - p), or null
  int64_t hidden, state, rows;
  Step step;

  const S* a_row(int64_t b) const { return states.read_row(step, b); }

  template <int L, bool kSave, bool kProj, bool kBias, bool kZoneout, bool kDropout>
  GATEDRNN_ALWAYS_INLINE void cell(const T* acc, int64_t b, int64_t j0, int64_t width) const {
    const int64_t H = hidden, row = step.offset + b;
    T* g = input_proj + (row - proj_row0) * proj_stride + j0;
    T* c = c_state + b * H + j0;
    const S* h_prev = states.prev_row(step, b) + j0;  // used with zoneout only (no projection: R = H)
    const T* mask = kDropout ? recurrent_mask + b * state + j0 : nullptr;
    T keep_hidden[kZoneout ? L : 1], keep_cell[kZoneout ? L : 1];
    if constexpr (kZoneout) {
      load_keep(keep_h, row, j0, width, keep_hidden);
      load_keep(keep_c, row, j0, width, keep_cell);
    }
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < width; ++l) {
      T pre[kGates];
      for (int64_t q = 0; q < kGates; ++q) {
        pre[q] = acc[q * L + l] + g[q * H + l] + (kBias ? bias[q * H + j0 + l] : T(0));
      }
      const auto a = lstm_activate<T>(pre[0], pre[1], pre[2], pre[3]);
      T c_new = lstm_cell_state(a, c[l]);
      T h_new = lstm_hidden(a, c_new);
      if constexpr (kZoneout) {  // both from the cell's own update (cells.h); keep 0 for a state without
        h_new = zoneout(keep_hidden[l], from_storage<T>(h_prev[l]), h_new);
        c_new = zoneout(keep_cell[l], c[l], c_new);
      }
      c[l] = c_new;
      if constexpr (kSave) {
        store_gates(g, H, l, a.i, a.f, a.g, a.o);
        cells[row * H + j0 + l] = c_new;
      }
      if constexpr (kProj) {
        pre_proj[b * H + j0 + l] = h_new;
      } else {
        states.output[row * state + j0 + l] = to_storage<S>(h_new);
        h_state[b * state + j0 + l] = to_storage<S>(h_new);
        if constexpr (kDropout) states.masked_output[row * state + j0 + l] = to_storage<S>(h_new * mask[l]);
      }
    }
  }

  // kZoneout and kDropout: only without a projection (the ops refuse them with one).
  template <int L, bool kZoneout, bool kDropout>
  GATEDRNN_ALWAYS_INLINE void finish_rows(const T* acc, int64_t b0, int64_t n, int64_t j0, int64_t width) const {
    for (int64_t r = 0; r < n; ++r) {
      const T* a = acc + r * kGates * L;
      const int64_t b = b0 + r;
      if (bias) {
        if (cells) {
          pre_proj ? cell<L, true, true, true, false, false>(a, b, j0, width)
                   : cell<L, true, false, true, kZoneout, kDropout>(a, b, j0, width);
        } else {
          pre_proj ? cell<L, false, true, true, false, false>(a, b, j0, width)
                   : cell<L, false, false, true, kZoneout, kDropout>(a, b, j0, width);
        }
      } else {
        if (cells) {
          pre_proj ? cell<L, true, true, false, false, false>(a, b, j0, width)
                   : cell<L, true, false, false, kZoneout, kDropout>(a, b, j0, width);
        } else {
          pre_proj ? cell<L, false, true, false, false, false>(a, b, j0, width)
                   : cell<L, false, false, false, kZoneout, kDropout>(a, b, j0, width);
        }
      }
    }
  }

  template <int L>
  GATEDRNN_ALWAYS_INLINE void finish(const T* acc, int64_t b0, int64_t n, int64_t p) const {
    const int64_t j0 = p * L, width = std::min<int64_t>(L, hidden - j0);
    const bool zoned = keep_h.data || keep_c.data;
    if (states.masked_output) {
      zoned ? finish_rows<L, true, true>(acc, b0, n, j0, width) : finish_rows<L, false, true>(acc, b0, n, j0, width);
    } else {
      zoned ? finish_rows<L, true, false>(acc, b0, n, j0, width) : finish_rows<L, false, false>(acc, b0, n, j0, width);
    }
  }
};

GATEDRNN_TILE_KERNELS(run_forward_tiles, ForwardTiles, "lstm_forward_step")
#ifdef GATEDRNN_HAVE_BF16_TILES
using Bf16InputTiles = InputTiles<float, kGates, c10::BFloat16>;
GATEDRNN_BF16_TILE_KERNEL(run_input_tiles, Bf16InputTiles, "lstm_input_projection_bf16")
using Bf16ForwardTiles = ForwardTiles<float, c10::BFloat16>;
GATEDRNN_BF16_TILE_KERNEL(run_forward_tiles, Bf16ForwardTiles, "lstm_forward_step_bf16")
#endif

// T: the type computed in; S: the type of x, h and the weights (T, or bfloat16 with T float, inference
// without a projection only).
template <typename T, typename S = T>
void lstm_forward_loop(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& x2d, const Tensor& w_ih,
                       const Tensor& w_hh, const OptTensor& w_hr, const OptTensor& bias, const Tensor& h0,
                       Tensor& gates, Tensor& output2d, Tensor& hy, Tensor& cy, Tensor& cells, bool save,
                       const OptTensor& zoneout, const OptTensor& zoneout_cell, const OptTensor& recurrent_mask) {
  const int64_t H = s.hidden, R = s.state, G = kGates * H, L = lanes_for<S>();
  const bool proj = w_hr.has_value();
  constexpr bool kSameTypes = std::is_same_v<S, T>;
  TORCH_INTERNAL_ASSERT(kSameTypes || (!proj && !save));
  const auto hr = proj ? pack_tiles(*w_hr, kGates, L, Columns::Contiguous, Scratch::PackedProjection) : Tensor();
  const int64_t unit_tiles = tile_count(G, kGates, L, Columns::GateMajor);
  const int64_t state_tiles = tile_count(R, kGates, L, Columns::Contiguous);
  const auto chunks = plan_chunks(schedule, chunk_rows(G * int64_t(sizeof(T))));
  if (!save) gates = chunk_buffer(chunks, G, x2d.options().dtype(c10::CppTypeToScalarType<T>::value));
  auto pre_proj = proj ? at::empty({s.batch, H}, gates.options()) : Tensor();
  std::array<Tensor, 2> masked;
  const auto states = recurrent_states<S>(h0, output2d, recurrent_mask, masked);

  InputTiles<T, kGates, S> input{{nullptr, 0, s.input_size}, x2d.const_data_ptr<S>(), nullptr, G, H, 0, 0};
  ForwardTiles<T, S> cell{{nullptr, 0, R},
                          states,
                          gates.data_ptr<T>(),
                          0,
                          G,
                          bias.has_value() ? bias->const_data_ptr<T>() : nullptr,
                          cy.data_ptr<T>(),
                          hy.data_ptr<S>(),
                          save ? cells.data_ptr<T>() : nullptr,
                          proj ? pre_proj.data_ptr<T>() : nullptr,
                          zoneout_keep<T>(zoneout),
                          zoneout_keep<T>(zoneout_cell),
                          recurrent_mask ? recurrent_mask->const_data_ptr<T>() : nullptr,
                          H,
                          R,
                          0,
                          Step{}};
  const Tensor ih = prepare_weight(input, w_ih, Columns::GateMajor, Scratch::PackedInput, s.rows);
  const Tensor hh = prepare_weight(cell, w_hh, Columns::GateMajor, Scratch::PackedRecurrent, s.rows);
  // h_t = pre_proj @ W_hr^T, into the step's output rows and the final state.
  ProductTiles<T> projection{};
  if constexpr (kSameTypes) {
    if (proj) {
      projection = {{hr.const_data_ptr<T>(), hr.stride(0), H}, pre_proj.const_data_ptr<T>(), H, 1, nullptr,
                    hy.data_ptr<T>(), R, R, 0, false};
    }
  }

  run_team([&](const Team& team) {
    auto pr = projection;
    const auto run_input = [](const auto& in, int64_t b, int64_t e) { run_input_tiles(in, b, e); };
    forward_chunks(team, chunks, schedule, save, unit_tiles, input, cell, run_input, [&](const auto& st) {
      auto share = share_of(tile_items(st, unit_tiles), team.tid, team.threads);
      run_forward_tiles(st, share.begin, share.end);
      team.barrier();
      if constexpr (kSameTypes) {
        if (proj) {
          pr.rows = st.rows;
          pr.c = st.states.output + st.step.offset * R;
          share = share_of(tile_items(pr, state_tiles), team.tid, team.threads);
          run_store_tiles(pr, share.begin, share.end);
          team.barrier();
        }
      }
    });
  });
}

// bfloat16 inference on the bfloat16 tiles (bf16.h): x, h and the weights stay bfloat16, the cell state,
// the projection buffer and the biases are float32.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_bf16(const LayerShape& s, const Tensor& input_,
                                                                     const OptTensor& batch_sizes, const Tensor& hx_,
                                                                     const Tensor& cx_, const Tensor& w_ih,
                                                                     const Tensor& w_hh, const OptTensor& b_ih,
                                                                     const OptTensor& b_hh, bool reverse,
                                                                     const OptTensor& zoneout,
                                                                     const OptTensor& zoneout_cell,
                                                                     const OptTensor& recurrent_mask) {
#ifdef GATEDRNN_HAVE_BF16_TILES
  const auto input = input_.contiguous();
  const auto x2d = input.view({s.rows, s.input_size});
  // h0 and hy are separate: hy is written by the rows' last steps while other rows may still read h0.
  const auto h0 = hx_.contiguous();
  auto hy = hx_.clone().contiguous();
  auto cy = cx_.to(at::kFloat, false, true).contiguous();
  const auto f32 = input.options().dtype(at::kFloat);
  const OptTensor bias =
      b_ih.has_value() ? OptTensor((b_ih->to(at::kFloat) + b_hh->to(at::kFloat)).contiguous()) : std::nullopt;
  auto output2d = at::empty({s.rows, s.state}, input.options());
  auto gates = at::empty({0}, f32), cells = at::empty({0}, f32);
  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  lstm_forward_loop<float, c10::BFloat16>(schedule, s, x2d, w_ih, w_hh, std::nullopt, bias, h0, gates, output2d, hy,
                                          cy, cells, false, zoneout, zoneout_cell, recurrent_mask);
  auto output_shape = input_.sizes().vec();
  output_shape.back() = s.state;
  return {output2d.view(output_shape), hy, cy.to(at::kBFloat16), at::empty({0}, f32), at::empty({0}, f32)};
#else
  TORCH_INTERNAL_ASSERT(false, "bfloat16 tiles are not compiled in");
#endif
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_cpu(const Tensor& input_, const OptTensor& batch_sizes,
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
  if (input_.scalar_type() == at::kBFloat16 && !save && !w_hr_.has_value() && bf16_tiles_available()) {
    return lstm_forward_bf16(s, input_, batch_sizes, hx_, cx_, w_ih_, w_hh_, b_ih_, b_hh_, reverse, zoneout,
                             zoneout_cell, recurrent_mask);
  }

  const auto dtype = compute_dtype(input_.scalar_type());
  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto w_hr = to_compute(w_hr_, dtype);
  // h0 and hy are separate: hy is written by the rows' last steps while other rows may still read h0.
  const auto h0 = to_compute(hx_, dtype);
  auto hy = hx_.to(dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
  auto cy = cx_.to(dtype, false, true).contiguous();

  const auto x2d = input.view({s.rows, s.input_size});
  // saved_rows (padded.h): the saved activations keep that many rows, these rows first.
  auto gates_kept = saved_rows_tensor(save, s.rows, saved_rows, kGates * s.hidden, input.options(), saved_empty);
  auto gates = save ? gates_kept.narrow(0, 0, s.rows) : Tensor();
  const OptTensor bias =
      b_ih_.has_value() ? OptTensor((b_ih_->to(dtype) + b_hh_->to(dtype)).contiguous()) : std::nullopt;
  auto output2d = at::empty({s.rows, s.state}, input.options());
  auto cells_kept = saved_rows_tensor(save, s.rows, saved_rows, s.hidden, input.options(), saved_empty);
  auto cells = save ? cells_kept.narrow(0, 0, s.rows) : at::empty({0}, input.options());

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_lstm_forward_cpu", [&] {
    lstm_forward_loop<scalar_t>(schedule, s, x2d, w_ih, w_hh, w_hr, bias, h0, gates, output2d, hy, cy, cells, save,
                                zoneout, zoneout_cell, recurrent_mask);
  });

  auto output_shape = input_.sizes().vec();
  output_shape.back() = s.state;
  const auto storage = input_.scalar_type();
  if (!save) return {output2d.view(output_shape).to(storage), hy.to(storage), cy.to(storage),
                     at::empty({0}, input.options()), at::empty({0}, input.options())};
  return {output2d.view(output_shape).to(storage), hy.to(storage), cy.to(storage), gates_kept, cells_kept};
}

// ------------------------------------------------------------------------------------------ backward
// The gradient reaching each projected output r_t of a step (with proj_size): grad_output + the carry (the
// final state's gradient, for rows that end here) + dG_{t+1} @ W_hh, stored into d_proj's rows.
template <typename T>
struct ProjectedGradTiles : TileBase<T, 4> {
  static constexpr int kGroups = 4;
  LaterRows<T> later;
  const T* grad_output;  // [N, R]
  T* carry;              // [B, R]
  T* d_proj;             // [N, R]
  int64_t state, rows;
  Step step;

  const T* a_row(int64_t b) const { return later.row(b); }

  template <int L>
  GATEDRNN_ALWAYS_INLINE void finish(const T* acc, int64_t b0, int64_t n, int64_t p) const {
    const int64_t c0 = p * kGroups * L, width = std::min<int64_t>(kGroups * L, state - c0);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t b = b0 + r, row = step.offset + b;
      const T* a = acc + r * kGroups * L;
      const T* go = grad_output + row * state + c0;
      T* cr = carry + b * state + c0;
      T* d = d_proj + row * state + c0;
      GATEDRNN_IVDEP
      for (int64_t c = 0; c < width; ++c) {
        d[c] = a[c] + go[c] + cr[c];
        cr[c] = T(0);
      }
    }
  }
};

GATEDRNN_TILE_KERNELS(run_projected_grad_tiles, ProjectedGradTiles, "lstm_backward_projection")

// One backward step over Contiguous tiles of 4L hidden units: the gradient reaching h_t (dG_{t+1} @ W_hh
// plus grad_output and the carry; or, with proj_size, d_proj's rows @ W_hr), then step t's cell derivative.
template <typename T>
struct BackwardTiles : TileBase<T, 4> {
  static constexpr int kGroups = 4;
  LaterRows<T> later;    // A rows without projection
  const T* d_proj;       // A rows with projection: [N, R], or null
  const T* gates;        // [N, 4H] saved activations
  const T* cells;        // [N, H] saved c_t
  const T* c0;           // [B, H]
  const T* grad_output;  // [N, R]
  T* carry;              // [B, R]: the final state's gradient until a row's last step consumes it
  T* dc_state;           // [B, H]: gradient reaching c_t in, c_{t-1} out
  T* d_gates;            // [N, 4H]
  T* pre_proj;           // [N, H]: recomputed h_t before the projection (for dW_hr), or null
  ZoneoutKeep<T> keep_h, keep_c;  // without a projection only
  const T* recurrent_mask;        // [B, R] with recurrent dropout (no projection), or null
  int64_t hidden, state, rows;
  Step step;

  const T* a_row(int64_t b) const { return d_proj ? d_proj + (step.offset + b) * state : later.row(b); }

  template <int L, bool kProj, bool kZoneout, bool kDropout>
  GATEDRNN_ALWAYS_INLINE void cell(const T* acc, int64_t b, int64_t j0, int64_t width) const {
    const int64_t H = hidden, row = step.offset + b;
    const T* g = gates + row * kGates * H + j0;
    const T* c = cells + row * H + j0;
    // c_{t-1}: the previous step's saved cell state, or c0 for a row's first step.
    const T* c_prev = (b < step.prev_rows ? cells + (step.prev_offset + b) * H : c0 + b * H) + j0;
    T* dc = dc_state + b * H + j0;
    T* dg = d_gates + row * kGates * H + j0;
    // Without a projection hidden units are state columns (R = H).
    const T* go = kProj ? nullptr : grad_output + row * state + j0;
    T* cr = kProj ? nullptr : carry + b * state + j0;
    T keep_hidden[kZoneout ? kGroups * L : 1], keep_cell[kZoneout ? kGroups * L : 1];
    if constexpr (kZoneout) {
      load_keep(keep_h, row, j0, width, keep_hidden);
      load_keep(keep_c, row, j0, width, keep_cell);
    }
    const T* mask = kDropout ? recurrent_mask + b * state + j0 : nullptr;
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < width; ++l) {
      const LstmGates<T> a{g[l], g[H + l], g[2 * H + l], g[3 * H + l]};
      // Through W_hh the gradient reaches h_t * mask with recurrent dropout.
      T d_hidden = kDropout ? acc[l] * mask[l] : acc[l];
      if constexpr (kProj) {
        pre_proj[row * H + j0 + l] = lstm_hidden(a, c[l]);  // recomputed for dW_hr, not saved
      } else {
        d_hidden += go[l] + cr[l];
        cr[l] = T(0);
      }
      LstmGateGrads<T> d;
      if constexpr (kZoneout) {
        // h_t = k_h h_{t-1} + (1 - k_h) o tanh(c~), c_t = k_c c_{t-1} + (1 - k_c) c~ (cells.h): the kept parts
        // pass straight to step t-1 (h's through the carry), the rest through the cell's own derivative at
        // c~ = f c_{t-1} + i g, which is recomputed (c_t is saved zoned out).
        const T k_h = keep_hidden[l], k_c = keep_cell[l];
        cr[l] = k_h * d_hidden;
        const T c_cand = lstm_cell_state(a, c_prev[l]);
        dc[l] = lstm_backward(a, c_cand, c_prev[l], (T(1) - k_h) * d_hidden, (T(1) - k_c) * dc[l], d) + k_c * dc[l];
      } else {
        dc[l] = lstm_backward(a, c[l], c_prev[l], d_hidden, dc[l], d);
      }
      store_gates(dg, H, l, d.i, d.f, d.g, d.o);
    }
  }

  template <int L>
  GATEDRNN_ALWAYS_INLINE void finish(const T* acc, int64_t b0, int64_t n, int64_t p) const {
    const int64_t j0 = p * kGroups * L, width = std::min<int64_t>(kGroups * L, hidden - j0);
    for (int64_t r = 0; r < n; ++r) {
      const T* a = acc + r * kGroups * L;
      const bool zoned = keep_h.data || keep_c.data;
      if (pre_proj) {
        cell<L, true, false, false>(a, b0 + r, j0, width);
      } else if (recurrent_mask) {
        zoned ? cell<L, false, true, true>(a, b0 + r, j0, width) : cell<L, false, false, true>(a, b0 + r, j0, width);
      } else {
        zoned ? cell<L, false, true, false>(a, b0 + r, j0, width) : cell<L, false, false, false>(a, b0 + r, j0, width);
      }
    }
  }
};

GATEDRNN_TILE_KERNELS(run_backward_tiles, BackwardTiles, "lstm_backward_step")

template <typename T>
void lstm_backward_loop(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& grad_out2d,
                        const Tensor& gates, const Tensor& cells, const Tensor& c0, const Tensor& w_hh,
                        const OptTensor& w_hr, Tensor& d_gates, Tensor& carry, Tensor& dc, Tensor& d_proj,
                        Tensor& hidden_pre_proj, const OptTensor& zoneout, const OptTensor& zoneout_cell,
                        const OptTensor& recurrent_mask) {
  const int64_t H = s.hidden, R = s.state, G = kGates * H, L = tile_lanes<T>();
  const bool proj = w_hr.has_value();
  // dh = dG @ W_hh ([4H, R]) and, with a projection, dh_pre = d_proj @ W_hr ([R, H]): both weights are
  // [K, N], packed from their transposes.
  const auto hh = pack_for_later_steps(schedule, w_hh, L, Scratch::PackedRecurrent);
  const auto hr = proj ? pack_tiles(w_hr->t(), kGates, L, Columns::Contiguous, Scratch::PackedProjection) : Tensor();
  const auto zeros = at::zeros({G}, w_hh.options());
  const int64_t unit_tiles = tile_count(H, kGates, L, Columns::Contiguous);
  const int64_t state_tiles = tile_count(R, kGates, L, Columns::Contiguous);

  const LaterRows<T> later{d_gates.const_data_ptr<T>(), zeros.const_data_ptr<T>(), G, 0, 0};
  ProjectedGradTiles<T> projected{{hh.const_data_ptr<T>(), hh.stride(0), G},
                                  later,
                                  grad_out2d.const_data_ptr<T>(),
                                  carry.data_ptr<T>(),
                                  proj ? d_proj.data_ptr<T>() : nullptr,
                                  R,
                                  0,
                                  Step{}};
  BackwardTiles<T> cell{{proj ? hr.const_data_ptr<T>() : hh.const_data_ptr<T>(), proj ? hr.stride(0) : hh.stride(0),
                         proj ? R : G},
                        later,
                        proj ? d_proj.const_data_ptr<T>() : nullptr,
                        gates.const_data_ptr<T>(),
                        cells.const_data_ptr<T>(),
                        c0.const_data_ptr<T>(),
                        grad_out2d.const_data_ptr<T>(),
                        carry.data_ptr<T>(),
                        dc.data_ptr<T>(),
                        d_gates.data_ptr<T>(),
                        proj ? hidden_pre_proj.data_ptr<T>() : nullptr,
                        zoneout_keep<T>(zoneout),
                        zoneout_keep<T>(zoneout_cell),
                        recurrent_mask ? recurrent_mask->const_data_ptr<T>() : nullptr,
                        H,
                        R,
                        0,
                        Step{}};

  run_team([&](const Team& team) {
    auto pg = projected;
    auto st = cell;
    for (size_t k = schedule.size(); k-- > 0;) {
      const Step& step = schedule[k];
      if (proj) {
        pg.step = step;
        pg.rows = step.rows;
        pg.k = point_at_later_step(pg.later, schedule, k, G);
        const auto share = share_of(tile_items(pg, state_tiles), team.tid, team.threads);
        run_projected_grad_tiles(pg, share.begin, share.end);
        team.barrier();
      } else {
        st.k = point_at_later_step(st.later, schedule, k, G);
      }
      st.step = step;
      st.rows = step.rows;
      const auto share = share_of(tile_items(st, unit_tiles), team.tid, team.threads);
      run_backward_tiles(st, share.begin, share.end);
      team.barrier();
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_cpu(
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
  const auto dtype = compute_dtype(input_.scalar_type());

  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto w_hr = to_compute(w_hr_, dtype);
  const auto hx = to_compute(hx_, dtype), cx = to_compute(cx_, dtype);
  const auto grad_out2d = to_compute(grad_output_, dtype).view({s.rows, s.state});
  const auto output2d = to_compute(output_, dtype).view({s.rows, s.state});
  const auto gates = gates_.contiguous().view({s.rows, kGates * s.hidden});
  const auto cells = cells_.contiguous().view({s.rows, s.hidden});
  auto carry = grad_hy_.to(dtype, false, true).contiguous();
  auto dc = grad_cy_.to(dtype, false, true).contiguous();

  auto d_gates = scratch_tensor(Scratch::Gates, {s.rows, kGates * s.hidden}, input.options());
  const bool proj = w_hr.has_value();
  auto d_proj = proj ? scratch_tensor(Scratch::Projection, {s.rows, s.state}, input.options()) : Tensor();
  auto hidden_pre_proj = proj ? scratch_tensor(Scratch::PreProjection, {s.rows, s.hidden}, input.options()) : Tensor();

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_lstm_backward_cpu", [&] {
    lstm_backward_loop<scalar_t>(schedule, s, grad_out2d, gates, cells, cx, w_hh, w_hr, d_gates, carry, dc, d_proj,
                                 hidden_pre_proj, zoneout, zoneout_cell, recurrent_mask);
  });
  // Every row's carry was consumed (zeroed) by its last step, unless there was none (T = 0: h_n is h0), or
  // holds the kept part k_h dh of its first step with zoneout; h0 reaches the rows' first steps through W_hh.
  auto& dh = carry;
  add_initial_state_grad(dh, schedule, d_gates, w_hh, recurrent_mask);

  const auto x2d = input.view({s.rows, s.input_size});
  // dW_hh from the states as the product read them.
  const auto [h_read, h0_read] = states_as_read(output2d, hx, recurrent_mask, batch_sizes);
  const LayerGradArgs args{x2d, w_ih, h_read, h0_read, schedule, !batch_sizes.has_value(),
                           reverse, output_mask, input_.sizes(), input_.options(), cpu_matmul};
  const auto g = lstm_layer_grads(args, d_gates, d_proj, hidden_pre_proj);
  const auto storage = input_.scalar_type();
  return {g.input, dh.to(storage), dc.to(storage), g.w_ih, g.w_hh, g.bias, g.w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(gatedrnn, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_op<lstm_forward_cpu, lstm_norm_forward_cpu>);
  m.impl("lstm_backward", &lstm_backward_op<lstm_backward_cpu, lstm_norm_backward_cpu>);
}

}  // namespace gatedrnn::cpu
