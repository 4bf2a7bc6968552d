// The layer_norm LSTM and GRU on the CPU (layer_norm.h): one layer and direction over the whole sequence.
//
// A norm over a row's gate columns needs the whole row of a product before it can finish any column, so a
// step has two phases instead of the plain cells' one fused tile:
//  1. tiles (tiles.h) compute the recurrent product h_{t-1} @ W_hh^T of all gates for a block of columns and
//     rows and store it into a [B, G*H] step buffer (small enough to stay in cache);
//  2. after a barrier, a row pass (layer_norm_rows.h) for each batch row normalises the input projection and
//     the product, runs the cell and, for the LSTM, normalises c_t before the tanh.
// The input projection is computed per chunk of steps as in the plain loops (products.h). Backward mirrors it:
// tiles compute d(h W_hh^T)_{t+1} @ W_hh for the step's rows, then a row pass runs the cell's derivative and the
// norms' backward, giving the gradients that reach the two products; weight, input, bias and norm-parameter
// gradients are GEMMs and reductions after the loop (layer_grads.h). One team of threads runs a whole loop.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../layer_grads.h"
#include "../layer_norm.h"
#include "../op_entry.h"
#include "../sequence.h"
#include "layer_norm_ops.h"
#include "layer_norm_rows.h"
#include "loops.h"
#include "matmul.h"
#include "products.h"
#include "saved_cache.h"
#include "team.h"
#include "tiles.h"
#include "workspace.h"

namespace gatedrnn::cpu {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// The forward's recurrent product: A rows are h_{t-1} as the product reads it (recurrent dropout's mask).
template <typename T>
struct StateProductTiles : ProductTiles<T> {
  RecurrentStates<T> states;
  Step step;

  const T* a_row(int64_t b) const { return states.read_row(step, b); }
};

// The backward's product: A rows are the gradients reaching the next step's recurrent product.
template <typename T>
struct LaterProductTiles : ProductTiles<T> {
  LaterRows<T> later;

