// Christoffel symbols of the second kind, OpenMP-parallel over the batch. Per point: a Cholesky factor L of the
// symmetrised G, then G^-1 = L^-T L^-1 (O(d^3)), the first-kind combinations T[l, i, j] = dG[i, l, j] + dG[j, l, i] -
// dG[l, i, j], and Gamma[k] = 1/2 sum_l G^-1[k, l] T[l]: an axpy over the d^2 contiguous (i, j) entries per (k, l),
// which vectorises (independent accumulators), where solving per pair (i, j) was a chain of dependent operations.
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"
#include "common/simd.h"

namespace pygeo {

namespace {

// Lower Cholesky factor L [d, d] (row-major) of the symmetrised G [d, d]; false when G is not positive definite.
template <typename T>
PYGEO_INLINE bool symmetric_cholesky(const T* G, T* L, int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      T s = T(0.5) * (G[i * d + j] + G[j * d + i]);
      for (int64_t m = 0; m < j; ++m) s -= L[i * d + m] * L[j * d + m];
      if (i == j) {
        if (!(s > T(0))) return false;
        L[i * d + i] = std::sqrt(s);
      } else {
        L[i * d + j] = s / L[j * d + j];
      }
    }
  }
  return true;
}

// half_inverse [d, d] = 1/2 G^-1 = 1/2 W^T W with W = L^-1 (lower triangular, in W [d, d]); exactly symmetric.
template <typename T>
PYGEO_INLINE void half_inverse_from_cholesky(const T* L, T* W, T* half_inverse, int64_t d) {
  for (int64_t c = 0; c < d; ++c) {
    for (int64_t r = 0; r < c; ++r) W[r * d + c] = T(0);
    W[c * d + c] = T(1) / L[c * d + c];
    for (int64_t r = c + 1; r < d; ++r) {
      T s = T(0);
      for (int64_t m = c; m < r; ++m) s -= L[r * d + m] * W[m * d + c];
      W[r * d + c] = s / L[r * d + r];
    }
  }
  for (int64_t k = 0; k < d; ++k) {
    for (int64_t l = k; l < d; ++l) {
      T s = T(0);
      for (int64_t m = l; m < d; ++m) s += W[m * d + k] * W[m * d + l];
      half_inverse[k * d + l] = half_inverse[l * d + k] = T(0.5) * s;
    }
  }
}

// Per-point scratch: L, W = L^-1 and 1/2 G^-1 [d, d] each; the symmetrised dG and T [d, d, d] each.
template <typename T>
struct PointScratch {
  explicit PointScratch(int64_t d)
      : L(static_cast<size_t>(d * d)), W(static_cast<size_t>(d * d)), half_inverse(static_cast<size_t>(d * d)),
        symmetrised(static_cast<size_t>(d * d * d)), first_kind(static_cast<size_t>(d * d * d)) {}
  std::vector<T> L, W, half_inverse, symmetrised, first_kind;
};

