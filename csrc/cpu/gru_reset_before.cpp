// GRU with reset_after=False on the CPU: two dependent tile products per step, each fused with its part of the
// cell (cells.h, "GRU, reset before the product"); the plain GRU's loops (gru.cpp) are the model.
//
// Forward step: (1) ResetGateTiles, GateMajor over W_hh's r and z rows: h_{t-1} @ W_h[rz]^T for L units and up
// to MR batch rows, then r and z (written over the projection's r and z columns) and rh = r * h_{t-1} into a
// [B, H] buffer; a barrier; (2) CandidateTiles over W_hn: rh @ W_hn^T, then n and h_t; a barrier. Backward
// step, in reverse: (1) UpdateGradTiles: [dr, dz]_{t+1} @ W_h[rz] for 4L units, then dz, dn and the carry's
// direct part dh * z; a barrier; (2) ResetGradTiles: dn_t @ W_hn, then dr and the carry's d(rh) * r; a
// barrier. A step costs the plain GRU's multiply-adds, split over two products and one more barrier.
#include "gru_reset_before.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>

#include "../cells.h"
#include "gru_backward_state.h"
#include "loops.h"
#include "products.h"
#include "team.h"
#include "tiles.h"
#include "workspace.h"

namespace gatedrnn::cpu {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kGates = 3;
constexpr int64_t kSaved = 4;  // r, z, n, rh per hidden unit; also d_gates' columns: dr, dz, dn, dn

// Calls tiles.row<L, kSet...>(acc of row r, b0 + r, j0, width) for the n rows of a tile, with the tiles'
// runtime flags (tiles.flag(i), i < Tiles::kFlags) as template arguments, so that each combination is its own
// vectorised loop. (No lambda: see run_tiles_with in tiles.h.)
template <int L, typename Tiles, bool... kSet>
GATEDRNN_ALWAYS_INLINE void rows_with_flags(const Tiles& tiles, const typename Tiles::scalar* acc, int64_t b0,
                                            int64_t n, int64_t j0, int64_t width) {
  if constexpr (sizeof...(kSet) == Tiles::kFlags) {
    for (int64_t r = 0; r < n; ++r) tiles.template row<L, kSet...>(acc + r * Tiles::kGroups * L, b0 + r, j0, width);
  } else if (tiles.flag(sizeof...(kSet))) {
    rows_with_flags<L, Tiles, kSet..., true>(tiles, acc, b0, n, j0, width);
  } else {
    rows_with_flags<L, Tiles, kSet..., false>(tiles, acc, b0, n, j0, width);
  }
}

template <typename T>
using GruInputTiles = InputTiles<T, kGates>;
GATEDRNN_TILE_KERNELS(run_input_tiles, GruInputTiles, "gru_reset_before_input_projection")

// ------------------------------------------------------------------------------------------- forward
// What both phases of a forward step read and write.
template <typename T>
struct ForwardStep {
  RecurrentStates<T> states;  // h_{t-1} of each row, as the cell sees it and as the products read it; h_t out
  // Input projection (x @ W_ih^T) of rows from proj_row0 on, in rows of proj_stride. Phase one replaces the r
  // and z pre-activations with r and z; when saving these are the [N, 4H] saved buffer's rows, which end as
  // r, z, n, rh.
  T* input_proj;
  int64_t proj_row0, proj_stride;
  const T* bias;            // [3H]: b_ih + b_hh, or null
  T* reset_hidden;          // [B, H]: rh of this step's rows, the second product's A
  T* h_state;               // [B, H]: each row's latest h_t (the final state at the end)
  ZoneoutKeep<T> keep;      // zoneout of h (cells.h), or none
  const T* recurrent_mask;  // [B, H] with recurrent dropout (both products read h_{t-1} * mask), or null
  bool save;
  int64_t hidden, rows;
  Step step;

