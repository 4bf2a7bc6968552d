// The CUDA side of the build. The fused kernels arrive with the CUDA issue; until then this translation
// unit proves the CUDA toolchain path of setup.py (nvcc, the arch list, linking cudart) on every build,
// and lets backend_info() report the CUDA runtime the extension was linked against.
#include <cuda_runtime_api.h>

extern "C" int gatedrnn_cuda_runtime_version() {
  int version = 0;
  // Only the runtime library is asked; no driver or GPU is needed, so this works on GPU-less machines.
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) return -1;
  return version;
}