  const T* a_row(int64_t b) const { return later.row(b); }
};

GATEDRNN_TILE_KERNELS(run_input_product, ProductTiles, "layer_norm_input_projection")
GATEDRNN_TILE_KERNELS(run_recurrent_product, StateProductTiles, "layer_norm_recurrent_product")
GATEDRNN_TILE_KERNELS(run_backward_product, LaterProductTiles, "layer_norm_backward_product")

// What a thread's share of a step's row pass needs besides the rows' struct.
template <typename T>
struct RowRange {
  Step step;
  int64_t begin, end, proj_row0;  // proj_row0: the forward's first projected row in its buffer
  T* scratch;                     // the thread's own
};

template <typename Rows>
GATEDRNN_ALWAYS_INLINE void run_rows(const Rows& rows, const RowRange<typename Rows::scalar>& r) {
  for (int64_t b = r.begin; b < r.end; ++b) {
    if constexpr (Rows::kForward) {
      rows.forward_row(r.step, b, r.proj_row0, r.scratch);
    } else {
      rows.backward_row(r.step, b, r.scratch);
    }
  }
}

// Defines `void run_row_pass(const ROWS<T>&, const RowRange<T>&)` for float and double: the row passes compiled
// for each instruction set as the tile kernels are (tiles.h), so that their loops (the norms' sums, the cell's
// exp and tanh) vectorise as wide as the CPU allows; the best the CPU has is chosen once.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GATEDRNN_ROW_PASS(ROWS)                                                                                      \
  GATEDRNN_TARGET_AVX512 void run_row_pass_avx512(const ROWS& rows, const RowRange<ROWS::scalar>& r) {               \
    run_rows(rows, r);                                                                                               \
  }                                                                                                                  \
  GATEDRNN_TARGET_AVX2 void run_row_pass_avx2(const ROWS& rows, const RowRange<ROWS::scalar>& r) {                   \
    run_rows(rows, r);                                                                                               \
  }                                                                                                                  \
  void run_row_pass_baseline(const ROWS& rows, const RowRange<ROWS::scalar>& r) { run_rows(rows, r); }              \
  void run_row_pass(const ROWS& rows, const RowRange<ROWS::scalar>& r) {                                            \
    using Fn = void (*)(const ROWS&, const RowRange<ROWS::scalar>&);                                                 \
    static const Fn chosen = build_for_cpu_isa<Fn>(run_row_pass_avx512, run_row_pass_avx2, run_row_pass_baseline);   \
    chosen(rows, r);                                                                                                 \
  }
#else
#define GATEDRNN_ROW_PASS(ROWS) \
  void run_row_pass(const ROWS& rows, const RowRange<ROWS::scalar>& r) { run_rows(rows, r); }
#endif

#define GATEDRNN_ROW_PASSES(ROWS) \
  GATEDRNN_ROW_PASS(ROWS<float>)  \
  GATEDRNN_ROW_PASS(ROWS<double>)

GATEDRNN_ROW_PASSES(LstmNormRows)
GATEDRNN_ROW_PASSES(LstmNormGradRows)
GATEDRNN_ROW_PASSES(GruNormRows)
GATEDRNN_ROW_PASSES(GruNormGradRows)

// A plain product's tiles over the packed weight `w` (Contiguous, 4 groups), storing into c, ldc apart.
template <typename T>
ProductTiles<T> store_tiles(const Tensor& w, int64_t depth, T* c, int64_t ldc, int64_t columns) {
  return {{w.const_data_ptr<T>(), w.stride(0), depth}, nullptr, depth, 1, c, nullptr, ldc, columns, 0, false};
}

// Per-thread row scratch, indexed by team member.
inline Tensor team_scratch(int64_t gates, int64_t hidden, const at::TensorOptions& options) {
  return at::empty({team_size(), row_scratch(gates, hidden)}, options);
}

// The forward loop of either cell (`Rows`: LstmNormRows or GruNormRows with everything but the buffers this
// loop owns set). `proj`: the saved rows the input projection is written into when saving (its first G*H
// columns), else undefined.
template <typename T, typename Rows>
void norm_forward_loop(const std::vector<Step>& schedule, const LayerShape& s, int64_t gates, const Tensor& x2d,
                       const Tensor& w_ih, const Tensor& w_hh, Tensor proj, bool save, Rows rows) {
  const int64_t H = s.hidden, G = gates * H, L = tile_lanes<T>();
  const Tensor ih = pack_tiles(w_ih, 4, L, Columns::Contiguous, Scratch::PackedInput);
  const Tensor hh = pack_tiles(w_hh, 4, L, Columns::Contiguous, Scratch::PackedRecurrent);
  const int64_t tiles = tile_count(G, 4, L, Columns::Contiguous);
  const auto chunks = plan_chunks(schedule, chunk_rows(G * int64_t(sizeof(T))));
  if (!save) proj = chunk_buffer(chunks, G, x2d.options());
  const auto product = at::empty({s.batch, G}, x2d.options());
  const auto scratch = team_scratch(gates, H, x2d.options());
  rows.input_proj = proj.data_ptr<T>();
  rows.proj_stride = proj.stride(0);
  rows.product = product.const_data_ptr<T>();
  const auto input = store_tiles<T>(ih, s.input_size, nullptr, proj.stride(0), G);
  const StateProductTiles<T> recurrent{store_tiles<T>(hh, H, product.data_ptr<T>(), G, G), rows.states, Step{}};

  run_team([&](const Team& team) {
    auto in = input;
    auto rec = recurrent;
    T* mine = scratch.data_ptr<T>() + team.tid * scratch.size(1);
    for (const Chunk& chunk : chunks) {
      const int64_t proj_row0 = save ? 0 : chunk.row_begin;
      in.a = x2d.const_data_ptr<T>() + chunk.row_begin * s.input_size;
      in.c = rows.input_proj + (chunk.row_begin - proj_row0) * rows.proj_stride;
      in.rows = chunk.row_end - chunk.row_begin;
      auto share = share_of(tile_items(in, tiles), team.tid, team.threads);
      run_input_product(in, share.begin, share.end);
      team.barrier();
      for (size_t k = chunk.first; k < chunk.last; ++k) {
        rec.step = schedule[k];
        rec.rows = rec.step.rows;
        share = share_of(tile_items(rec, tiles), team.tid, team.threads);
        run_recurrent_product(rec, share.begin, share.end);
        team.barrier();
        share = share_of(rec.step.rows, team.tid, team.threads);
        run_row_pass(rows, RowRange<T>{rec.step, share.begin, share.end, proj_row0, mine});
        team.barrier();
      }
    }
  });
}

// The backward loop of either cell (`Rows`: LstmNormGradRows or GruNormGradRows). d_recurrent [N, G*H]: what
// the rows write as the gradient reaching each step's recurrent product, which the step before multiplies.
template <typename T, typename Rows>
void norm_backward_loop(const std::vector<Step>& schedule, const LayerShape& s, int64_t gates, const Tensor& w_hh,
                        const Tensor& d_recurrent, Rows rows) {
  const int64_t H = s.hidden, G = gates * H, L = tile_lanes<T>();
  // d(h W_hh^T) @ W_hh: the weight as [K, N], packed from its transpose.
  const Tensor hh = pack_for_later_steps(schedule, w_hh, L, Scratch::PackedRecurrent);
  const int64_t tiles = tile_count(H, 4, L, Columns::Contiguous);
  const auto zeros = at::zeros({G}, w_hh.options());
  const auto product = at::empty({s.batch, H}, w_hh.options());
  const auto scratch = team_scratch(gates, H, w_hh.options());
  rows.product = product.const_data_ptr<T>();
  const LaterProductTiles<T> later{store_tiles<T>(hh, G, product.data_ptr<T>(), H, H),
                                   {d_recurrent.const_data_ptr<T>(), zeros.const_data_ptr<T>(), G, 0, 0}};

  run_team([&](const Team& team) {
    auto pr = later;
    T* mine = scratch.data_ptr<T>() + team.tid * scratch.size(1);
    for (size_t k = schedule.size(); k-- > 0;) {
      const Step& step = schedule[k];
      pr.k = point_at_later_step(pr.later, schedule, k, G);
      pr.rows = step.rows;
      auto share = share_of(tile_items(pr, tiles), team.tid, team.threads);
      run_backward_product(pr, share.begin, share.end);
      team.barrier();
      share = share_of(step.rows, team.tid, team.threads);
      run_row_pass(rows, RowRange<T>{step, share.begin, share.end, 0, mine});
      team.barrier();
    }
  });
}

// layer_grads.h's norm_param_grads without its [N, n] temporaries (a fresh one is faulted in page by page on the
// CPU): parallel over blocks of columns, each column summed over the rows in order, so the result does not
// depend on the thread count.
template <typename T>
void column_norm_grads(const std::vector<NormGradPart>& parts, Tensor& grad) {
  constexpr int64_t kColumns = 64;
  T* gains = grad.data_ptr<T>();
  T* biases = gains + grad.size(1);
  for (const auto& part : parts) {
    const int64_t rows = part.x_hat.size(0), n = part.x_hat.size(1);
    const T* x = part.x_hat.const_data_ptr<T>();
    const T* d = part.d_out.const_data_ptr<T>();
    const int64_t xs = part.x_hat.stride(0), ds = part.d_out.stride(0);
    at::parallel_for(0, (n + kColumns - 1) / kColumns, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t block = b0; block < b1; ++block) {
        const int64_t c0 = block * kColumns, width = std::min(kColumns, n - c0);
        T g[kColumns] = {}, s[kColumns] = {};
        for (int64_t r = 0; r < rows; ++r) {
          const T* xr = x + r * xs + c0;
          const T* dr = d + r * ds + c0;
          GATEDRNN_IVDEP
          for (int64_t j = 0; j < width; ++j) {
            g[j] += dr[j] * xr[j];
            s[j] += dr[j];
          }
        }
        for (int64_t j = 0; j < width; ++j) {
          gains[part.offset + c0 + j] = g[j];
          biases[part.offset + c0 + j] = s[j];
        }
      }
    });
  }
}

