// Per-thread scratch buffers for large temporaries that never leave an op: the projection buffer of an
// inference call (one chunk of steps, about 4 MiB whatever T is), the gradient buffers of a backward call
// and the weights packed for the tiles. An op uses each slot for at most one tensor at a time.
//
// Why: glibc serves allocations above 32 MiB with a fresh mmap, and the kernel then faults in and zeroes
// every page on first touch. For an LSTM backward at T=100, B=64, H=512 (52 MB of gate gradients) that cost
// about 12 ms per call on our machine. Each buffer grows to the largest request and lives as long as its
// thread; but what all threads together keep is capped per process (kProcessCap): a request that would pass
// the cap is allocated normally and freed with its tensor, so a server with a pool of 32 threads keeps no
// more than one thread would.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <atomic>

namespace gatedrnn::cpu {

// Gates: an inference call's projection chunk, or a backward's gate gradients. Packed*: weights packed for
// the tiles (tiles.h), which a call repacks every time (a fresh buffer would be faulted in every time).
// Norm*: the layer_norm backward's gradients reaching its two products and its cell norm (layer_norm.cpp).
// MatmulRows: the post-loop GEMM's copies of a transposed A, a block at a time (matmul.cpp).
enum class Scratch {
  Gates,
  Projection,
  PreProjection,
  PackedInput,
  PackedRecurrent,
  PackedProjection,
  NormInputGrads,
  NormRecurrentGrads,
  NormCellGrads,
  MatmulRows,
  kCount
};

// Bytes all threads' scratch buffers may keep together.
constexpr int64_t kProcessCap = int64_t(256) << 20;

inline std::atomic<int64_t>& cached_scratch_bytes() {
  static std::atomic<int64_t> bytes{0};
  return bytes;
}

// One thread's buffers; returns their bytes to the process budget when the thread exits.
struct ScratchBuffers {
  std::array<at::Tensor, size_t(Scratch::kCount)> buffers;

  ~ScratchBuffers() {
    for (const auto& b : buffers) {
      if (b.defined()) cached_scratch_bytes() -= b.numel();
    }
  }
};

inline at::Tensor scratch_tensor(Scratch slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const int64_t bytes = numel * int64_t(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  thread_local ScratchBuffers mine;
  at::Tensor& buffer = mine.buffers[size_t(slot)];
  if (buffer.defined() && buffer.numel() >= bytes) {
    // Not owned by the caller: valid until this thread asks for this slot again (ops do not nest).
    return at::from_blob(buffer.data_ptr(), sizes, options);
  }
  // Grow this slot only if the process stays within its cap; else an ordinary tensor.
  const int64_t held = buffer.defined() ? buffer.numel() : 0;
  int64_t total = cached_scratch_bytes().load();
  while (total - held + bytes <= kProcessCap) {
    if (cached_scratch_bytes().compare_exchange_weak(total, total - held + bytes)) {
      buffer = at::empty({bytes}, options.dtype(at::kByte));
      return at::from_blob(buffer.data_ptr(), sizes, options);
    }
  }
  return at::empty(sizes, options);
}

// What all threads' scratch buffers hold now (for tests: gatedrnn._extension.scratch_bytes()).
inline int64_t scratch_bytes() { return cached_scratch_bytes().load(); }

}  // namespace gatedrnn::cpu
