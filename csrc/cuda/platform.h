// Everything the CUDA ops take from the CUDA toolchain and from PyTorch's CUDA support, in one place.
//
// Built by nvcc (the normal case) these are the real thing. Built by a host compiler with
// GATEDRNN_EMULATE_CUDA defined, emulation.h supplies the same names with CPU meanings, so that the very same
// sources (lstm.cu, gru.cu and their headers) run on the CPU, each kernel launch executing the kernel's
// threads as CPU threads: tests/test_cuda_emulated.py checks the CUDA code's indexing, schedules and
// synchronisation against the CPU ops on machines without a GPU. What emulation cannot show (the GPU's
// memory model, tensor-core fragment layouts, speed) needs a GPU: tests/test_cuda.py.
#pragma once

#ifdef GATEDRNN_EMULATE_CUDA
#include "emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

// Where the CUDA ops register: torch.ops.gatedrnn, for CUDA tensors.
#define GATEDRNN_CUDA_LIBRARY gatedrnn
#define GATEDRNN_CUDA_DISPATCH_KEY CUDA

namespace gatedrnn::cuda {

using DeviceGuard = c10::cuda::CUDAGuard;

inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }

// SMs of the current device (launch.h sizes the row blocks so that small steps still fill them).
inline int64_t multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Launches kernel on the current stream and raises if the launch failed.
template <typename Params>
void launch_kernel(void (*kernel)(Params), dim3 grid, dim3 block, const Params& params) {
  kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace gatedrnn::cuda
#endif
