// Small dense Cholesky factorisation and triangular solves for one d x d matrix, row-major, written so that every inner
// loop walks a contiguous row (it vectorises). Host and device code (the CUDA kernels include this too).
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define PYGEO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYGEO_HOST_DEVICE inline
#endif

namespace pygeo {
namespace small {

// Relative jitters tried, in this order, when G is not numerically positive definite (same as the PyTorch reference).
constexpr int kJitterTries = 4;
PYGEO_HOST_DEVICE double relative_jitter(int attempt) {
  return attempt == 0 ? 1e-10 : attempt == 1 ? 1e-8 : attempt == 2 ? 1e-6 : 1e-4;
}

// C (lower, row-major, upper part untouched) with C C^T = G + jitter I; false when a pivot is not positive.
template <typename T>
PYGEO_HOST_DEVICE bool cholesky(const T* G, T jitter, T* C, int d) {
  for (int j = 0; j < d; ++j) {
    const T* Cj = C + j * d;
    for (int i = j; i < d; ++i) {
      const T* Ci = C + i * d;
      T s = G[i * d + j] + (i == j ? jitter : T(0));
      for (int k = 0; k < j; ++k) s -= Ci[k] * Cj[k];
      if (i == j) {
        if (!(s > T(0))) return false;  // also catches NaN
        C[j * d + j] = std::sqrt(s);
      } else {
        C[i * d + j] = s / C[j * d + j];
      }
    }
  }
  return true;
}

// Cholesky with the jitter retries; returns the jitter used through *jitter_used, false when every try failed.
template <typename T>
PYGEO_HOST_DEVICE bool cholesky_with_jitter(const T* G, T* C, int d, T* jitter_used) {
  *jitter_used = T(0);
  if (cholesky(G, T(0), C, d)) return true;
  T scale = T(0);
  for (int i = 0; i < d; ++i) scale += std::abs(G[i * d + i]);
  scale /= T(d);
  for (int attempt = 0; attempt < kJitterTries; ++attempt) {
    const T jitter = static_cast<T>(relative_jitter(attempt)) * scale;
    if (cholesky(G, jitter, C, d)) {
      *jitter_used = jitter;
      return true;
    }
  }
  return false;
}

// In place: x <- C^-1 x (forward substitution, row-oriented).
template <typename T>
PYGEO_HOST_DEVICE void solve_lower(const T* C, T* x, int d) {
  for (int i = 0; i < d; ++i) {
    const T* Ci = C + i * d;
    T s = x[i];
    for (int k = 0; k < i; ++k) s -= Ci[k] * x[k];
    x[i] = s / Ci[i];
  }
}

// In place: x <- C^-T x (backward substitution, column-oriented so it reads rows of C).
template <typename T>
PYGEO_HOST_DEVICE void solve_lower_transposed(const T* C, T* x, int d) {
  for (int i = d - 1; i >= 0; --i) {
    const T* Ci = C + i * d;
    const T xi = x[i] / Ci[i];
    x[i] = xi;
    for (int k = 0; k < i; ++k) x[k] -= Ci[k] * xi;
  }
}

// |C^T r|^2 = r^T C C^T r.
template <typename T>
PYGEO_HOST_DEVICE T quadratic_form(const T* C, const T* r, T* scratch, int d) {
  for (int i = 0; i < d; ++i) scratch[i] = T(0);
  for (int k = 0; k < d; ++k) {
    const T* Ck = C + k * d;
    const T rk = r[k];
    for (int i = 0; i <= k; ++i) scratch[i] += Ck[i] * rk;
  }
  T s = T(0);
  for (int i = 0; i < d; ++i) s += scratch[i] * scratch[i];
  return s;
}

// Ginv = C^-T C^-1 (full, symmetric), through Cinv = C^-1 built row by row; Cinv is scratch of d*d.
template <typename T>
PYGEO_HOST_DEVICE void inverse_from_cholesky(const T* C, T* Cinv, T* Ginv, int d) {
  for (int i = 0; i < d; ++i) {
    T* row = Cinv + i * d;
    for (int j = 0; j < d; ++j) row[j] = T(0);
    row[i] = T(1);
    const T* Ci = C + i * d;
    for (int k = 0; k < i; ++k) {  // row_i -= C[i, k] row_k, rows of Cinv below the diagonal only
      const T* row_k = Cinv + k * d;
      const T c = Ci[k];
      for (int j = 0; j <= k; ++j) row[j] -= c * row_k[j];
    }
    const T inv_diag = T(1) / Ci[i];
    for (int j = 0; j <= i; ++j) row[j] *= inv_diag;
  }
  for (int i = 0; i < d; ++i) {
    for (int j = 0; j <= i; ++j) Ginv[i * d + j] = T(0);
  }
  for (int k = 0; k < d; ++k) {  // Ginv[i, j] = sum_k Cinv[k, i] Cinv[k, j], lower triangle, then mirrored
    const T* row_k = Cinv + k * d;
    for (int i = 0; i <= k; ++i) {
      const T a = row_k[i];
      T* Gi = Ginv + i * d;
      for (int j = 0; j <= i; ++j) Gi[j] += a * row_k[j];
    }
  }
  for (int i = 0; i < d; ++i) {
    for (int j = 0; j < i; ++j) Ginv[j * d + i] = Ginv[i * d + j];
  }
}

}  // namespace small
}  // namespace pygeo
