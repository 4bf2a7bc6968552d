// The large products after a backward loop (layer_grads.h: input, weight and projection gradients) on the
// CPU tiles, when they are faster than ATen's GEMM on this machine.
//
// C (+)= A @ B for any strides of A and B: B is packed into Contiguous tiles (a copy of B, which the product
// then reads MR rows at a time). A with contiguous rows is read in place; a transposed view (dG^T in the
// weight gradients, whose rows are neighbours and whose k are a row of dG apart) is copied a block of rows
// and depth at a time into each thread's buffer, with a stride that is no multiple of 4 KB (matmul.cpp).
// The depth is split into blocks of kDepthBlock, so that a tile's panel block stays in L2 while every row
// block of A passes over it; each thread owns the same tiles of C in every depth block, so the blocks need
// no barrier between them.
//
// Which GEMM runs is measured once per process (choose_gemm): on AMD CPUs, where MKL takes its generic
// path, the tiles run about twice as fast as torch.mm; on others MKL may win. GATEDRNN_CPU_GEMM=tiles or
// aten forces the choice; backend_info()["cpu_gemm"] names it. A product with a single row of A is always
// ATen's (a matrix-vector product, cpu_matmul).
#pragma once

#include <ATen/core/Tensor.h>

namespace gatedrnn::cpu {

// c (+)= a @ b with the GEMM chosen for this process (c's rows contiguous); the post-loop products of the
// CPU backward ops (LayerGradArgs::matmul).
void cpu_matmul(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// "tiles" or "aten": the GEMM cpu_matmul uses (measured at the first call).
const char* gemm_name();

}  // namespace gatedrnn::cpu
