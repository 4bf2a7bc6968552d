// The op schemas of the CUDA emulation test library: torch.ops.gatedrnn_emulated.* (see
// csrc/cuda/platform.h). lstm.cpp and gru.cpp register the CUDA sources' implementations for CPU tensors.
#include <torch/library.h>

#include "../../csrc/schemas.h"

TORCH_LIBRARY(gatedrnn_emulated, m) { gatedrnn::define_ops(m); }
