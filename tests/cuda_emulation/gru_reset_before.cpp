// csrc/cuda/gru_reset_before.cu, compiled by the host compiler against csrc/cuda/emulation.h.
#define GATEDRNN_EMULATE_CUDA
#include "../../csrc/cuda/gru_reset_before.cu"
