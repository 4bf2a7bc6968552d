// Tile products shared by the LSTM and GRU loops: the input projection (in chunks of steps), plain
// products stored as they are, the rows of A that a backward step reads, and the gradient that reaches the
// initial state.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <type_traits>
#include <vector>

#include "../cells.h"
#include "../sequence.h"
#include "team.h"
#include "tiles.h"
#include "workspace.h"

namespace gatedrnn::cpu {

// The input projection x @ W_ih^T of packed rows [row0, row0 + rows), all G gates (GateMajor tiles),
// stored into `out` (its row 0 is packed row row0; row stride out_stride, gate g at column g * hidden).
// The biases are added later, by the step's epilogue. S: the type of x and W_ih (T, or bfloat16 with T
// float for the bfloat16 tiles).
template <typename T, int G, typename S = T>
struct InputTiles : TileBase<T, G, S> {
  const S* x;  // [N, k]
  T* out;
  int64_t out_stride, hidden, row0, rows;

  const S* a_row(int64_t b) const { return x + (row0 + b) * this->k; }

  template <int L>
  GATEDRNN_ALWAYS_INLINE void finish(const T* acc, int64_t b0, int64_t n, int64_t p) const {
    const int64_t j0 = p * L, width = std::min<int64_t>(L, hidden - j0);
    for (int64_t r = 0; r < n; ++r) {
      T* o = out + (b0 + r) * out_stride + j0;
      for (int g = 0; g < G; ++g) copy_run<L>(o + g * hidden, acc + (r * G + g) * L, width);
    }
  }
};

// Where a forward step finds each batch row's h_{t-1}: the previous step's output row, or the initial state for
// a row's first step; as the cell sees it (prev_row) and as the recurrent product reads it (read_row). With
// recurrent dropout the product reads h_{t-1} * mask (one mask per sequence and unit, held over the steps),
// which each step writes beside h_t.
template <typename S>
struct RecurrentStates {
  const S* h0;          // [B, width]
  S* output;            // [N, width]: h_t of every packed row
  const S* masked_h0;   // [B, width]: h0 * mask, or null without recurrent dropout
  S* masked_output;     // [N, width]: h_t * mask, or null
  int64_t width;

  const S* prev_row(const Step& step, int64_t b) const {
    return b < step.prev_rows ? output + (step.prev_offset + b) * width : h0 + b * width;
  }

  const S* read_row(const Step& step, int64_t b) const {
    if (!masked_output) return prev_row(step, b);
    return b < step.prev_rows ? masked_output + (step.prev_offset + b) * width : masked_h0 + b * width;
  }
};

// The RecurrentStates of a forward loop over h0 and output2d; with recurrent dropout, `masked` receives (and
// keeps alive) the masked copies it points at.
template <typename S>
inline RecurrentStates<S> recurrent_states(const at::Tensor& h0, at::Tensor& output2d,
                                           const std::optional<at::Tensor>& recurrent_mask,
                                           std::array<at::Tensor, 2>& masked) {
  if (recurrent_mask) {
    masked = {(h0 * *recurrent_mask).to(h0.scalar_type()), at::empty_like(output2d)};
  }
  return {h0.const_data_ptr<S>(), output2d.data_ptr<S>(), recurrent_mask ? masked[0].const_data_ptr<S>() : nullptr,
          recurrent_mask ? masked[1].data_ptr<S>() : nullptr, output2d.size(1)};
}

// Consecutive steps (in processing order) whose input projection is computed together, before them:
// packed rows [row_begin, row_end) (contiguous in either direction) of steps [first, last).
struct Chunk {
  size_t first, last;
  int64_t row_begin, row_end;
};

// Chunks of at most `max_rows` rows (at least one step each), so that the projection buffer of an
// inference call is bounded whatever T is, and each chunk's projection is still in cache when its steps
// read it.
inline std::vector<Chunk> plan_chunks(const std::vector<Step>& schedule, int64_t max_rows) {
  std::vector<Chunk> chunks;
  size_t i = 0;
  while (i < schedule.size()) {
    Chunk c{i, i, schedule[i].offset, schedule[i].offset + schedule[i].rows};
    while (c.last < schedule.size()) {
      const Step& s = schedule[c.last];
      const int64_t begin = std::min(c.row_begin, s.offset), end = std::max(c.row_end, s.offset + s.rows);
      if (c.last > c.first && end - begin > max_rows) break;
      c.row_begin = begin;
      c.row_end = end;
      ++c.last;
    }
    chunks.push_back(c);
    i = c.last;
  }
  return chunks;
}

// Weights packed for the tiles of storage type S: float/double tiles of tile_lanes<S>() lanes, or the
// bfloat16 tiles' k pairs.
template <typename S>
inline at::Tensor pack_for(const at::Tensor& w_nk, int64_t groups, Columns order, Scratch slot) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    return pack_tiles_bf16(w_nk, groups, order, slot, bf16_panel_pairs(w_nk.size(1)));
  } else {
    return pack_tiles(w_nk, groups, tile_lanes<S>(), order, slot);
  }
}

