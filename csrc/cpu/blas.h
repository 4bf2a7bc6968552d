// The GEMMs inside the time loops: a fixed weight matrix times a few rows of state, T times per call.
//
// Calling BLAS directly (instead of at::mm_out on narrowed views) removes the per-call dispatcher and
// tensor overhead that dominates small steps (B=1), and with MKL the weight is packed once per call into
// MKL's internal layout (cblas_sgemm_pack), which MKL would otherwise redo on every step. torch's x86-64
// builds link MKL and export these symbols; they are declared weak, so on a torch built with another BLAS
// they are null and we fall back to ATen. backend_info()["cpu_gemm"] names the path in use;
// GATEDRNN_CPU_GEMM=aten forces the fallback (for tests and comparisons).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src, int ld,
                      float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace gatedrnn::cpu {

enum class GemmPath { MklPacked, Blas, Aten };

inline GemmPath gemm_path() {
  static const GemmPath path = [] {
    const char* forced = std::getenv("GATEDRNN_CPU_GEMM");
    if (forced && std::strcmp(forced, "aten") == 0) return GemmPath::Aten;
    if (!sgemm_ || !dgemm_) return GemmPath::Aten;
    if (cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute) return GemmPath::MklPacked;
    return GemmPath::Blas;
  }();
  return path;
}

inline const char* gemm_path_name() {
  switch (gemm_path()) {
    case GemmPath::MklPacked:
      return "mkl-packed";
    case GemmPath::Blas:
      return "blas";
    default:
      return "aten";
  }
}

// C[rows, n] = A[rows, k] @ op(W) (+ C when accumulating), with W fixed for the whole call.
// `weight` is [n, k] with op(W) = W^T when `transposed`, else [k, n] with op(W) = W. A and C are
// row-major and contiguous (lda = k, ldc = n); rows may shrink from step to step (packed sequences).
template <typename T>
class StepGemm {
 public:
  // `steps`: how many times run() will be called; packing costs about one product, so it pays only when
  // the weight is reused and the products are real GEMMs rather than matrix-vector products.
  StepGemm(const at::Tensor& weight, bool transposed, int64_t max_rows, int64_t steps)
      : weight_(weight.contiguous()),
        transposed_(transposed),
        n_(transposed ? weight.size(0) : weight.size(1)),
        k_(transposed ? weight.size(1) : weight.size(0)) {
    constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
    // LP64 BLAS takes int dimensions.
    direct_ = gemm_path() != GemmPath::Aten && n_ * k_ <= kMaxInt && max_rows * std::max(n_, k_) <= kMaxInt;
    constexpr int64_t kMinPackedRows = 8, kMinPackedSteps = 4;
    if (direct_ && std::is_same_v<T, float> && gemm_path() == GemmPath::MklPacked && max_rows >= kMinPackedRows &&
        steps >= kMinPackedSteps && n_ > 0 && k_ > 0) {
      constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kBMatrix = 162;
      const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, int(max_rows), int(n_), int(k_));
      packed_ = at::empty({int64_t((bytes + sizeof(float) - 1) / sizeof(float))}, weight_.options());
      cblas_sgemm_pack(kRowMajor, kBMatrix, transposed ? kTrans : kNoTrans, int(max_rows), int(n_), int(k_), 1.0f,
                       reinterpret_cast<const float*>(weight_.const_data_ptr()), transposed ? int(k_) : int(n_),
                       reinterpret_cast<float*>(packed_.data_ptr()));
    }
  }

  // `lda`: row stride of A when it is a column block of a wider matrix (default k).
  void run(const T* a, int64_t rows, T* c, bool accumulate, int64_t lda = -1) const {
    if (lda < 0) lda = k_;
    if (rows == 0 || n_ == 0) return;
    if (k_ == 0) {
      if (!accumulate) std::fill(c, c + rows * n_, T(0));
      return;
    }
    if (!direct_ || lda * rows > std::numeric_limits<int>::max()) return run_aten(a, rows, c, accumulate, lda);
    const T beta = accumulate ? T(1) : T(0);
    if constexpr (std::is_same_v<T, float>) {
      if (packed_.defined()) {
        constexpr int kRowMajor = 101, kNoTrans = 111, kPacked = 151;
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(rows), int(n_), int(k_), a, int(lda),
                            reinterpret_cast<const float*>(packed_.const_data_ptr()), int(n_), beta, c, int(n_));
        return;
      }
    }
    // Column-major BLAS sees row-major C^T = op(W)^T A^T: A needs no transpose, W the opposite of op.
    const int m = int(n_), n = int(rows), k = int(k_), lda_int = int(lda), ldw = transposed_ ? int(k_) : int(n_);
    const char trans_w = transposed_ ? 'T' : 'N', no_trans = 'N';
    const T alpha = T(1);
    const T* w = weight_.const_data_ptr<T>();
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&trans_w, &no_trans, &m, &n, &k, &alpha, w, &ldw, a, &lda_int, &beta, c, &m);
    } else {
      dgemm_(&trans_w, &no_trans, &m, &n, &k, &alpha, w, &ldw, a, &lda_int, &beta, c, &m);
    }
  }

 private:
  void run_aten(const T* a, int64_t rows, T* c, bool accumulate, int64_t lda) const {
    const auto options = weight_.options();
    const auto a_t = at::from_blob(const_cast<T*>(a), {rows, k_}, {lda, 1}, options);
    auto c_t = at::from_blob(c, {rows, n_}, options);
    const auto w = transposed_ ? weight_.t() : weight_;
    if (accumulate) {
      c_t.addmm_(a_t, w);
    } else {
      at::mm_out(c_t, a_t, w);
    }
  }

  at::Tensor weight_, packed_;
  bool transposed_;
  int64_t n_, k_;
  bool direct_ = false;
};

}  // namespace gatedrnn::cpu