  const T* prev_row(int64_t b) const { return states.prev_row(step, b); }
  const T* read_row(int64_t b) const { return states.read_row(step, b); }
  T* proj_row(int64_t b) const { return input_proj + (step.offset + b - proj_row0) * proj_stride; }
};

// Phase one: h_{t-1} @ W_h[rz]^T for the r and z gates of L units, then r, z and rh.
template <typename T>
struct ResetGateTiles : TileBase<T, 2> {  // depth H
  static constexpr int kFlags = 2;        // bias, save
  const ForwardStep<T>* st;
  int64_t rows;

  const T* a_row(int64_t b) const { return st->read_row(b); }
  bool flag(size_t i) const { return i == 0 ? st->bias != nullptr : st->save; }

  template <int L, bool kBias, bool kSave>
  GATEDRNN_ALWAYS_INLINE void row(const T* acc, int64_t b, int64_t j0, int64_t width) const {
    const int64_t H = st->hidden;
    T* gi = st->proj_row(b) + j0;
    const T* h = st->read_row(b) + j0;
    const T* bias = kBias ? st->bias + j0 : nullptr;
    T* rh = st->reset_hidden + b * H + j0;
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < width; ++l) {
      const T r = sigmoid(gi[l] + (kBias ? bias[l] : T(0)) + acc[l]);
      const T z = sigmoid(gi[H + l] + (kBias ? bias[H + l] : T(0)) + acc[L + l]);
      gi[l] = r;
      gi[H + l] = z;
      rh[l] = r * h[l];
      if constexpr (kSave) gi[3 * H + l] = r * h[l];
    }
  }

  template <int L>
  GATEDRNN_ALWAYS_INLINE void finish(const T* acc, int64_t b0, int64_t n, int64_t p) const {
    const int64_t j0 = p * L;
    rows_with_flags<L>(*this, acc, b0, n, j0, std::min<int64_t>(L, st->hidden - j0));
  }
};

// Phase two: rh @ W_hn^T for L units, then n and h_t.
template <typename T>
struct CandidateTiles : TileBase<T, 1> {  // depth H
  static constexpr int kFlags = 4;        // bias, save, zoneout, recurrent dropout
  const ForwardStep<T>* st;
  int64_t rows;

  const T* a_row(int64_t b) const { return st->reset_hidden + b * st->hidden; }
  bool flag(size_t i) const {
    const bool flags[kFlags] = {st->bias != nullptr, st->save, st->keep.data != nullptr,
                                st->recurrent_mask != nullptr};
    return flags[i];
  }

  template <int L, bool kBias, bool kSave, bool kZoneout, bool kDropout>
  GATEDRNN_ALWAYS_INLINE void row(const T* acc, int64_t b, int64_t j0, int64_t width) const {
    const int64_t H = st->hidden, row = st->step.offset + b;
    T* gi = st->proj_row(b) + j0;
    const T* h = st->prev_row(b) + j0;
    const T* bias_n = kBias ? st->bias + 2 * H + j0 : nullptr;
    const T* mask = kDropout ? st->recurrent_mask + b * H + j0 : nullptr;
    T* masked = kDropout ? st->states.masked_output + row * H + j0 : nullptr;
    T* out = st->states.output + row * H + j0;
    T* hs = st->h_state + b * H + j0;
    T keep_hidden[kZoneout ? L : 1];
    if constexpr (kZoneout) load_keep(st->keep, row, j0, width, keep_hidden);
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < width; ++l) {
      const T n = gru_reset_before_candidate(gi[2 * H + l] + (kBias ? bias_n[l] : T(0)), acc[l]);
      T h_new = gru_hidden(GruGates<T>{gi[l], gi[H + l], n, T(0)}, h[l]);
      if constexpr (kZoneout) h_new = zoneout(keep_hidden[l], h[l], h_new);
      out[l] = h_new;
      hs[l] = h_new;
      if constexpr (kDropout) masked[l] = h_new * mask[l];
      if constexpr (kSave) gi[2 * H + l] = n;
    }
  }

  template <int L>
  GATEDRNN_ALWAYS_INLINE void finish(const T* acc, int64_t b0, int64_t n, int64_t p) const {
    const int64_t j0 = p * L;
    rows_with_flags<L>(*this, acc, b0, n, j0, std::min<int64_t>(L, st->hidden - j0));
  }
};