Tensor column_norm_grads(const std::vector<NormGradPart>& parts, int64_t columns) {
  auto grad = at::empty({2, columns}, parts.front().x_hat.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "gatedrnn_column_norm_grads",
                             [&] { column_norm_grads<scalar_t>(parts, grad); });
  return grad;
}

}  // namespace

// ---------------------------------------------------------------------------------------------- LSTM
LstmForwardResult lstm_norm_forward_cpu(const Tensor& input_, const OptTensor& batch_sizes, const Tensor& hx_,
                                        const Tensor& cx_, const Tensor& w_ih_, const Tensor& w_hh_,
                                        const OptTensor& b_ih_, const OptTensor& b_hh_, const Tensor& layer_norm_,
                                        bool reverse, bool save, const OptTensor& zoneout,
                                        const OptTensor& zoneout_cell, const OptTensor& recurrent_mask_,
                                        int64_t saved_rows) {
  constexpr const char* op = "gatedrnn::lstm_forward";
  const LayerShape s = check_lstm_norm_forward(op, input_, batch_sizes, hx_, cx_, w_ih_, w_hh_, b_ih_, b_hh_, zoneout,
                                               zoneout_cell, recurrent_mask_, layer_norm_);
  const auto recurrent_mask = contiguous_or_none(recurrent_mask_);
  const int64_t H = s.hidden;
  const auto dtype = compute_dtype(input_.scalar_type());
  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto norm = to_compute(layer_norm_, dtype);
  // h0 and hy are separate: hy is written by the rows' last steps while other rows may still read h0.
  const auto h0 = to_compute(hx_, dtype);
  auto hy = hx_.to(dtype, false, true).contiguous();
  auto cy = cx_.to(dtype, false, true).contiguous();
  // The row pass adds biases unconditionally (a condition would keep its loop from vectorising): zeros without.
  const auto bias = b_ih_.has_value() ? (b_ih_->to(dtype) + b_hh_->to(dtype)).contiguous()
                                      : at::zeros({4 * H}, input.options());
  auto gates = saved_rows_tensor(save, s.rows, saved_rows, 4 * H, input.options(), saved_empty);
  auto cells =
      saved_rows_tensor(save, s.rows, saved_rows, lstm_norm_cells_width(H), input.options(), saved_empty);
  auto output2d = at::empty({s.rows, H}, input.options());
  const auto x2d = input.view({s.rows, s.input_size});

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_lstm_norm_forward_cpu", [&] {
    using T = scalar_t;
    std::array<Tensor, 2> masked;
    const LstmNormRows<T> rows{norm.const_data_ptr<T>(),
                               norm.const_data_ptr<T>() + lstm_norm_columns(H),
                               bias.const_data_ptr<T>(),
                               recurrent_states<T>(h0, output2d, recurrent_mask, masked),
                               nullptr,
                               0,
                               nullptr,
                               cy.data_ptr<T>(),
                               hy.data_ptr<T>(),
                               save ? cells.data_ptr<T>() : nullptr,
                               zoneout_keep<T>(zoneout),
                               zoneout_keep<T>(zoneout_cell),
                               recurrent_mask ? recurrent_mask->const_data_ptr<T>() : nullptr,
                               H};
    norm_forward_loop<T>(schedule, s, 4, x2d, w_ih, w_hh, gates, save, rows);
  });
  auto output_shape = input_.sizes().vec();
  output_shape.back() = H;
  const auto storage = input_.scalar_type();
  return {output2d.view(output_shape).to(storage), hy.to(storage), cy.to(storage), gates, cells};
}

