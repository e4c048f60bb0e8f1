// G = J^T diag(w) J for a batch of Jacobians, OpenMP-parallel over the batch.
//
// d >= 8: G is built in blocks of 8 rows x W columns (W = one or two SIMD vectors, common/simd.h) over its upper block
// triangle, each block a sum of rank-one updates over the D rows of J with its accumulators in vector registers: per
// row, one or two vector loads of w_r J[r, j0 : j0 + W], 8 broadcasts of J[r, i0 : i0 + 8] and 8 or 16 fused
// multiply-adds. Rows are read in place when d is a multiple of the block width, else from a zero-padded copy of the
// item. Mirrored at the end: G is exactly symmetric.
// Below d = 8 a block would be mostly padding (21x the work at d = 2), so there the d(d+1)/2 sums run in one pass over
// the rows, vectorised across rows.
#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"
#include "common/simd.h"

namespace pygeo {

namespace {

constexpr int64_t kTile = 8;  // rows of a G block (and the smallest d of the blocked path)

// Vectors per block row: two with 32 registers (AVX-512: 16 accumulators) when d fills them, else one (AVX2 and SSE
// have 16 registers; at d = 16 a second AVX-512 vector would be padding).
template <typename T, int Bytes>
int block_vectors(int64_t d) {
  return Bytes >= 64 && d >= 2 * Simd<T, Bytes>::lanes ? 2 : 1;
}

// The row length the blocked path reads: d rounded up to the block width and to kTile.
template <typename T, int Bytes>
int64_t padded_width(int64_t d) {
  const int64_t unit = std::max<int64_t>(block_vectors<T, Bytes>(d) * Simd<T, Bytes>::lanes, kTile);
  return (d + unit - 1) / unit * unit;
}

// One batch item: J [D, d], w [D] or nullptr, G [d, d]; scratch: sums [dpad, dpad] and, when d is not already a
// multiple of the block width, padded [D, dpad] (dpad = padded_width(d)). The rows go through in chunks that stay in
// L1 while every block passes over them, the blocks' sums kept in `sums` between chunks (the whole item, 200 KB at
// d = 64, would be re-read from L2 once per block).
template <typename T, int Bytes, int NV>
PYGEO_INLINE void jtj_item(const T* Jb, const T* wb, T* Gb, int64_t D, int64_t d, T* sums, T* padded) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int L = Simd<T, Bytes>::lanes;
  constexpr int64_t W = NV * L;
  const int64_t dpad = padded_width<T, Bytes>(d);
  const int64_t chunk = std::max<int64_t>(16, 8192 / static_cast<int64_t>(sizeof(T)) / dpad);  // rows: ~8 KB
  const T* rows = Jb;
  if (dpad != d) {
    for (int64_t r = 0; r < D; ++r) {
      std::copy(Jb + r * d, Jb + (r + 1) * d, padded + r * dpad);
      std::fill(padded + r * dpad + d, padded + (r + 1) * dpad, T(0));
    }
    rows = padded;
  }
  std::fill(sums, sums + dpad * dpad, T(0));
  for (int64_t r0 = 0; r0 < D; r0 += chunk) {
    const int64_t r1 = std::min(D, r0 + chunk);
    for (int64_t i0 = 0; i0 < d; i0 += kTile) {
      for (int64_t j0 = i0 / W * W; j0 < d; j0 += W) {
        V acc[kTile][NV];
        for (int a = 0; a < kTile; ++a)
          for (int v = 0; v < NV; ++v) __builtin_memcpy(&acc[a][v], sums + (i0 + a) * dpad + j0 + v * L, sizeof(V));
        for (int64_t r = r0; r < r1; ++r) {
          const T* row = rows + r * dpad;
          V cols[NV];
          for (int v = 0; v < NV; ++v) {
            V x;
            __builtin_memcpy(&x, row + j0 + v * L, sizeof(V));  // an unaligned vector load
            cols[v] = wb ? x * wb[r] : x;
          }
#pragma GCC unroll 8
          for (int a = 0; a < kTile; ++a) {
            const T left = row[i0 + a];
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) acc[a][v] += left * cols[v];
          }
        }
        for (int a = 0; a < kTile; ++a)
          for (int v = 0; v < NV; ++v) __builtin_memcpy(sums + (i0 + a) * dpad + j0 + v * L, &acc[a][v], sizeof(V));
      }
    }
  }
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = i; j < d; ++j) Gb[i * d + j] = Gb[j * d + i] = sums[i * dpad + j];
  }
}

template <typename T>
void jtj_item_16(const T* Jb, const T* wb, T* Gb, int64_t D, int64_t d, T* sums, T* padded) {
  jtj_item<T, 16, 1>(Jb, wb, Gb, D, d, sums, padded);
}
template <typename T>
PYGEO_TARGET_32 void jtj_item_32(const T* Jb, const T* wb, T* Gb, int64_t D, int64_t d, T* sums, T* padded) {
  jtj_item<T, 32, 1>(Jb, wb, Gb, D, d, sums, padded);
}
template <typename T>
PYGEO_TARGET_64 void jtj_item_64(const T* Jb, const T* wb, T* Gb, int64_t D, int64_t d, T* sums, T* padded) {
  if (block_vectors<T, 64>(d) == 2) return jtj_item<T, 64, 2>(Jb, wb, Gb, D, d, sums, padded);
  jtj_item<T, 64, 1>(Jb, wb, Gb, D, d, sums, padded);
}

// All items of a batch with Bytes-wide vectors, one OpenMP thread per item.
template <typename T, int Bytes>
void jtj_items(const T* J, const T* w, int64_t w_batch_stride, T* G, int64_t B, int64_t D, int64_t d,
               void (*item_fn)(const T*, const T*, T*, int64_t, int64_t, T*, T*)) {
  const int64_t dpad = padded_width<T, Bytes>(d);
  // Starting the thread team costs more than a small batch's work.
#pragma omp parallel if (B * D * dpad > (int64_t(1) << 16))
  {
    std::vector<T> sums(static_cast<size_t>(dpad * dpad));
    std::vector<T> padded(dpad == d ? 0 : static_cast<size_t>(D * dpad));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      item_fn(J + b * D * d, w ? w + b * w_batch_stride : nullptr, G + b * d * d, D, d, sums.data(), padded.data());
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
  if (d < kTile) {
#pragma omp parallel for schedule(static) if (B * D * d > (int64_t(1) << 16))
    for (int64_t b = 0; b < B; ++b) {
      jtj_item_small_dispatch(J + b * D * d, w ? w + b * w_batch_stride : nullptr, G + b * d * d, D, d);
    }
    return;
  }
  const int bytes = simd_bytes();
  if (bytes >= 64) return jtj_items<T, 64>(J, w, w_batch_stride, G, B, D, d, jtj_item_64<T>);
  if (bytes >= 32) return jtj_items<T, 32>(J, w, w_batch_stride, G, B, D, d, jtj_item_32<T>);
  jtj_items<T, 16>(J, w, w_batch_stride, G, B, D, d, jtj_item_16<T>);
}

template void jtj_cpu<float>(const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t);
template void jtj_cpu<double>(const double*, const double*, int64_t, double*, int64_t, int64_t, int64_t);

}  // namespace pygeo
