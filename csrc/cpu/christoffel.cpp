// Christoffel symbols of the second kind, OpenMP-parallel over the batch: per point one Cholesky factorisation of the
// symmetrised G, then one pair of triangular solves per lower-index pair (i <= j).
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"

namespace pygeo {

// G: [B, d, d], dG: [B, d, d, d] (dG[b, k, i, j] = d G[i, j] / d z_k), Gamma: [B, d, d, d], failed: [B] int32.
// Inputs are read symmetrised ((G + G^T)/2, dG symmetrised in i, j), like the reference. Where G is not positive
// definite, failed[b] = 1 and Gamma[b] is NaN (the Python op retries those points with jitter or raises).
template <typename T>
void christoffel_cpu(const T* G, const T* dG, T* Gamma, int32_t* failed, int64_t B, int64_t d) {
  check_nonnegative(B, "B");
  check_positive(d, "d");
  const int64_t dd = d * d, ddd = d * d * d;
  // Small batches run on the calling thread: waking a team costs more than the work (and stalls on a busy machine).
#pragma omp parallel if (B * ddd >= 65536)
  {
    std::vector<T> L(static_cast<size_t>(dd));  // lower Cholesky factor, row-major
    std::vector<T> x(static_cast<size_t>(d));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* Gb = G + b * dd;
      const T* dGb = dG + b * ddd;
      T* out = Gamma + b * ddd;
      bool positive = true;
      for (int64_t i = 0; i < d && positive; ++i) {
        for (int64_t j = 0; j <= i; ++j) {
          T s = T(0.5) * (Gb[i * d + j] + Gb[j * d + i]);
          for (int64_t m = 0; m < j; ++m) s -= L[i * d + m] * L[j * d + m];
          if (i == j) {
            if (!(s > T(0))) {
              positive = false;
              break;
            }
            L[i * d + i] = std::sqrt(s);
          } else {
            L[i * d + j] = s / L[j * d + j];
          }
        }
      }
      failed[b] = positive ? 0 : 1;
      if (!positive) {
        for (int64_t e = 0; e < ddd; ++e) out[e] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      auto sym = [&](int64_t k, int64_t i, int64_t j) { return T(0.5) * (dGb[k * dd + i * d + j] + dGb[k * dd + j * d + i]); };
      for (int64_t i = 0; i < d; ++i) {
        for (int64_t j = i; j < d; ++j) {
          // x = L^{-T} L^{-1} T[:, i, j], T[l,i,j] = dG[i,l,j] + dG[j,l,i] - dG[l,i,j]
          for (int64_t l = 0; l < d; ++l) {
            T s = sym(i, l, j) + sym(j, l, i) - sym(l, i, j);
            for (int64_t m = 0; m < l; ++m) s -= L[l * d + m] * x[m];
            x[l] = s / L[l * d + l];
          }
          for (int64_t l = d - 1; l >= 0; --l) {
            T s = x[l];
            for (int64_t m = l + 1; m < d; ++m) s -= L[m * d + l] * x[m];
            x[l] = s / L[l * d + l];
          }
          for (int64_t k = 0; k < d; ++k) {
            const T value = T(0.5) * x[k];
            out[k * dd + i * d + j] = value;
            out[k * dd + j * d + i] = value;
          }
        }
      }
    }
  }
}

template void christoffel_cpu<float>(const float*, const float*, float*, int32_t*, int64_t, int64_t);
template void christoffel_cpu<double>(const double*, const double*, double*, int32_t*, int64_t, int64_t);

}  // namespace pygeo
