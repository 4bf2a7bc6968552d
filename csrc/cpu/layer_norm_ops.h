// The CPU implementations of the layer_norm LSTM and GRU (layer_norm.cpp), with op_entry.h's signatures;
// lstm.cpp and gru.cpp register them beside the plain cells' under the same ops.
#pragma once

#include "../op_entry.h"

namespace gatedrnn::cpu {

GATEDRNN_DECLARE_NORM_IMPLS(cpu)

}  // namespace gatedrnn::cpu