GATEDRNN_TILE_KERNELS(run_reset_gate_tiles, ResetGateTiles, "gru_reset_before_gates_step")
GATEDRNN_TILE_KERNELS(run_candidate_tiles, CandidateTiles, "gru_reset_before_candidate_step")

template <typename T>
void forward_loop(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& x2d, const Tensor& w_ih,
                  const Tensor& w_hh, const OptTensor& bias, const Tensor& h0, Tensor& saved, Tensor& output2d,
                  Tensor& hy, bool save, const OptTensor& zoneout, const OptTensor& recurrent_mask) {
  const int64_t H = s.hidden, L = tile_lanes<T>();
  std::array<Tensor, 2> masked;
  const auto states = recurrent_states<T>(h0, output2d, recurrent_mask, masked);
  const auto reset_hidden = at::empty({s.batch, H}, output2d.options());
  const Tensor ih = pack_tiles(w_ih, kGates, L, Columns::GateMajor, Scratch::PackedInput);
  const Tensor rz = pack_tiles(w_hh.narrow(0, 0, 2 * H), 2, L, Columns::GateMajor, Scratch::PackedRecurrent);
  const Tensor hn = pack_tiles(w_hh.narrow(0, 2 * H, H), 1, L, Columns::GateMajor, Scratch::PackedProjection);
  const int64_t unit_tiles = tile_count(H, 1, L, Columns::GateMajor);  // the same for all three products
  const auto chunks = plan_chunks(schedule, chunk_rows(kGates * H * int64_t(sizeof(T))));
  if (!save) saved = chunk_buffer(chunks, kGates * H, x2d.options());
  const int64_t stride = saved.stride(0);

  const InputTiles<T, kGates> input{
      {ih.const_data_ptr<T>(), ih.stride(0), s.input_size}, x2d.const_data_ptr<T>(), nullptr, stride, H, 0, 0};
  const ForwardStep<T> step{states,
                            saved.data_ptr<T>(),
                            0,
                            stride,
                            bias.has_value() ? bias->const_data_ptr<T>() : nullptr,
                            reset_hidden.data_ptr<T>(),
                            hy.data_ptr<T>(),
                            zoneout_keep<T>(zoneout),
                            recurrent_mask ? recurrent_mask->const_data_ptr<T>() : nullptr,
                            save,
                            H,
                            0,
                            Step{}};

  run_team([&](const Team& team) {
    const auto run_input = [](const auto& in, int64_t b, int64_t e) { run_input_tiles(in, b, e); };
    forward_chunks(team, chunks, schedule, save, unit_tiles, input, step, run_input, [&](const ForwardStep<T>& st) {
      const ResetGateTiles<T> gates{{rz.const_data_ptr<T>(), rz.stride(0), H}, &st, st.rows};
      const auto first = share_of(tile_items(gates, unit_tiles), team.tid, team.threads);
      run_reset_gate_tiles(gates, first.begin, first.end);
      team.barrier();
      const CandidateTiles<T> candidate{{hn.const_data_ptr<T>(), hn.stride(0), H}, &st, st.rows};
      const auto second = share_of(tile_items(candidate, unit_tiles), team.tid, team.threads);
      run_candidate_tiles(candidate, second.begin, second.end);
      team.barrier();
    });
  });
}

// ------------------------------------------------------------------------------------------ backward
// saved: r, z, n, rh; d_gates: dr, dz, dn, dn; the carry: the gradient reaching h_{t-1} except through W_h[rz].
template <typename T>
struct BackwardStep : GruBackwardState<T> {
  const T* prev_row(int64_t b) const { return this->states.prev_row(this->step, b); }
};

