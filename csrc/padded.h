// Padded input with per-sequence lengths: the `lengths` argument of every op, on every device.
//
// A padded batch [T, B, *] whose row b holds a sequence of lengths[b] steps runs as the packed sequence that
// torch.nn.utils.rnn.pack_padded_sequence(enforce_sorted=False) would make of it: batch rows ordered by
// length, longest first (ties keep their order), step t holding the rows still running. Every kernel's
// packed schedule (sequence.h) then serves padded input too, and padded steps cost nothing. The ops do the
// packing themselves, so the caller's graph keeps fixed shapes and torch.compile traces it without a break.
// The results are torch.nn's for the packed sequence, in the padded layout: outputs past a sequence's end
// are zero, a sequence's final state is that of its own last step, and in reverse a sequence starts at its
// own last element. Saved activations keep T * B rows (their packed rows first) so that their shapes do not
// depend on the lengths either.
//
// The lengths are read on the host: on CUDA, lengths on the GPU cost one synchronisation (as in
// pack_padded_sequence), lengths on the CPU none.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace gatedrnn {

// Where each packed row comes from in the padded batch.
struct PackedPlan {
  at::Tensor order;        // [B] int64, input's device: the padded batch row of packed batch row k
  at::Tensor batch_sizes;  // [max length] int64, CPU: rows running at each step
  at::Tensor rows;         // [N] int64, input's device: the padded row t * B + b of each packed row
  int64_t steps, batch;    // T, B of the padded input
  int64_t packed_rows;     // N = sum of the lengths
};

// Validates `lengths` against dense input [T, B, *] and plans its packing.
inline PackedPlan plan_packing(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                               const at::Tensor& lengths_) {
  TORCH_CHECK(!batch_sizes.has_value(), op,
              ": lengths is for padded input; packed input (batch_sizes) carries its own lengths");
  TORCH_CHECK(input.dim() == 3, op, ": lengths needs dense input [seq_len, batch, input_size], but got ",
              input.dim(), "-D input");
  TORCH_CHECK(lengths_.dim() == 1 && (lengths_.scalar_type() == at::kLong || lengths_.scalar_type() == at::kInt), op,
              ": lengths must be a 1-D int64 or int32 tensor, but got a ", lengths_.dim(), "-D ",
              lengths_.scalar_type(), " tensor");
  TORCH_CHECK(lengths_.device().is_cpu() || lengths_.device() == input.device(), op,
              ": lengths must be on the CPU or on the input's device (", input.device(), "), but is on ",
              lengths_.device());
  const int64_t T = input.size(0), B = input.size(1);
  TORCH_CHECK(lengths_.size(0) == B, op, ": expected one length per batch row (", B, "), but got ",
              lengths_.size(0));
  const auto lengths = lengths_.to(at::kCPU, at::kLong).contiguous();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 1 && len[b] <= T, op, ": every length must be in [1, seq_len = ", T, "], but lengths[",
                b, "] = ", len[b]);
  }

  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len[a] > len[b]; });
  const int64_t longest = B > 0 ? len[order[0]] : 0;
  std::vector<int64_t> sizes(longest, 0), rows;
  rows.reserve(std::accumulate(len, len + B, int64_t(0)));
  for (int64_t t = 0; t < longest; ++t) {
    // The rows still running at step t are a prefix of the length order.
    while (sizes[t] < B && len[order[sizes[t]]] > t) {
      rows.push_back(t * B + order[sizes[t]]);
      ++sizes[t];
    }
  }
  const auto long_cpu = at::TensorOptions().dtype(at::kLong);
  const auto to_tensor = [&](const std::vector<int64_t>& v) {
    return at::tensor(at::ArrayRef<int64_t>(v), long_cpu).to(input.device());
  };
  return {to_tensor(order), at::tensor(at::ArrayRef<int64_t>(sizes), long_cpu), to_tensor(rows), T, B,
          static_cast<int64_t>(rows.size())};
}

// The plan for `lengths`, or none when the op runs its input as it is: no lengths, or an empty batch (which
// packs to no steps at all; the dense path handles it).
inline std::optional<PackedPlan> maybe_plan_packing(const char* op, const at::Tensor& input,
                                                    const std::optional<at::Tensor>& batch_sizes,
                                                    const std::optional<at::Tensor>& lengths) {
  if (!lengths.has_value()) return std::nullopt;
  auto plan = plan_packing(op, input, batch_sizes, *lengths);
  if (plan.packed_rows == 0) return std::nullopt;
  return plan;
}

