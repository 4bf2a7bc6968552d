// GRU on the CPU: one layer and direction over the whole sequence.
//
// Forward: the input projection of every step is one GEMM before the loop; each step is one GEMM for all
// three gates (h_{t-1} @ W_hh^T) and one fused parallel pass that adds the biases (b_hh's n part on the
// recurrent side, since n needs r * (W_hn h + b_hn)), applies the activations, updates h and, when
// training, overwrites the projection in place with what backward needs. Backward: per step one fused pass
// and one GEMM for dh_{t-1}; weight, bias and input gradients are single GEMMs/reductions after the loop.
// Nothing is allocated inside a loop.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../cells.h"
#include "../checks.h"
#include "../layer_grads.h"
#include "../sequence.h"
#include "blas.h"
#include "loops.h"
#include "workspace.h"

namespace gatedrnn::cpu {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kGates = 3;
constexpr int64_t kSaved = 4;  // r, z, n, hn per hidden unit

// ------------------------------------------------------------------------------------------- forward
// One step's buffers. Row b of the step is packed row offset + b.
template <typename T>
struct ForwardStep {
  // [N, 3H] in rows of `proj_stride`: x @ W_ih^T. When saving, these are
  // the first 3H columns of the [N, 4H] saved buffer and the pass overwrites them with r, z, n in place.
  T* input_proj;
  const T* recurrent;   // [B, 3H]: h_{t-1} @ W_hh^T
  const T* bias_input;  // [3H]: b_ih + (b_hh's r and z parts, which enter the gates like b_ih), or null
  const T* bias_hn;     // [H]: the n part of b_hh (multiplied by r), or null
  T* h_state;           // [B, H]: h_{t-1} in, h_t out
  T* output;            // [N, H]
  bool save;
  int64_t hidden, proj_stride, offset;
};

template <typename T, bool kSave, bool kBias>
GATEDRNN_ALWAYS_INLINE void forward_span(const ForwardStep<T>& s, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = s.hidden, row = s.offset + b;
  T* gi = s.input_proj + row * s.proj_stride;
  const T* gh = s.recurrent + b * kGates * H;
  T* h = s.h_state + b * H;
  T* out = s.output + row * H;
  GATEDRNN_IVDEP
  for (int64_t j = j0; j < j1; ++j) {
    T in[kGates];
    for (int64_t k = 0; k < kGates; ++k) in[k] = gi[k * H + j] + (kBias ? s.bias_input[k * H + j] : T(0));
    const T gh_n = kBias ? gh[2 * H + j] + s.bias_hn[j] : gh[2 * H + j];
    const auto a = gru_activate<T>(in[0], in[1], in[2], gh[j], gh[H + j], gh_n);
    const T h_new = gru_hidden(a, h[j]);
    h[j] = h_new;
    out[j] = h_new;
    if constexpr (kSave) {  // gi is this row of the saved buffer: [r, z, n, hn]
      store_gates(gi, H, j, a.r, a.z, a.n, a.hn);
    }
  }
}

template <typename T>
GATEDRNN_ALWAYS_INLINE void forward_span_any(const ForwardStep<T>& s, int64_t b, int64_t j0, int64_t j1) {
  if (s.bias_hn) {
    s.save ? forward_span<T, true, true>(s, b, j0, j1) : forward_span<T, false, true>(s, b, j0, j1);
  } else {
    s.save ? forward_span<T, true, false>(s, b, j0, j1) : forward_span<T, false, false>(s, b, j0, j1);
  }
}

GATEDRNN_SPAN_KERNELS(run_forward_span, ForwardStep, forward_span_any)

template <typename scalar_t>
void gru_forward_loop(const std::vector<Step>& schedule, const LayerShape& s, Tensor& input_proj,
                      const OptTensor& bias_input, Tensor& output2d, Tensor& hy, const Tensor& w_hh,
                      const OptTensor& b_hh, bool save) {
  const int64_t H = s.hidden, G = kGates * H;
  auto recurrent = at::empty({s.batch, G}, output2d.options());
  const StepGemm<scalar_t> recurrent_gemm(w_hh, /*transposed=*/true, s.batch, s.steps);
  scalar_t* h_state = hy.data_ptr<scalar_t>();
  ForwardStep<scalar_t> args{input_proj.data_ptr<scalar_t>(),
                             recurrent.const_data_ptr<scalar_t>(),
                             bias_input.has_value() ? bias_input->const_data_ptr<scalar_t>() : nullptr,
                             b_hh.has_value() ? b_hh->const_data_ptr<scalar_t>() + 2 * H : nullptr,
                             h_state,
                             output2d.data_ptr<scalar_t>(),
                             save,
                             H,
                             input_proj.stride(0),
                             0};
  for (const auto& step : schedule) {
    // h_state holds h_{t-1} of every active row (see lstm.cpp).
    recurrent_gemm.run(h_state, step.rows, recurrent.data_ptr<scalar_t>(), /*accumulate=*/false);
    args.offset = step.offset;
    for_each_span(step.rows, H, [&](int64_t b, int64_t j0, int64_t j1) { run_forward_span(args, b, j0, j1); });
  }
}

std::tuple<Tensor, Tensor, Tensor> gru_forward_cpu(const Tensor& input_, const OptTensor& batch_sizes,
                                                   const Tensor& hx_, const Tensor& w_ih_, const Tensor& w_hh_,
                                                   const OptTensor& b_ih_, const OptTensor& b_hh_, bool reverse,
                                                   bool save) {
  constexpr const char* op = "gatedrnn::gru_forward";
  const LayerShape s = check_layer_args(op, kGates, input_, batch_sizes, hx_, w_ih_, w_hh_, b_ih_, b_hh_, std::nullopt);
  const auto dtype = compute_dtype(input_.scalar_type());
  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto b_ih = to_compute(b_ih_, dtype), b_hh = to_compute(b_hh_, dtype);
  auto hy = hx_.to(dtype, false, true).contiguous();

  const auto x2d = input.view({s.rows, s.input_size});
  // When saving, the projection is written straight into the saved buffer (one allocation, no copy). The
  // biases are added in the fused pass: a bias in the GEMM would cost a pass over all N x 3H first.
  auto saved = save ? at::empty({s.rows, kSaved * s.hidden}, input.options())
                    : scratch_tensor(Scratch::Gates, {s.rows, kGates * s.hidden}, input.options());
  auto input_proj = saved.narrow(1, 0, kGates * s.hidden);
  at::mm_out(input_proj, x2d, w_ih.t());
  OptTensor bias_input;
  if (b_ih.has_value()) {
    // b_hh's r and z parts enter the gates exactly like b_ih's; its n part is multiplied by r.
    bias_input = *b_ih + at::cat({b_hh->narrow(0, 0, 2 * s.hidden), at::zeros({s.hidden}, b_hh->options())});
  }
  auto output2d = at::empty({s.rows, s.hidden}, input.options());

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_gru_forward_cpu", [&] {
    gru_forward_loop<scalar_t>(schedule, s, input_proj, bias_input, output2d, hy, w_hh, b_hh, save);
  });

  auto output_shape = input_.sizes().vec();
  output_shape.back() = s.hidden;
  const auto storage = input_.scalar_type();
  if (!save) saved = at::empty({0}, input.options());
  return {output2d.view(output_shape).to(storage), hy.to(storage), saved};
}