// Phase one: dh = grad_output + carry + [dr, dz]_{t+1} @ W_h[rz] for 4L units, then dz, dn and the direct part.
template <typename T>
struct UpdateGradTiles : TileBase<T, 4> {  // depth 2H (0 for the last step)
  static constexpr int kFlags = 2;         // zoneout, recurrent dropout
  const BackwardStep<T>* st;
  int64_t rows;

  const T* a_row(int64_t b) const { return st->later.row(b); }
  bool flag(size_t i) const { return i == 0 ? st->keep.data != nullptr : st->recurrent_mask != nullptr; }

  template <int L, bool kZoneout, bool kDropout>
  GATEDRNN_ALWAYS_INLINE void row(const T* acc, int64_t b, int64_t j0, int64_t width) const {
    const int64_t H = st->hidden, row = st->step.offset + b;
    const T* sv = st->saved + row * kSaved * H + j0;
    const T* h = st->prev_row(b) + j0;
    const T* d_out = st->grad_output + row * H + j0;
    const T* mask = kDropout ? st->recurrent_mask + b * H + j0 : nullptr;
    T* cr = st->carry + b * H + j0;
    T* dg = st->d_gates + row * kSaved * H + j0;
    T keep_hidden[kZoneout ? 4 * L : 1];
    if constexpr (kZoneout) load_keep(st->keep, row, j0, width, keep_hidden);
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < width; ++l) {
      // Through W_h[rz] the gradient reaches h_t * mask with recurrent dropout.
      const T dh = (kDropout ? acc[l] * mask[l] : acc[l]) + d_out[l] + cr[l];
      const T k = kZoneout ? keep_hidden[l] : T(0);  // h_t = k h_{t-1} + (1 - k) h~_t
      GruUpdateGrads<T> d;
      const T direct = gru_reset_before_update_backward(sv[H + l], sv[2 * H + l], h[l], (T(1) - k) * dh, d);
      cr[l] = kZoneout ? direct + k * dh : direct;
      dg[H + l] = d.z;
      dg[2 * H + l] = d.n;
      dg[3 * H + l] = d.n;
    }
  }

  template <int L>
  GATEDRNN_ALWAYS_INLINE void finish(const T* acc, int64_t b0, int64_t n, int64_t p) const {
    const int64_t j0 = p * 4 * L;
    rows_with_flags<L>(*this, acc, b0, n, j0, std::min<int64_t>(4 * L, st->hidden - j0));
  }
};

// Phase two: d(rh) = dn_t @ W_hn for 4L units, then dr, and d(rh) * r into the carry.
template <typename T>
struct ResetGradTiles : TileBase<T, 4> {  // depth H
  static constexpr int kFlags = 1;        // recurrent dropout
  const BackwardStep<T>* st;
  int64_t rows;

  const T* a_row(int64_t b) const { return st->d_gates + (st->step.offset + b) * kSaved * st->hidden + 2 * st->hidden; }
  bool flag(size_t) const { return st->recurrent_mask != nullptr; }

  template <int L, bool kDropout>
  GATEDRNN_ALWAYS_INLINE void row(const T* acc, int64_t b, int64_t j0, int64_t width) const {
    const int64_t H = st->hidden, row = st->step.offset + b;
    const T* sv = st->saved + row * kSaved * H + j0;
    const T* h = st->prev_row(b) + j0;
    const T* mask = kDropout ? st->recurrent_mask + b * H + j0 : nullptr;
    T* cr = st->carry + b * H + j0;
    T* dg = st->d_gates + row * kSaved * H + j0;
    GATEDRNN_IVDEP
    for (int64_t l = 0; l < width; ++l) {
      const T m = kDropout ? mask[l] : T(1);  // rh = r * h_{t-1} * mask
      dg[l] = gru_reset_before_reset_backward(sv[l], h[l] * m, acc[l]);
      cr[l] += acc[l] * sv[l] * m;
    }
  }