LstmBackwardResult lstm_norm_backward_cpu(const Tensor& grad_output_, const Tensor& grad_hy_,
                                          const Tensor& grad_cy_, const Tensor& input_, const OptTensor& batch_sizes,
                                          const Tensor& hx_, const Tensor& cx_, const Tensor& w_ih_,
                                          const Tensor& w_hh_, const Tensor& layer_norm_, const Tensor& output_,
                                          const Tensor& gates_, const Tensor& cells_, bool reverse,
                                          std::array<bool, 3> output_mask, const OptTensor& zoneout,
                                          const OptTensor& zoneout_cell, const OptTensor& recurrent_mask_) {
  constexpr const char* op = "gatedrnn::lstm_backward";
  const LayerShape s = check_lstm_norm_backward(op, grad_output_, grad_hy_, grad_cy_, input_, batch_sizes, hx_, cx_,
                                                w_ih_, w_hh_, output_, gates_, cells_, zoneout, zoneout_cell,
                                                recurrent_mask_, layer_norm_);
  const int64_t width = lstm_norm_cells_width(s.hidden);
  const auto recurrent_mask = contiguous_or_none(recurrent_mask_);
  const int64_t H = s.hidden, G = 4 * H;
  const auto dtype = compute_dtype(input_.scalar_type());
  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto norm = to_compute(layer_norm_, dtype);
  const auto hx = to_compute(hx_, dtype), cx = to_compute(cx_, dtype);
  const auto grad_out2d = to_compute(grad_output_, dtype).view({s.rows, H});
  const auto output2d = to_compute(output_, dtype).view({s.rows, H});
  const auto gates = gates_.contiguous().view({s.rows, G});
  const auto cells = cells_.contiguous().view({s.rows, width});
  auto carry = grad_hy_.to(dtype, false, true).contiguous();
  auto dc = grad_cy_.to(dtype, false, true).contiguous();
  auto d_pre = scratch_tensor(Scratch::Gates, {s.rows, G}, input.options());
  auto d_input_proj = scratch_tensor(Scratch::NormInputGrads, {s.rows, G}, input.options());
  auto d_recurrent = scratch_tensor(Scratch::NormRecurrentGrads, {s.rows, G}, input.options());
  auto d_cell_norm = scratch_tensor(Scratch::NormCellGrads, {s.rows, H}, input.options());

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_lstm_norm_backward_cpu", [&] {
    using T = scalar_t;
    const LstmNormGradRows<T> rows{norm.const_data_ptr<T>(),
                                   norm.const_data_ptr<T>() + lstm_norm_columns(H),
                                   gates.const_data_ptr<T>(),
                                   cells.const_data_ptr<T>(),
                                   cx.const_data_ptr<T>(),
                                   grad_out2d.const_data_ptr<T>(),
                                   nullptr,
                                   carry.data_ptr<T>(),
                                   dc.data_ptr<T>(),
                                   d_pre.data_ptr<T>(),
                                   d_input_proj.data_ptr<T>(),
                                   d_recurrent.data_ptr<T>(),
                                   d_cell_norm.data_ptr<T>(),
                                   zoneout_keep<T>(zoneout),
                                   zoneout_keep<T>(zoneout_cell),
                                   recurrent_mask ? recurrent_mask->const_data_ptr<T>() : nullptr,
                                   H};
    norm_backward_loop<T>(schedule, s, 4, w_hh, d_recurrent, rows);
  });
  // The carry holds each row's zoneout part of dh0 (zero without zoneout); h0 reaches the rows' first steps
  // through W_hh.
  add_initial_state_grad(carry, schedule, d_recurrent, w_hh, recurrent_mask);

  const auto x2d = input.view({s.rows, s.input_size});
  const auto g = norm_product_grads(x2d, w_ih, output2d, hx, recurrent_mask, batch_sizes, schedule, reverse,
                                    output_mask, input_, d_input_proj, d_recurrent, cpu_matmul);
  const auto storage = input_.scalar_type();
  // Both norms' outputs and both biases get d_pre: the input norm's bias gradient is the biases' too.
  const auto d_norm = column_norm_grads(lstm_norm_grad_parts(cells, d_pre, d_cell_norm), lstm_norm_columns(H));
  const auto d_bias =
      output_mask[2] ? d_norm[1].narrow(0, 0, G).to(storage, false, true) : at::empty({0}, input_.options());
  return {g.input, carry.to(storage), dc.to(storage), g.w_ih, g.w_hh, d_bias, d_norm.to(storage)};
}

