// G = J^T diag(w) J for a batch of Jacobians, OpenMP-parallel over the batch.
//
// Per batch item, J [D, d] is copied into a thread-local [D, dpad] buffer with columns zero-padded to a multiple of 8.
// G is then built in 8 x 8 blocks (upper block triangle only) as a sum of rank-one updates over the D rows: each block's
// 64 accumulators stay in vector registers, each row costs 8 broadcast-FMAs. Mirrored at the end: G is exactly symmetric.
// Below d = 8 a block would be mostly padding (21x the work at d = 2), so there the d(d+1)/2 sums run in one pass over
// the rows, vectorised across rows.
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

// One batch item for a small d = N < kTile: the upper triangle's N(N+1)/2 sums over rows, no padding.
template <typename T, int N>
PYGEO_SIMD_CLONES void jtj_item_small(const T* Jb, const T* wb, T* Gb, int64_t D) {
  constexpr int P = N * (N + 1) / 2;
  T acc[P] = {};
  if (wb) {
#pragma omp simd reduction(+ : acc[:P])
    for (int64_t r = 0; r < D; ++r) {
      int p = 0;
      for (int i = 0; i < N; ++i) {
        const T s = wb[r] * Jb[r * N + i];
        for (int j = i; j < N; ++j) acc[p++] += s * Jb[r * N + j];
      }
    }
  } else {
#pragma omp simd reduction(+ : acc[:P])
    for (int64_t r = 0; r < D; ++r) {
      int p = 0;
      for (int i = 0; i < N; ++i) {
        for (int j = i; j < N; ++j) acc[p++] += Jb[r * N + i] * Jb[r * N + j];
      }
    }
  }
  int p = 0;
  for (int i = 0; i < N; ++i) {
    for (int j = i; j < N; ++j, ++p) {
      Gb[i * N + j] = acc[p];
      Gb[j * N + i] = acc[p];
    }
  }
}

template <typename T>
void jtj_item_small_dispatch(const T* Jb, const T* wb, T* Gb, int64_t D, int64_t d) {
  switch (d) {
    case 1: return jtj_item_small<T, 1>(Jb, wb, Gb, D);
    case 2: return jtj_item_small<T, 2>(Jb, wb, Gb, D);
    case 3: return jtj_item_small<T, 3>(Jb, wb, Gb, D);
    case 4: return jtj_item_small<T, 4>(Jb, wb, Gb, D);
    case 5: return jtj_item_small<T, 5>(Jb, wb, Gb, D);
    case 6: return jtj_item_small<T, 6>(Jb, wb, Gb, D);
    default: return jtj_item_small<T, 7>(Jb, wb, Gb, D);
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
  if (d < kTile) {
#pragma omp parallel for schedule(static) if (B * D * d > (int64_t(1) << 16))
    for (int64_t b = 0; b < B; ++b) {
      jtj_item_small_dispatch(J + b * D * d, w ? w + b * w_batch_stride : nullptr, G + b * d * d, D, d);
    }
    return;
  }
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