  template <int L>
  GATEDRNN_ALWAYS_INLINE void finish(const T* acc, int64_t b0, int64_t n, int64_t p) const {
    const int64_t j0 = p * 4 * L;
    rows_with_flags<L>(*this, acc, b0, n, j0, std::min<int64_t>(4 * L, st->hidden - j0));
  }
};

GATEDRNN_TILE_KERNELS(run_update_grad_tiles, UpdateGradTiles, "gru_reset_before_backward_step")
GATEDRNN_TILE_KERNELS(run_reset_grad_tiles, ResetGradTiles, "gru_reset_before_reset_backward_step")

template <typename T>
void backward_loop(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& grad_out2d,
                   const Tensor& saved, const Tensor& output2d, const Tensor& h0, const Tensor& w_hh, Tensor& d_gates,
                   Tensor& carry, const OptTensor& zoneout, const OptTensor& recurrent_mask) {
  const int64_t H = s.hidden, L = tile_lanes<T>();
  // [dr, dz] @ W_h[rz] ([2H, H]) and dn @ W_hn ([H, H]): weights used as [K, N], packed from their transposes.
  const auto rz = pack_for_later_steps(schedule, w_hh.narrow(0, 0, 2 * H), L, Scratch::PackedRecurrent);
  const auto hn = pack_tiles(w_hh.narrow(0, 2 * H, H).t(), 4, L, Columns::Contiguous, Scratch::PackedProjection);
  const auto zeros = at::zeros({2 * H}, w_hh.options());
  const int64_t unit_tiles = tile_count(H, 4, L, Columns::Contiguous);
  const BackwardStep<T> step{
      gru_backward_state<T>(d_gates, zeros, saved, output2d, h0, grad_out2d, carry, zoneout, recurrent_mask)};
  run_team([&](const Team& team) {
    auto st = step;
    for (size_t k = schedule.size(); k-- > 0;) {
      const int64_t depth = point_at_later_step(st.later, schedule, k, 2 * H);
      st.step = schedule[k];
      const UpdateGradTiles<T> update{{rz.const_data_ptr<T>(), rz.stride(0), depth}, &st, st.step.rows};
      const auto first = share_of(tile_items(update, unit_tiles), team.tid, team.threads);
      run_update_grad_tiles(update, first.begin, first.end);
      team.barrier();
      const ResetGradTiles<T> reset{{hn.const_data_ptr<T>(), hn.stride(0), H}, &st, st.step.rows};
      const auto second = share_of(tile_items(reset, unit_tiles), team.tid, team.threads);
      run_reset_grad_tiles(reset, second.begin, second.end);
      team.barrier();
    }
  });
}

}  // namespace

void gru_reset_before_forward(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& x2d,
                              const Tensor& w_ih, const Tensor& w_hh, const OptTensor& bias, const Tensor& h0,
                              Tensor& saved, Tensor& output2d, Tensor& hy, bool save, const OptTensor& zoneout,
                              const OptTensor& recurrent_mask) {
  AT_DISPATCH_FLOATING_TYPES(x2d.scalar_type(), "gatedrnn_gru_reset_before_forward", [&] {
    forward_loop<scalar_t>(schedule, s, x2d, w_ih, w_hh, bias, h0, saved, output2d, hy, save, zoneout,
                           recurrent_mask);
  });
}

void gru_reset_before_backward(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& grad_out2d,
                               const Tensor& saved, const Tensor& output2d, const Tensor& h0, const Tensor& w_hh,
                               Tensor& d_gates, Tensor& carry, const OptTensor& zoneout,
                               const OptTensor& recurrent_mask) {
  AT_DISPATCH_FLOATING_TYPES(grad_out2d.scalar_type(), "gatedrnn_gru_reset_before_backward", [&] {
    backward_loop<scalar_t>(schedule, s, grad_out2d, saved, output2d, h0, w_hh, d_gates, carry, zoneout,
                            recurrent_mask);
  });
}

}  // namespace gatedrnn::cpu
