// The CUDA runtime the extension was linked against, for gatedrnn.backend_info() (csrc/gatedrnn.cpp).
#include <cuda_runtime_api.h>

extern "C" int gatedrnn_cuda_runtime_version() {
  int version = 0;
  // Only the runtime library is asked; no driver or GPU is needed, so this works on GPU-less machines.
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) return -1;
  return version;
}
