// Per-thread scratch buffers for large temporaries that never leave an op: the gate buffer of an inference
// call (a training call returns it as saved activations, so it must be a fresh tensor) and the gradient
// buffers of a backward call. An op uses each slot for at most one tensor at a time.
//
// Why: glibc serves allocations above 32 MiB with a fresh mmap, and the kernel then faults in and zeroes
// every page on first touch. For an LSTM call at T=100, B=64, H=512 (52 MB of gates) that cost about 12 ms
// of a 110 ms inference call on our machine, every call. Each buffer grows to the largest request and lives
// as long as its thread; requests above kMaxCachedBytes are allocated normally.
#pragma once

#include <ATen/ATen.h>

#include <array>

namespace gatedrnn::cpu {

enum class Scratch { Gates, Projection, PreProjection, kCount };

inline at::Tensor scratch_tensor(Scratch slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr int64_t kMaxCachedBytes = int64_t(512) << 20;
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const int64_t bytes = numel * int64_t(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (bytes > kMaxCachedBytes) return at::empty(sizes, options);
  thread_local std::array<at::Tensor, size_t(Scratch::kCount)> buffers;
  at::Tensor& buffer = buffers[size_t(slot)];
  if (!buffer.defined() || buffer.numel() < bytes) buffer = at::empty({bytes}, options.dtype(at::kByte));
  // Not owned by the caller: valid until this thread asks for this slot again (ops do not nest).
  return at::from_blob(buffer.data_ptr(), sizes, options);
}

}  // namespace gatedrnn::cpu
