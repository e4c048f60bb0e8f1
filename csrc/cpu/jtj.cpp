// G = J^T diag(w) J for a batch of Jacobians, OpenMP-parallel over the batch.
#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"

namespace pygeo {

// J: [B, D, d] contiguous; w: [B, D] (w_batch_stride = D), [D] (w_batch_stride = 0) or nullptr (all ones);
// G: [B, d, d]. Only the upper triangle is accumulated and then mirrored, so G is exactly symmetric.
template <typename T>
void jtj_cpu(const T* J, const T* w, int64_t w_batch_stride, T* G, int64_t B, int64_t D, int64_t d) {
  check_nonnegative(B, "B");
  check_nonnegative(D, "D");
  check_positive(d, "d");
  check_nonnegative(w_batch_stride, "w_batch_stride");
#pragma omp parallel
  {
    std::vector<T> acc(static_cast<size_t>(d * d));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* Jb = J + b * D * d;
      const T* wb = w ? w + b * w_batch_stride : nullptr;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t r = 0; r < D; ++r) {
        const T* row = Jb + r * d;
        const T wr = wb ? wb[r] : T(1);
        for (int64_t i = 0; i < d; ++i) {
          const T a = wr * row[i];
          T* acc_i = acc.data() + i * d;
#pragma omp simd
          for (int64_t j = i; j < d; ++j) acc_i[j] += a * row[j];
        }
      }
      T* Gb = G + b * d * d;
      for (int64_t i = 0; i < d; ++i) {
        for (int64_t j = i; j < d; ++j) {
          Gb[i * d + j] = acc[i * d + j];
          Gb[j * d + i] = acc[i * d + j];
        }
      }
    }
  }
}

template void jtj_cpu<float>(const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t);
template void jtj_cpu<double>(const double*, const double*, int64_t, double*, int64_t, int64_t, int64_t);

}  // namespace pygeo
