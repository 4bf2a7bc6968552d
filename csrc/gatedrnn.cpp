// The op library (schemas in schemas.h) and the Python module that loads it.
#include <Python.h>
#include <torch/library.h>

#include "cpu/amx.h"
#include "cpu/bf16.h"
#include "cpu/counters.h"
#include "cpu/loops.h"
#include "cpu/matmul.h"
#include "cpu/saved_cache.h"
#include "cpu/team.h"
#include "cpu/workspace.h"
#include "schemas.h"

TORCH_LIBRARY(gatedrnn, m) { gatedrnn::define_ops(m); }

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
#ifdef _OPENMP
  const char* cpu_threads = "openmp";
#else
  const char* cpu_threads = "single";
#endif
  return Py_BuildValue("{s:O,s:s,s:i,s:s,s:s,s:i,s:s,s:s,s:O,s:O}", "cuda", cuda, "cuda_archs", cuda_archs, "cuda_runtime",
                       cuda_runtime, "cpu_isa", gatedrnn::cpu::cpu_isa_name(), "cpu_threads", cpu_threads,
                       "cpu_team_size", gatedrnn::cpu::team_size(), "cpu_team_barrier",
                       gatedrnn::cpu::team_barrier_name(), "cpu_gemm", gatedrnn::cpu::gemm_name(),
                       "cpu_bf16_tiles", gatedrnn::cpu::bf16_tiles_available() ? Py_True : Py_False,
                       "cpu_bf16_amx", gatedrnn::cpu::amx_available() ? Py_True : Py_False);
}

PyObject* scratch_bytes(PyObject*, PyObject*) { return PyLong_FromLongLong(gatedrnn::cpu::scratch_bytes()); }

PyObject* saved_cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromLongLong(gatedrnn::cpu::SavedCache::instance().idle_bytes());
}

PyObject* empty_saved_cache(PyObject*, PyObject*) {
  gatedrnn::cpu::SavedCache::instance().release_idle();
  Py_RETURN_NONE;
}

// {kernel label: calls} of the CPU tile kernels (csrc/cpu/counters.h), summed over dtypes.
PyObject* kernel_calls(PyObject*, PyObject*) {
  PyObject* calls = PyDict_New();
  if (!calls) return nullptr;
  for (auto* c = gatedrnn::cpu::KernelCounter::head(); c; c = c->next) {
    PyObject* previous = PyDict_GetItemString(calls, c->name);  // borrowed
    const long long total = (previous ? PyLong_AsLongLong(previous) : 0) + c->calls.load();
    PyObject* value = PyLong_FromLongLong(total);
    if (!value || PyDict_SetItemString(calls, c->name, value) < 0) {
      Py_XDECREF(value);
      Py_DECREF(calls);
      return nullptr;
    }
    Py_DECREF(value);
  }
  return calls;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What the extension was compiled with."},
    {"kernel_calls", kernel_calls, METH_NOARGS, "Calls of each CPU tile kernel so far, by kernel."},
    {"scratch_bytes", scratch_bytes, METH_NOARGS, "Bytes the CPU scratch buffers of all threads hold."},
    {"saved_cache_bytes", saved_cache_bytes, METH_NOARGS, "Bytes of idle saved-activation buffers the CPU keeps."},
    {"empty_saved_cache", empty_saved_cache, METH_NOARGS, "Frees the idle saved-activation buffers."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "gatedrnn's compiled ops (registered in torch.ops.gatedrnn)", -1,
                          methods};

}  // namespace

// Importing gatedrnn._C runs the static TORCH_LIBRARY registrations above and in cpu/ and cuda/.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
