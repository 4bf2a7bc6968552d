// The CUDA implementations of the layer_norm LSTM and GRU (layer_norm.cu), with op_entry.h's signatures;
// lstm.cu and gru.cu register them beside the plain cells' under the same ops.
#pragma once

#include "../op_entry.h"

namespace gatedrnn::cuda {

GATEDRNN_DECLARE_NORM_IMPLS(cuda)

}  // namespace gatedrnn::cuda