// A per-sequence state [B, C] (hx, cx and their gradients) must have one row per padded batch row before it
// is reordered: a wrong size would otherwise be silently cut to B rows.
inline const at::Tensor& check_state_rows(const char* op, const PackedPlan& p, const at::Tensor& state,
                                          const char* name) {
  TORCH_CHECK(state.dim() == 2 && state.size(0) == p.batch, op, ": expected ", name, " of ", p.batch,
              " rows (the input's batch size), but got size ", state.sizes());
  return state;
}

// The packed rows [N, C] of a padded [T, B, C] tensor.
inline at::Tensor gather_packed(const PackedPlan& p, const at::Tensor& padded) {
  return padded.reshape({p.steps * p.batch, padded.size(-1)}).index_select(0, p.rows);
}

// The padded [T, B, C] tensor of packed rows [N, C]; rows past a sequence's end are zero.
inline at::Tensor scatter_padded(const PackedPlan& p, const at::Tensor& packed) {
  const int64_t columns = packed.size(-1);
  return at::zeros({p.steps * p.batch, columns}, packed.options())
      .index_copy_(0, p.rows, packed)
      .view({p.steps, p.batch, columns});
}

// Per-sequence state [B, C] between the padded batch order and the packed (sorted) one.
inline at::Tensor to_packed_order(const char* op, const PackedPlan& p, const at::Tensor& state, const char* name) {
  return check_state_rows(op, p, state, name).index_select(0, p.order);
}

inline at::Tensor to_padded_order(const PackedPlan& p, const at::Tensor& state) {
  return at::empty_like(state).index_copy_(0, p.order, state);
}

// How a device allocates saved activations: CUDA's caching allocator reuses memory already; the CPU has
// its own cache (cpu/saved_cache.h).
using EmptyFn = at::Tensor (*)(at::IntArrayRef sizes, const at::TensorOptions& options);

inline at::Tensor plain_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

// The saved activations of a call: `width` columns and max(rows, saved_rows) rows (with lengths, T * B rows,
// the packed ones first), the rows no step writes zeroed (deterministic); empty when not saving.
inline at::Tensor saved_rows_tensor(bool save, int64_t rows, int64_t saved_rows, int64_t width,
                                    const at::TensorOptions& options, EmptyFn empty = plain_empty) {
  if (!save) return at::empty({0}, options);
  auto kept = empty({std::max(rows, saved_rows), width}, options);
  kept.narrow(0, rows, kept.size(0) - rows).zero_();
  return kept;
}

// Saved activations: [T * B, C] from the forward (packed rows first) -> their packed rows [N, C].
inline at::Tensor packed_saved(const char* op, const PackedPlan& p, const at::Tensor& saved) {
  TORCH_CHECK(saved.dim() == 2 && saved.size(0) == p.steps * p.batch, op,
              ": saved activations have the wrong size for padded input with lengths; was the forward called "
              "with save_for_backward=True and the same input and lengths?");
  return saved.narrow(0, 0, p.packed_rows);
}

// An input gradient of packed rows [N, I] back in the padded layout; one not asked for (1-D, empty) stays so.
inline at::Tensor padded_grad(const PackedPlan& p, const at::Tensor& packed) {
  return packed.dim() == 2 ? scatter_padded(p, packed) : packed;
}

using OptTensor = std::optional<at::Tensor>;

// An optional per-sequence tensor (a recurrent dropout mask [B, C]) in the packed batch order.
inline std::optional<at::Tensor> packed_order(const char* op, const PackedPlan& p,
                                              const std::optional<at::Tensor>& state) {
  return state.has_value() ? std::optional<at::Tensor>(to_packed_order(op, p, *state, "recurrent_mask")) : state;
}

// Optional per-row tensors (zoneout keep values [T * B, H]) in the packed row order.
inline OptTensor gather_packed(const PackedPlan& p, const OptTensor& padded) {
  if (!padded.has_value()) return padded;
  // Evaluation's zoneout keeps p broadcast (row stride 0): its first N rows are the packed rows, no copy.
  if (padded->dim() == 2 && padded->stride(0) == 0) return padded->narrow(0, 0, p.packed_rows);
  return gather_packed(p, *padded);
}

}  // namespace gatedrnn