// ----------------------------------------------------------------------------------------------- GRU
GruForwardResult gru_norm_forward_cpu(const Tensor& input_, const OptTensor& batch_sizes, const Tensor& hx_,
                                      const Tensor& w_ih_, const Tensor& w_hh_, const OptTensor& b_ih_,
                                      const OptTensor& b_hh_, bool reverse, bool save, const OptTensor& zoneout,
                                      const OptTensor& recurrent_mask_, int64_t saved_rows,
                                      const Tensor& layer_norm_) {
  constexpr const char* op = "gatedrnn::gru_forward";
  const LayerShape s = check_gru_norm_forward(op, input_, batch_sizes, hx_, w_ih_, w_hh_, b_ih_, b_hh_, zoneout,
                                              recurrent_mask_, layer_norm_);
  const auto recurrent_mask = contiguous_or_none(recurrent_mask_);
  const int64_t H = s.hidden;
  const auto dtype = compute_dtype(input_.scalar_type());
  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  // Zeros without biases, as in the LSTM's.
  const auto no_bias = at::zeros({3 * H}, input.options());
  const auto b_ih = b_ih_ ? to_compute(*b_ih_, dtype) : no_bias, b_hh = b_hh_ ? to_compute(*b_hh_, dtype) : no_bias;
  const auto norm = to_compute(layer_norm_, dtype);
  const auto h0 = to_compute(hx_, dtype);
  auto hy = hx_.to(dtype, false, true).contiguous();
  // When saving, the projection is written straight into the saved rows, which the row pass then overwrites.
  auto saved = saved_rows_tensor(save, s.rows, saved_rows, gru_norm_saved_width(H), input.options(), saved_empty);
  auto output2d = at::empty({s.rows, H}, input.options());
  const auto x2d = input.view({s.rows, s.input_size});

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_gru_norm_forward_cpu", [&] {
    using T = scalar_t;
    std::array<Tensor, 2> masked;
    const GruNormRows<T> rows{norm.const_data_ptr<T>(),
                              norm.const_data_ptr<T>() + gru_norm_columns(H),
                              b_ih.const_data_ptr<T>(),
                              b_hh.const_data_ptr<T>(),
                              recurrent_states<T>(h0, output2d, recurrent_mask, masked),
                              nullptr,
                              0,
                              nullptr,
                              hy.data_ptr<T>(),
                              save,
                              zoneout_keep<T>(zoneout),
                              recurrent_mask ? recurrent_mask->const_data_ptr<T>() : nullptr,
                              H};
    norm_forward_loop<T>(schedule, s, 3, x2d, w_ih, w_hh, saved, save, rows);
  });
  auto output_shape = input_.sizes().vec();
  output_shape.back() = H;
  const auto storage = input_.scalar_type();
  return {output2d.view(output_shape).to(storage), hy.to(storage), saved};
}