// ------------------------------------------------------------------------------------------ backward
// Pre-activation gradients, one [N, 4H] buffer: [dr, dz, dhn, dn]. The r and z gradients are the same on
// the input and the hidden side, so the hidden side's [dr, dz, dhn] are the first 3H columns and the input
// side's [dr, dz, dn] are columns 0..2H and 3H..4H.
constexpr int64_t kGradCols = 4;

template <typename T>
struct BackwardStep {
  const T* saved;        // [N, 4H]: r, z, n, hn
  const T* output;       // [N, H]: h_t of every packed row (h_{t-1} of the next step)
  const T* h0;           // [B, H]
  const T* grad_output;  // [N, H]
  T* dh_state;           // [B, H]: gradient reaching h_t in, its direct part to h_{t-1} out
  T* d_gates;            // [N, 4H]: dr, dz, dhn, dn
  int64_t hidden, offset, prev_offset, prev_rows;
};

template <typename T>
GATEDRNN_ALWAYS_INLINE void backward_span(const BackwardStep<T>& s, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = s.hidden, row = s.offset + b;
  const T* sv = s.saved + row * kSaved * H;
  // h_{t-1}: the previous step's output, or h0 for a row's first step.
  const T* h_prev = b < s.prev_rows ? s.output + (s.prev_offset + b) * H : s.h0 + b * H;
  const T* d_out = s.grad_output + row * H;
  T* dh = s.dh_state + b * H;
  T* dg = s.d_gates + row * kGradCols * H;
  GATEDRNN_IVDEP
  for (int64_t j = j0; j < j1; ++j) {
    const GruGates<T> a{sv[j], sv[H + j], sv[2 * H + j], sv[3 * H + j]};
    GruGateGrads<T> d_in, d_hid;
    dh[j] = gru_backward(a, h_prev[j], d_out[j] + dh[j], d_in, d_hid);
    store_gates(dg, H, j, d_in.r, d_in.z, d_hid.n, d_in.n);
  }
}