// Weights read in place (TileBase::read_in_place) rather than packed, one count per weight and call: the
// tests' proof of which product ran.
inline KernelCounter weights_read_in_place{"weights_read_in_place"};

// The most rows a weight may multiply in one call (over all its steps) and still be read in place. Packing
// reads and writes all of W in shuffles; the dot products pay a reduction per column and row instead, and
// at B = 1 run each step about as fast as the packed product. Measured on an AMD EPYC (Zen 5, AVX-512, two
// threads), the LSTM op, packed / in place, in us: a single step at B = 1 37/16 (H=128), 62/26 (256), 177/61
// (512); at B = 16 44/30, 89/81, 282/268; at B = 32 55/44, 123/139, 413/507; T = 20 at B = 1 59/50,
// 137/146, 647/618; T = 50 at B = 1 98/105, 251/346, 1378/1525.
constexpr int64_t kInPlaceRows = 16;

// Points `tiles` at its weight w_nk ([N, k]): W itself where it multiplies at most kInPlaceRows rows in the
// call and its rows are contiguous in k (float and double), else W packed into the scratch buffer `slot`.
// Returns the packed panels, which must outlive the loop (undefined when W is read in place).
template <typename Tiles>
inline at::Tensor prepare_weight(Tiles& tiles, const at::Tensor& w_nk, Columns order, Scratch slot, int64_t rows) {
  using S = typename Tiles::storage;
  if constexpr (!std::is_same_v<S, c10::BFloat16>) {
    if (rows <= kInPlaceRows && w_nk.stride(1) == 1) {
      tiles.read_in_place(w_nk, order);
      weights_read_in_place.calls.fetch_add(1, std::memory_order_relaxed);
      return at::Tensor();
    }
  }
  auto packed = pack_for<S>(w_nk, Tiles::kGroups, order, slot);
  tiles.panels = packed.template const_data_ptr<S>();
  tiles.panel_size = packed.stride(0);
  return packed;
}

template <typename S>
inline int64_t lanes_for() {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    return kBf16Lanes;
  } else {
    return tile_lanes<S>();
  }
}

// h_t as the storage type: bfloat16 rounded to nearest even, else as computed.
template <typename S, typename T>
GATEDRNN_ALWAYS_INLINE S to_storage(T x) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    return round_to_bf16(x);
  } else {
    return x;
  }
}

template <typename T, typename S>
GATEDRNN_ALWAYS_INLINE T from_storage(S x) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    return widen(x);
  } else {
    return x;
  }
}

// One row's zoneout keep values for units [j0, j0 + width) into `out` (0 without zoneout), so that an
// epilogue's vectorised loop reads a plain array whatever the keep values' strides (a training draw per unit,
// or evaluation's broadcast p).
template <typename T>
GATEDRNN_ALWAYS_INLINE void load_keep(const ZoneoutKeep<T>& keep, int64_t row, int64_t j0, int64_t width, T* out) {
  if (!keep.data) {
    for (int64_t l = 0; l < width; ++l) out[l] = T(0);
    return;
  }
  const T* k = keep.data + row * keep.row_stride + j0 * keep.column_stride;
  for (int64_t l = 0; l < width; ++l) out[l] = k[l * keep.column_stride];
}

// Rows of an inference call's projection buffer: about 4 MiB, whatever T is.
inline int64_t chunk_rows(int64_t row_bytes) { return std::max<int64_t>(1, (int64_t(4) << 20) / row_bytes); }

// An inference call's projection buffer: as many rows of `columns` as the largest chunk has.
inline at::Tensor chunk_buffer(const std::vector<Chunk>& chunks, int64_t columns, const at::TensorOptions& options) {
  int64_t most = 0;
  for (const auto& c : chunks) most = std::max(most, c.row_end - c.row_begin);
  return scratch_tensor(Scratch::Gates, {most, columns}, options);
}

// The forward time loop of one team member, for LSTM and GRU alike: for each chunk of steps, the chunk's
// input projection (InputTiles `in`, run by run_input), a barrier, then each step (run_step(st) runs the
// step's tiles, and whatever phases follow, with their barriers). st.input_proj holds the projection of rows
// from st.proj_row0 on: the whole sequence when saving (the saved activations overwrite it), else one chunk.
template <typename In, typename St, typename RunInput, typename RunStep>
inline void forward_chunks(const Team& team, const std::vector<Chunk>& chunks, const std::vector<Step>& schedule,
                           bool save, int64_t unit_tiles, In in, St st, const RunInput& run_input,
                           const RunStep& run_step) {
  for (const Chunk& chunk : chunks) {
    in.row0 = chunk.row_begin;
    in.rows = chunk.row_end - chunk.row_begin;
    st.proj_row0 = save ? 0 : chunk.row_begin;
    in.out = st.input_proj + (chunk.row_begin - st.proj_row0) * st.proj_stride;
    const auto share = share_of(tile_items(in, unit_tiles), team.tid, team.threads);
    run_input(in, share.begin, share.end);
    team.barrier();
    for (size_t k = chunk.first; k < chunk.last; ++k) {
      st.step = schedule[k];
      st.rows = st.step.rows;
      run_step(st);
    }
  }
}