// One point: Gb [d, d], dGb [d, d, d] -> out [d, d, d]; false (out untouched) when G is not positive definite.
template <typename T>
PYGEO_INLINE bool christoffel_point(const T* Gb, const T* dGb, T* out, int64_t d, PointScratch<T>& scratch) {
  const int64_t dd = d * d;
  if (!symmetric_cholesky(Gb, scratch.L.data(), d)) return false;
  half_inverse_from_cholesky(scratch.L.data(), scratch.W.data(), scratch.half_inverse.data(), d);
  // S[k] = (dG[k] + dG[k]^T) / 2, then T[l, i, j] = S[i, l, j] + S[j, l, i] - S[l, i, j] = P[l, i, j] + P[l, j, i] -
  // S[l, i, j] with P[l, i, :] = S[i, l, :]: row copies and transposes within d x d blocks, no strided walk over dG.
  // T[l, i, j] and T[l, j, i] are written from one number, so Gamma comes out exactly symmetric in (i, j).
  T* S = scratch.symmetrised.data();
  T* P = scratch.first_kind.data();  // P, then T in place
  for (int64_t k = 0; k < d; ++k) {
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < d; ++j) S[k * dd + i * d + j] = T(0.5) * (dGb[k * dd + i * d + j] + dGb[k * dd + j * d + i]);
    }
  }
  for (int64_t l = 0; l < d; ++l) {
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < d; ++j) P[l * dd + i * d + j] = S[i * dd + l * d + j];
    }
  }
  for (int64_t l = 0; l < d; ++l) {
    T* block = P + l * dd;
    const T* S_l = S + l * dd;
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = i; j < d; ++j) block[i * d + j] = block[j * d + i] = block[i * d + j] + block[j * d + i] - S_l[i * d + j];
    }
  }
  for (int64_t k = 0; k < d; ++k) {
    T* target = out + k * dd;
    for (int64_t e = 0; e < dd; ++e) target[e] = T(0);
    for (int64_t l = 0; l < d; ++l) {
      const T weight = scratch.half_inverse[k * d + l];
      const T* row = scratch.first_kind.data() + l * dd;
#pragma omp simd
      for (int64_t e = 0; e < dd; ++e) target[e] += weight * row[e];
    }
  }
  return true;
}

// The same code compiled for 16-, 32- and 64-byte vectors (simd.h); christoffel_cpu picks the CPU's widest.
template <typename T>
bool christoffel_point_16(const T* Gb, const T* dGb, T* out, int64_t d, PointScratch<T>& scratch) {
  return christoffel_point(Gb, dGb, out, d, scratch);
}
template <typename T>
PYGEO_TARGET_32 bool christoffel_point_32(const T* Gb, const T* dGb, T* out, int64_t d, PointScratch<T>& scratch) {
  return christoffel_point(Gb, dGb, out, d, scratch);
}
template <typename T>
PYGEO_TARGET_64 bool christoffel_point_64(const T* Gb, const T* dGb, T* out, int64_t d, PointScratch<T>& scratch) {
  return christoffel_point(Gb, dGb, out, d, scratch);
}

}  // namespace

// G: [B, d, d], dG: [B, d, d, d] (dG[b, k, i, j] = d G[i, j] / d z_k), Gamma: [B, d, d, d], failed: [B] int32.
// Inputs are read symmetrised ((G + G^T)/2, dG symmetrised in i, j), like the reference, so Gamma is exactly symmetric
// in its lower indices. Where G is not positive definite, failed[b] = 1 and Gamma[b] is NaN (the Python op retries
// those points with jitter or raises).
template <typename T>
void christoffel_cpu(const T* G, const T* dG, T* Gamma, int32_t* failed, int64_t B, int64_t d) {
  check_nonnegative(B, "B");
  check_positive(d, "d");
  const int64_t dd = d * d, ddd = d * d * d;
  const int bytes = simd_bytes();
  const auto point = bytes >= 64 ? christoffel_point_64<T> : bytes >= 32 ? christoffel_point_32<T> : christoffel_point_16<T>;
  // Small batches run on the calling thread: waking a team costs more than the work (and stalls on a busy machine).
#pragma omp parallel if (B * ddd >= 65536)
  {
    PointScratch<T> scratch(d);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      T* out = Gamma + b * ddd;
      const bool positive = point(G + b * dd, dG + b * ddd, out, d, scratch);
      failed[b] = positive ? 0 : 1;
      if (!positive) {
        for (int64_t e = 0; e < ddd; ++e) out[e] = std::numeric_limits<T>::quiet_NaN();
      }
    }
  }
}

template void christoffel_cpu<float>(const float*, const float*, float*, int32_t*, int64_t, int64_t);
template void christoffel_cpu<double>(const double*, const double*, double*, int32_t*, int64_t, int64_t);

}  // namespace pygeo
