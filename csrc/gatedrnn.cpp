// Op schemas and the Python module that loads them.
//
// One forward op per layer and direction over the whole sequence, and its backward op. Dense input is
// [T, B, I]; packed input is [N, I] with `batch_sizes` (a PackedSequence's). Weights are passed exactly as
// torch.nn stores them. The forward returns, besides output and final state, the activations its backward
// needs (empty tensors when save_for_backward is false). The backward ops compute the gradients of the
// initial state always and, as output_mask says, those of the input, the weights and the biases; the
// gradients not asked for (and those of absent biases or projections) come back as empty tensors.
#include <Python.h>
#include <torch/library.h>

#include "cpu/blas.h"
#include "cpu/loops.h"

TORCH_LIBRARY(gatedrnn, m) {
  m.def(
      "lstm_forward(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, bool reverse, bool save_for_backward) "
      "-> (Tensor output, Tensor hy, Tensor cy, Tensor gates, Tensor cells)");
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor? batch_sizes, "
      "Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, Tensor? weight_hr, Tensor output, Tensor gates, "
      "Tensor cells, bool reverse, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, "
      "Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, Tensor grad_weight_hr)");
  m.def(
      "gru_forward(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, bool reverse, bool save_for_backward) "
      "-> (Tensor output, Tensor hy, Tensor saved)");
  m.def(
      "gru_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor? batch_sizes, Tensor hx, "
      "Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor saved, bool reverse, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, "
      "Tensor grad_bias_hh)");
}

// What this binary was built with, for gatedrnn.backend_info(). setup.py defines GATEDRNN_WITH_CUDA and
// GATEDRNN_CUDA_ARCHS for a CUDA build.

#ifdef GATEDRNN_WITH_CUDA
extern "C" int gatedrnn_cuda_runtime_version();  // csrc/cuda/runtime.cu
#endif

namespace {

PyObject* build_info(PyObject*, PyObject*) {
#ifdef GATEDRNN_WITH_CUDA
  PyObject* cuda = Py_True;
  const char* cuda_archs = GATEDRNN_CUDA_ARCHS;
  const int cuda_runtime = gatedrnn_cuda_runtime_version();
#else
  PyObject* cuda = Py_False;
  const char* cuda_archs = "";
  const int cuda_runtime = 0;
#endif
  return Py_BuildValue("{s:O,s:s,s:i,s:s,s:s}", "cuda", cuda, "cuda_archs", cuda_archs, "cuda_runtime", cuda_runtime,
                       "cpu_gemm", gatedrnn::cpu::gemm_path_name(), "cpu_isa", gatedrnn::cpu::cpu_isa_name());
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What the extension was compiled with."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "gatedrnn's compiled ops (registered in torch.ops.gatedrnn)", -1,
                          methods};

}  // namespace

// Importing gatedrnn._C runs the static TORCH_LIBRARY registrations above and in cpu/ and cuda/.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
