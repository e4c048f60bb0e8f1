// G = J^T diag(w) J for a batch of Jacobians, OpenMP-parallel over the batch.
//
// Per batch item, J [D, d] is copied into a thread-local [D, dpad] buffer with columns zero-padded to a multiple of 8.
// G is then built in 8 x 8 blocks (upper block triangle only) as a sum of rank-one updates over the D rows: each block's
// 64 accumulators stay in vector registers, each row costs 8 broadcast-FMAs. Mirrored at the end: G is exactly symmetric.
#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"

namespace pygeo {

namespace {

constexpr int64_t kTile = 8;

// One batch item: J [D, d], w [D] or nullptr, G [d, d]; padded: scratch [D, dpad].
template <typename T>
PYGEO_SIMD_CLONES void jtj_item(const T* Jb, const T* wb, T* Gb, int64_t D, int64_t d, int64_t dpad, T* padded) {
  for (int64_t r = 0; r < D; ++r) {
    for (int64_t c = 0; c < dpad; ++c) padded[r * dpad + c] = c < d ? Jb[r * d + c] : T(0);
  }
  for (int64_t i0 = 0; i0 < d; i0 += kTile) {
    for (int64_t j0 = i0; j0 < d; j0 += kTile) {
      T acc[kTile][kTile] = {};
      for (int64_t r = 0; r < D; ++r) {
        const T* row = padded + r * dpad;
        const T wr = wb ? wb[r] : T(1);
        for (int64_t a = 0; a < kTile; ++a) {
          const T s = wr * row[i0 + a];
#pragma omp simd
          for (int64_t c = 0; c < kTile; ++c) acc[a][c] += s * row[j0 + c];
        }
      }
      for (int64_t a = 0; a < kTile; ++a) {
        for (int64_t c = 0; c < kTile; ++c) {
          const int64_t i = i0 + a, j = j0 + c;
          if (i >= d || j >= d || j < i) continue;  // padding, and the lower half of diagonal blocks
          Gb[i * d + j] = acc[a][c];
          Gb[j * d + i] = acc[a][c];
        }
      }
    }
  }
}

}  // namespace

// J: [B, D, d] contiguous; w: [B, D] (w_batch_stride = D), [D] (w_batch_stride = 0) or nullptr (all ones);
// G: [B, d, d].
template <typename T>
void jtj_cpu(const T* J, const T* w, int64_t w_batch_stride, T* G, int64_t B, int64_t D, int64_t d) {
  check_nonnegative(B, "B");
  check_nonnegative(D, "D");
  check_positive(d, "d");
  check_nonnegative(w_batch_stride, "w_batch_stride");
  const int64_t dpad = (d + kTile - 1) / kTile * kTile;
  // Starting the thread team costs more than a small batch's work.
#pragma omp parallel if (B * D * dpad > (int64_t(1) << 16))
  {
    std::vector<T> padded(static_cast<size_t>(D * dpad));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      jtj_item(J + b * D * d, w ? w + b * w_batch_stride : nullptr, G + b * d * d, D, d, dpad, padded.data());
    }
  }
}

template void jtj_cpu<float>(const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t);
template void jtj_cpu<double>(const double*, const double*, int64_t, double*, int64_t, int64_t, int64_t);

}  // namespace pygeo