GruNormBackwardResult gru_norm_backward_cpu(const Tensor& grad_output_, const Tensor& grad_hy_, const Tensor& input_,
                                            const OptTensor& batch_sizes, const Tensor& hx_, const Tensor& w_ih_,
                                            const Tensor& w_hh_, const Tensor& output_, const Tensor& saved_,
                                            bool reverse, std::array<bool, 3> output_mask, const OptTensor& zoneout,
                                            const OptTensor& recurrent_mask_, const Tensor& layer_norm_) {
  constexpr const char* op = "gatedrnn::gru_backward";
  const LayerShape s = check_gru_norm_backward(op, grad_output_, grad_hy_, input_, batch_sizes, hx_, w_ih_, w_hh_,
                                               output_, saved_, zoneout, recurrent_mask_, layer_norm_);
  const int64_t width = gru_norm_saved_width(s.hidden);
  const auto recurrent_mask = contiguous_or_none(recurrent_mask_);
  const int64_t H = s.hidden, G = 3 * H;
  const auto dtype = compute_dtype(input_.scalar_type());
  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto norm = to_compute(layer_norm_, dtype);
  const auto hx = to_compute(hx_, dtype);
  const auto grad_out2d = to_compute(grad_output_, dtype).view({s.rows, H});
  const auto output2d = to_compute(output_, dtype).view({s.rows, H});
  const auto saved = saved_.contiguous().view({s.rows, width});
  auto dh = grad_hy_.to(dtype, false, true).contiguous();  // the carry: grad_hy in, dh0's direct part out
  auto d_gates = scratch_tensor(Scratch::Gates, {s.rows, 4 * H}, input.options());
  auto d_input_proj = scratch_tensor(Scratch::NormInputGrads, {s.rows, G}, input.options());
  auto d_recurrent = scratch_tensor(Scratch::NormRecurrentGrads, {s.rows, G}, input.options());

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_gru_norm_backward_cpu", [&] {
    using T = scalar_t;
    const GruNormGradRows<T> rows{norm.const_data_ptr<T>(),
                                  saved.const_data_ptr<T>(),
                                  {hx.const_data_ptr<T>(), output2d.const_data_ptr<T>(), nullptr, nullptr, H},
                                  grad_out2d.const_data_ptr<T>(),
                                  nullptr,
                                  dh.data_ptr<T>(),
                                  d_gates.data_ptr<T>(),
                                  d_input_proj.data_ptr<T>(),
                                  d_recurrent.data_ptr<T>(),
                                  zoneout_keep<T>(zoneout),
                                  recurrent_mask ? recurrent_mask->const_data_ptr<T>() : nullptr,
                                  H};
    norm_backward_loop<T>(schedule, s, 3, w_hh, d_recurrent, rows);
  });
  add_initial_state_grad(dh, schedule, d_recurrent, w_hh, recurrent_mask);

  const auto x2d = input.view({s.rows, s.input_size});
  const auto g = norm_product_grads(x2d, w_ih, output2d, hx, recurrent_mask, batch_sizes, schedule, reverse,
                                    output_mask, input_, d_input_proj, d_recurrent, cpu_matmul);
  // The norms' biases add to b_ih and b_hh exactly, so theirs are the same gradients.
  const auto d_norm = column_norm_grads(gru_norm_grad_parts(saved, d_gates), gru_norm_columns(H));
  const auto storage = input_.scalar_type();
  const bool want_bias = output_mask[2];
  return {g.input,
          dh.to(storage),
          g.w_ih,
          g.w_hh,
          want_bias ? d_norm[1].narrow(0, 0, G).to(storage, false, true) : at::empty({0}, input_.options()),
          want_bias ? d_norm[1].narrow(0, G, G).to(storage, false, true) : at::empty({0}, input_.options()),
          d_norm.to(storage)};
}

}  // namespace gatedrnn::cpu