GATEDRNN_SPAN_KERNELS(run_backward_span, BackwardStep, backward_span)

template <typename scalar_t>
void gru_backward_loop(const std::vector<Step>& schedule, const LayerShape& s, const Tensor& grad_out2d,
                       const Tensor& saved, const Tensor& output2d, const Tensor& h0, const Tensor& w_hh,
                       Tensor& d_gates, Tensor& dh) {
  const int64_t G = kGradCols * s.hidden;
  BackwardStep<scalar_t> args{saved.const_data_ptr<scalar_t>(),
                              output2d.const_data_ptr<scalar_t>(),
                              h0.const_data_ptr<scalar_t>(),
                              grad_out2d.const_data_ptr<scalar_t>(),
                              dh.data_ptr<scalar_t>(),
                              d_gates.data_ptr<scalar_t>(),
                              s.hidden,
                              0,
                              0,
                              0};
  const StepGemm<scalar_t> recurrent_gemm(w_hh, /*transposed=*/false, s.batch, s.steps);
  for (auto it = schedule.rbegin(); it != schedule.rend(); ++it) {
    const Step& step = *it;
    args.offset = step.offset;
    args.prev_offset = step.prev_offset;
    args.prev_rows = step.prev_rows;
    for_each_span(step.rows, s.hidden, [&](int64_t b, int64_t j0, int64_t j1) { run_backward_span(args, b, j0, j1); });
    // dh_{t-1} = (direct part, written above) + [dr, dz, dhn] @ W_hh
    recurrent_gemm.run(args.d_gates + step.offset * G, step.rows, args.dh_state, /*accumulate=*/true, /*lda=*/G);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_cpu(
    const Tensor& grad_output_, const Tensor& grad_hy_, const Tensor& input_, const OptTensor& batch_sizes,
    const Tensor& hx_, const Tensor& w_ih_, const Tensor& w_hh_, const Tensor& output_, const Tensor& saved_,
    bool reverse, std::array<bool, 3> output_mask) {
  constexpr const char* op = "gatedrnn::gru_backward";
  const LayerShape s =
      check_gru_backward_args(op, grad_output_, grad_hy_, input_, batch_sizes, hx_, w_ih_, w_hh_, output_, saved_);
  const auto dtype = compute_dtype(input_.scalar_type());
  const int64_t H = s.hidden;
  const auto input = to_compute(input_, dtype), w_ih = to_compute(w_ih_, dtype), w_hh = to_compute(w_hh_, dtype);
  const auto hx = to_compute(hx_, dtype);
  const auto grad_out2d = to_compute(grad_output_, dtype).view({s.rows, H});
  const auto output2d = to_compute(output_, dtype).view({s.rows, H});
  const auto saved = saved_.contiguous().view({s.rows, kSaved * H});
  auto dh = grad_hy_.to(dtype, false, true).contiguous();

  const auto schedule = make_schedule(batch_sizes, s.steps, s.batch, reverse);
  auto d_gates = scratch_tensor(Scratch::Gates, {s.rows, kGradCols * H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "gatedrnn_gru_backward_cpu", [&] {
    gru_backward_loop<scalar_t>(schedule, s, grad_out2d, saved, output2d, hx, w_hh, d_gates, dh);
  });

  const auto x2d = input.view({s.rows, s.input_size});
  const LayerGradArgs args{x2d, w_ih, output2d, hx, schedule, !batch_sizes.has_value(),
                           reverse, output_mask, input_.sizes(), input_.options()};
  const auto g = gru_layer_grads(args, d_gates);
  return {g.input, dh.to(input_.scalar_type()), g.w_ih, g.w_hh, g.b_ih, g.b_hh};
}

}  // namespace

TORCH_LIBRARY_IMPL(gatedrnn, CPU, m) {
  m.impl("gru_forward", &gru_forward_cpu);
  m.impl("gru_backward", &gru_backward_cpu);
}

}  // namespace gatedrnn::cpu
