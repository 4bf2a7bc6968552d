// csrc/cuda/layer_norm.cu, compiled by the host compiler against csrc/cuda/emulation.h.
#define GATEDRNN_EMULATE_CUDA
#include "../../csrc/cuda/layer_norm.cu"
