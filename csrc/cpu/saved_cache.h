// A process-wide cache for the buffers of saved activations: the tensors a training call returns for its
// backward, which die when the backward is done and are asked for again, the same size, by the next call.
//
// Why: glibc serves every allocation above 32 MiB with a fresh mmap, and the kernel faults in and zeroes each
// page on first touch. An LSTM with layer_norm at T=100 B=64 H=256 saves 66 MB of rows per call: 16,000 page
// faults, which took its forward from 17 to 32 ms on our machine (AMD EPYC, 2 threads), and made its cost
// depend on what else the process had allocated before. torch's CPU allocator caches nothing. (Temporaries
// that never leave an op use the per-thread scratch of workspace.h instead; these buffers outlive the op, so
// they come back here from whichever thread frees them.)
//
// When such a tensor dies its buffer is kept, oldest buffers giving way, while all kept buffers stay within
// kSavedCacheCap bytes for the whole process; a request takes the smallest kept buffer that fits it with at
// most an eighth to spare, else a new one. Buffers under kSavedCacheMin bytes bypass the cache: malloc's heap
// reuses those without faults already.
#pragma once

#include <ATen/ATen.h>

#include <mutex>
#include <vector>

namespace gatedrnn::cpu {

constexpr int64_t kSavedCacheCap = int64_t(256) << 20;
constexpr int64_t kSavedCacheMin = int64_t(1) << 20;

class SavedCache {
 public:
  // Never destroyed: tensors holding its buffers may die during the interpreter's exit, after statics.
  static SavedCache& instance() {
    static auto* cache = new SavedCache();
    return *cache;
  }

  // An uninitialised tensor of `sizes`, contiguous; its buffer returns here when its storage is freed.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const int64_t bytes = c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize());
    if (bytes < kSavedCacheMin) return at::empty(sizes, options);
    Buffer* buffer = take(bytes);
    if (!buffer) buffer = new Buffer{at::empty({bytes}, options.dtype(at::kByte))};
    return at::for_blob(buffer->memory.data_ptr(), sizes).context(buffer, &give_back).options(options).make_tensor();
  }

  // Bytes of the buffers kept and not in use (for tests: gatedrnn._extension.saved_cache_bytes()).
  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return idle_bytes_;
  }

  // Frees every buffer not in use (gatedrnn._extension.empty_saved_cache()).
  void release_idle() {
    std::vector<Buffer*> idle;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle.swap(idle_);
      idle_bytes_ = 0;
    }
    for (Buffer* buffer : idle) delete buffer;
  }

 private:
  struct Buffer {
    at::Tensor memory;  // bytes
    int64_t bytes() const { return memory.numel(); }
  };

  Buffer* take(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      const int64_t have = (*it)->bytes();
      if (have >= bytes && have <= bytes + bytes / 8 && (best == idle_.end() || have < (*best)->bytes())) best = it;
    }
    if (best == idle_.end()) return nullptr;
    Buffer* buffer = *best;
    idle_.erase(best);
    idle_bytes_ -= buffer->bytes();
    return buffer;
  }

  // The storage's deleter, on whichever thread frees it.
  static void give_back(void* context) {
    auto* buffer = static_cast<Buffer*>(context);
    std::vector<Buffer*> evicted;  // freed after the lock is released: unmapping takes a while
    {
      SavedCache& cache = instance();
      std::lock_guard<std::mutex> lock(cache.mutex_);
      if (buffer->bytes() <= kSavedCacheCap) {
        auto oldest = cache.idle_.begin();  // idle_ is in the order the buffers came back
        while (cache.idle_bytes_ + buffer->bytes() > kSavedCacheCap) {
          cache.idle_bytes_ -= (*oldest)->bytes();
          evicted.push_back(*oldest++);
        }
        cache.idle_.erase(cache.idle_.begin(), oldest);
        cache.idle_.push_back(buffer);
        cache.idle_bytes_ += buffer->bytes();
        buffer = nullptr;
      }
    }
    delete buffer;
    for (Buffer* old : evicted) delete old;
  }

  std::mutex mutex_;
  std::vector<Buffer*> idle_;
  int64_t idle_bytes_ = 0;
};

// saved_rows_tensor's allocation on the CPU (padded.h).
inline at::Tensor saved_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return SavedCache::instance().empty(sizes, options);
}

}  // namespace gatedrnn::cpu