// A plain product C (+)= A @ op(W) over Contiguous tiles: row b of A at a + b * a_row_stride, its k elements
// a_step apart (a transposed view is a strided A); row b of C at c + b * ldc. With `also`, each row of the
// result is stored there too (a step's final state).
template <typename T>
struct ProductTiles : TileBase<T, 4> {
  const T* a;
  int64_t a_row_stride, a_step;
  T* c;
  T* also;  // [rows, columns] or null
  int64_t ldc, columns, rows;
  bool add;  // add to C (a later depth block, or an accumulating product); else store

  const T* a_row(int64_t b) const { return a + b * a_row_stride; }

  template <int L>
  GATEDRNN_ALWAYS_INLINE void finish(const T* acc, int64_t b0, int64_t n, int64_t p) const {
    constexpr int G = 4;
    const int64_t c0 = p * G * L, width = std::min<int64_t>(G * L, columns - c0);
    for (int64_t r = 0; r < n; ++r) {
      const T* v = acc + r * G * L;
      T* o = c + (b0 + r) * ldc + c0;
      if (add) {
        for (int64_t j = 0; j < width; ++j) o[j] += v[j];
      } else {
        copy_run<G * L>(o, v, width);
      }
      if (also) copy_run<G * L>(also + (b0 + r) * columns + c0, v, width);
    }
  }
};

// What a backward step multiplies by W_hh: the pre-activation gradients of the step processed just before
// it (the next one in processing order), for the rows that took their state from this step; zeros for the
// rows whose state ended here (their gradient is the final state's, already in the carry).
template <typename T>
struct LaterRows {
  const T* base = nullptr;  // [N, stride]
  const T* zeros = nullptr;
  int64_t stride = 0, offset = 0, valid = 0;

  const T* row(int64_t b) const { return b < valid ? base + (offset + b) * stride : zeros; }
};

// Points `rows` at the step after `k` in processing order (none for the last step: depth 0).
template <typename T>
inline int64_t point_at_later_step(LaterRows<T>& rows, const std::vector<Step>& schedule, size_t k, int64_t depth) {
  if (k + 1 >= schedule.size()) {
    rows.valid = 0;
    return 0;
  }
  rows.offset = schedule[k + 1].offset;
  rows.valid = schedule[k + 1].prev_rows;
  return depth;
}

// A backward loop's weight for the products with the later step's gradients (dG_{t+1} @ W,
// point_at_later_step): W ([K, N]) packed from its transpose into Contiguous tiles of 4 groups. Where no step
// has a later one (T = 1: a cell's step), every such product has depth 0 and reads no panel, so nothing is
// packed: an empty tensor stands for the panels. (Packing all of W_hh for nothing was a third of a cell's
// backward op without weight gradients at H = 128, two thirds at H = 512, where W_hh is 4 MB: measured on an
// AMD EPYC (Zen 5, two threads), B = 1, in us: 24 -> 15-18 (H = 128), 48-72 -> 26 (256), 181-185 -> 62 (512).)
inline KernelCounter later_step_weights_packed{"later_step_weights_packed"};  // the tests' proof of the skip

inline at::Tensor pack_for_later_steps(const std::vector<Step>& schedule, const at::Tensor& w_kn, int64_t lanes,
                                       Scratch slot) {
  if (schedule.size() < 2) return at::empty({0, 0}, w_kn.options());
  later_step_weights_packed.calls.fetch_add(1, std::memory_order_relaxed);
  return pack_tiles(w_kn.t(), 4, lanes, Columns::Contiguous, slot);
}

// dh0 += (for each batch row, the pre-activation gradients of the step that read h0 for it) @ w: every
// row reads its initial state exactly once, at its first step in processing order.
inline void add_initial_state_grad(at::Tensor& dh0, const std::vector<Step>& schedule, const at::Tensor& d_gates,
                                   const at::Tensor& w,
                                   const std::optional<at::Tensor>& recurrent_mask = std::nullopt) {
  for (const Step& s : schedule) {
    const int64_t fresh = s.rows - s.prev_rows;
    if (fresh <= 0) continue;
    auto rows = dh0.narrow(0, s.prev_rows, fresh);
    const auto d = d_gates.narrow(0, s.offset + s.prev_rows, fresh);
    if (recurrent_mask) {  // with recurrent dropout the product read h0 * mask
      rows.addcmul_(at::mm(d, w), recurrent_mask->narrow(0, s.prev_rows, fresh));
    } else {
      rows.addmm_(d, w);
    }
  }
}

}  // namespace gatedrnn::cpu
