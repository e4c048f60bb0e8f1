// The Chadebec-Allassonniere latent metric (MATH.md 2), OpenMP-parallel over points, blocked over centroids.
//
//   G(z) = sum_i w_i M_i + lam exp(-tau |z|^2) I,   w_i = exp(e_i),  e_i = -(z - c_i)^T M_i (z - c_i) / rho^2
//
// Everything is accumulated in log space: each point keeps a running maximum s of the exponents (e_0 = -tau |z|^2 for
// the lam term, e_i for the centroids) and sums exp(e_i - s) M_i, rescaling its accumulators when s grows (the online
// softmax trick). Outputs are G_s = exp(-s) G, s and dG_s = exp(-s) dG, so far-away points never underflow to G = 0.
// Centroids and precisions are transposed once per call to [d][N] / [d*d][N], so the inner loops run over contiguous
// centroids and vectorise; exp is a polynomial written in plain arithmetic for the same reason.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"
#include "common/simd.h"

// The selects in exp_scaled and the max reductions are if-converted (hence vectorised) only when floating-point
// comparisons may be treated as non-trapping; nothing here reads the floating-point exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace pygeo {

namespace {

constexpr int kChunk = 8;  // centroids per chunk of the SIMD-tile path (G only)
constexpr int kGroup = 4;  // entries of G per register block of the SIMD-tile path
constexpr int64_t kBlock = 256;  // centroids per block: the block's scratch ([d][kBlock]) stays in L1/L2; fewer, longer dot products
// Below this many point-centroid-entry products a call runs on one thread: waking an OpenMP team costs more (samplers
// call with a few hundred points and few centroids, thousands of times).
constexpr int64_t kParallelWork = 1 << 16;

// The per-point loops are compiled for AVX2+FMA and for the baseline ISA, picked at load time (the build flags target
// the baseline only); helpers are force-inlined into both versions.
#if defined(__x86_64__) && defined(__GNUC__)
#define PYGEO_VECTOR_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define PYGEO_VECTOR_CLONES
#endif

// exp(x) for x <= ~700 (float: <= ~80) with about 1 ulp relative error; exactly 0 below the normal range (those
// weights are below 1e-300 (1e-37) relative to the largest one, which is 1). Cody-Waite reduction x = n ln2 + r,
// Taylor polynomial in r, 2^n built in the exponent bits: all plain arithmetic, so `omp simd` loops vectorise it.
PYGEO_INLINE double exp_scaled(double x) {
  const double lowest = -708.0;
  const double xc = x < lowest ? lowest : x;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer kept in the low bits
  const double shifted = xc * 1.4426950408889634 + magic;
  const double n = shifted - magic;
  const double r = (xc - n * 0.6931471803691238) - n * 1.9082149292705877e-10;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t shifted_bits, magic_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(double));
  std::memcpy(&magic_bits, &magic, sizeof(double));
  const int64_t power_bits = (shifted_bits - magic_bits + 1023) << 52;
  double power;
  std::memcpy(&power, &power_bits, sizeof(double));
  return x < lowest ? 0.0 : p * power;
}

PYGEO_INLINE float exp_scaled(float x) {
  const float lowest = -87.0f;
  const float xc = x < lowest ? lowest : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const float shifted = xc * 1.44269504f + magic;
  const float n = shifted - magic;
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t shifted_bits, magic_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(float));
  std::memcpy(&magic_bits, &magic, sizeof(float));
  const int32_t power_bits = (shifted_bits - magic_bits + 127) << 23;
  float power;
  std::memcpy(&power, &power_bits, sizeof(float));
  return x < lowest ? 0.0f : p * power;
}

// Centroids [N, d] -> [d][stride] and precisions [N, dd] -> [dd][stride] (dd = d diagonal, d*d full), with the
// centroid axis zero-padded to stride = N rounded up to kBlock, so vector loops may read whole blocks, plus 16 more
// elements so that rows are not a multiple of 4 KiB apart (rows read together would evict each other from L1).
inline int64_t padded(int64_t N) { return (N + kBlock - 1) / kBlock * kBlock + 16; }

// The rows of x [rows, cols] past the last whole chunk of kChunk rows, zero-padded to kChunk rows.
template <typename T>
std::vector<T> last_chunk(const T* x, int64_t rows, int64_t cols) {
  std::vector<T> out(static_cast<size_t>(kChunk * cols), T(0));
  const int64_t first = rows / kChunk * kChunk;
  std::copy(x + first * cols, x + rows * cols, out.begin());
  return out;
}

template <typename T>
std::vector<T> transpose(const T* x, int64_t rows, int64_t cols) {
  const int64_t stride = padded(rows);
  const int64_t out_rows = (cols + kGroup - 1) / kGroup * kGroup;  // zero rows up to whole groups of kGroup entries
  std::vector<T> out(static_cast<size_t>(stride * out_rows), T(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[c * stride + r] = x[r * cols + c];
  return out;
}

// Per-thread scratch: one block of centroids, and the point's accumulators.
template <typename T>
struct Scratch {
  std::vector<T> diff, y, e, w, wy;  // diff, y = M_i (z - c_i), wy = dw_i/dz: [d][kBlock]; e, w: [kBlock]
  std::vector<T> acc, dacc;          // [dd], [d * dd]
  Scratch(int64_t d, int64_t dd, bool derivative)
      : diff(d * kBlock), y(d * kBlock), e(kBlock), w(kBlock), wy(derivative ? d * kBlock : 0), acc(dd),
        dacc(derivative ? d * dd : 0) {}
};

// One call's inputs, with centroids [d][N] and precisions [dd][N] transposed (dd = d diagonal, d*d full).
template <typename T>
struct Problem {
  const T* z;
  const T* centroids;   // [N, d]
  const T* precisions;  // [N, d] or [N, d, d]
  std::vector<T> cT, PT;
  std::vector<T> tail_centroids, tail_precisions;  // the centroids past the last whole chunk, zero-padded to kChunk
  std::vector<int64_t> groups;  // first entries of the groups of kGroup entries of G the SIMD-tile path computes
  bool full;
  int64_t N, stride, d, dd;  // stride: row length of cT / PT (N padded to a multiple of kBlock)
  double lam, tau;
  T inv_rho2, derivative_factor;  // 1/rho^2 and -2/rho^2 (dw_i/dz = -(2/rho^2) w_i M_i (z - c_i))

  Problem(const T* z_, const T* centroids_, const T* precisions_, bool full_, double lam_, double tau_, double rho,
          int64_t N_, int64_t d_)
      : z(z_), centroids(centroids_), precisions(precisions_), cT(transpose(centroids_, N_, d_)),
        PT(transpose(precisions_, N_, full_ ? d_ * d_ : d_)), tail_centroids(last_chunk(centroids_, N_, d_)),
        tail_precisions(last_chunk(precisions_, N_, full_ ? d_ * d_ : d_)), full(full_),
        N(N_), stride(padded(N_)), d(d_), dd(full_ ? d_ * d_ : d_), lam(lam_), tau(tau_), inv_rho2(T(1.0 / (rho * rho))),
        derivative_factor(T(-2.0 / (rho * rho))) {
    for (int64_t e = 0; e < dd; e += kGroup) {  // full: the groups with an entry on or above the diagonal
      bool needed = !full;
      for (int64_t j = e; j < std::min(e + kGroup, dd); ++j) needed |= j / d <= j % d;
      if (needed) groups.push_back(e);
    }
  }
};

// Exponents e_t = -q_t / rho^2 and y[k][t] = (M_i (z - c_i))_k for centroids i0 .. i0 + nb of the point zb.
template <typename T>
PYGEO_INLINE void block_exponents(const Problem<T>& p, const T* zb, int64_t i0, int64_t nb, Scratch<T>& s) {
  const int64_t d = p.d;
  T* diff = s.diff.data();
  T* y = s.y.data();
  T* e = s.e.data();
  for (int64_t k = 0; k < d; ++k) {
    const T zk = zb[k];
    const T* ck = p.cT.data() + k * p.stride + i0;
#pragma omp simd
    for (int64_t t = 0; t < nb; ++t) diff[k * kBlock + t] = zk - ck[t];
  }
  std::fill(e, e + nb, T(0));
  for (int64_t k = 0; k < d; ++k) {
    T* yk = y + k * kBlock;
    const T* dk = diff + k * kBlock;
    if (p.full) {
      std::fill(yk, yk + nb, T(0));
      for (int64_t l = 0; l < d; ++l) {
        const T* Mkl = p.PT.data() + (k * d + l) * p.stride + i0;
        const T* dl = diff + l * kBlock;
#pragma omp simd
        for (int64_t t = 0; t < nb; ++t) yk[t] += Mkl[t] * dl[t];
      }
    } else {
      const T* mk = p.PT.data() + k * p.stride + i0;
#pragma omp simd
      for (int64_t t = 0; t < nb; ++t) yk[t] = mk[t] * dk[t];
    }
#pragma omp simd
    for (int64_t t = 0; t < nb; ++t) e[t] += yk[t] * dk[t];
  }
  const T inv_rho2 = p.inv_rho2;
#pragma omp simd
  for (int64_t t = 0; t < nb; ++t) e[t] = -e[t] * inv_rho2;
}

template <typename T>
PYGEO_INLINE T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) sum += a[t] * b[t];
  return sum;
}

// Accumulates point zb's G_s (upper triangle when full) and dG_s over all centroids into s.acc / s.dacc and returns
// its scale s (e0 = -tau |z|^2, the lam term's exponent).
template <typename T>
PYGEO_VECTOR_CLONES T forward_point(const Problem<T>& p, const T* zb, T e0, Scratch<T>& s) {
  const int64_t N = p.N, d = p.d, dd = p.dd;
  const bool derivative = !s.dacc.empty();
  T running = p.lam > 0 ? e0 : -std::numeric_limits<T>::infinity();
  std::fill(s.acc.begin(), s.acc.end(), T(0));
  std::fill(s.dacc.begin(), s.dacc.end(), T(0));
  T* w = s.w.data();
  for (int64_t i0 = 0; i0 < N; i0 += kBlock) {
    const int64_t nb = std::min(kBlock, N - i0);
    block_exponents(p, zb, i0, nb, s);
    const T* e = s.e.data();
    T block_max = e[0];
#pragma omp simd reduction(max : block_max)
    for (int64_t t = 1; t < nb; ++t) block_max = block_max > e[t] ? block_max : e[t];
    if (block_max > running) {  // rescale what was summed under the old maximum
      const T factor = std::exp(running - block_max);
      for (auto& a : s.acc) a *= factor;
      for (auto& a : s.dacc) a *= factor;
      running = block_max;
    }
#pragma omp simd
    for (int64_t t = 0; t < nb; ++t) w[t] = exp_scaled(e[t] - running);
    for (int64_t j = 0; j < d; ++j) {
      for (int64_t l = p.full ? j : 0; l < (p.full ? d : 1); ++l) {  // full: upper triangle, mirrored by the caller
        const int64_t jl = p.full ? j * d + l : j;
        s.acc[jl] += dot(w, p.PT.data() + jl * p.stride + i0, nb);
      }
    }
    if (derivative) {
      for (int64_t k = 0; k < d; ++k) {
        const T* yk = s.y.data() + k * kBlock;
        T* wyk = s.wy.data() + k * kBlock;
        const T factor = p.derivative_factor;
#pragma omp simd
        for (int64_t t = 0; t < nb; ++t) wyk[t] = factor * w[t] * yk[t];
        for (int64_t j = 0; j < d; ++j) {
          for (int64_t l = p.full ? j : 0; l < (p.full ? d : 1); ++l) {
            const int64_t jl = p.full ? j * d + l : j;
            s.dacc[k * dd + jl] += dot(wyk, p.PT.data() + jl * p.stride + i0, nb);
          }
        }
      }
    }
  }
  return running;
}

// G only (the metric alone, and the first pass of log_volume): SIMD tiles of points (common/simd.h), each point in
// one lane of every vector. The tile goes through the centroids in chunks of kChunk: the exponents of the chunk, one
// running-maximum update per chunk (rescaling the tile's sums where it grows), then the chunk's weighted precisions
// added entry by entry with the chunk's weights held in registers.

template <typename T, int Bytes>
struct TileScratch {
  using V = typename Simd<T, Bytes>::V;
  explicit TileScratch(int64_t d, int64_t dd) : z(d), acc((dd + kGroup - 1) / kGroup * kGroup) {}
  VectorArray<V> z;    // [d]: the tile's points
  VectorArray<V> acc;  // [dd padded to kGroup]: sum_i exp(e_i - running) M_i (full: upper triangle)
};

// The exponents -(z - c_i)^T M_i (z - c_i) / rho^2 of the chunk's centroids (C [kChunk, d], M [kChunk, dd], rows as
// stored) for every point of the tile, the chunk's centroids side by side: kChunk independent sums, each z_k loaded once
// per chunk. Full M_i over the upper triangle: q = sum_k 2 d_k (M_kk d_k / 2 + sum_{l>k} M_kl d_l).
template <typename T, int Bytes>
PYGEO_INLINE void chunk_exponents(const Problem<T>& p, const TileScratch<T, Bytes>& s, const T* C, const T* M,
                                  typename Simd<T, Bytes>::V* e) {
  using V = typename Simd<T, Bytes>::V;
  const int64_t d = p.d;
  V q[kChunk];
  for (int c = 0; c < kChunk; ++c) q[c] = V{} + T(0);
  for (int64_t k = 0; k < d; ++k) {
    const V zk = s.z[k];
    if (!p.full) {
#pragma GCC unroll 8
      for (int c = 0; c < kChunk; ++c) {
        const V dk = zk - C[c * d + k];
        q[c] += M[c * d + k] * (dk * dk);
      }
      continue;
    }
    V dk[kChunk], half[kChunk];  // d_k, and M_kk d_k / 2 + sum_{l>k} M_kl d_l
#pragma GCC unroll 8
    for (int c = 0; c < kChunk; ++c) {
      dk[c] = zk - C[c * d + k];
      half[c] = (T(0.5) * M[(c * d + k) * d + k]) * dk[c];
    }
    for (int64_t l = k + 1; l < d; ++l) {
      const V zl = s.z[l];
#pragma GCC unroll 8
      for (int c = 0; c < kChunk; ++c) half[c] += M[(c * d + k) * d + l] * (zl - C[c * d + l]);
    }
#pragma GCC unroll 8
    for (int c = 0; c < kChunk; ++c) q[c] += dk[c] * (half[c] + half[c]);
  }
  for (int c = 0; c < kChunk; ++c) e[c] = q[c] * (-p.inv_rho2);
}

// One tile: writes G_s (exactly symmetric) and scale for its points.
template <typename T, int Bytes>
PYGEO_INLINE void forward_tile(const Problem<T>& p, TileScratch<T, Bytes>& s, int64_t tile, int64_t B, T* G_s,
                               T* scale) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int L = Simd<T, Bytes>::lanes;
  const int64_t d = p.d, dd = p.dd, N = p.N;
  const int64_t b0 = tile * L;
  const int count = static_cast<int>(std::min<int64_t>(L, B - b0));
  for (int64_t k = 0; k < d; ++k) {
    for (int l = 0; l < L; ++l) s.z[k][l] = p.z[(b0 + (l < count ? l : 0)) * d + k];  // padding lanes repeat point 0
  }
  V norm2 = V{} + T(0);
  for (int64_t k = 0; k < d; ++k) norm2 += s.z[k] * s.z[k];
  const V e0 = norm2 * T(-p.tau);  // the lam term's exponent
  V running = p.lam > 0 ? e0 : V{} - std::numeric_limits<T>::infinity();
  s.acc.fill(V{} + T(0));
  for (int64_t i0 = 0; i0 < N; i0 += kChunk) {
    const int chunk = static_cast<int>(std::min<int64_t>(kChunk, N - i0));
    V w[kChunk];  // exponents, then weights
    const bool whole = i0 + kChunk <= N;  // the last chunk reads a zero-padded copy of its centroids
    chunk_exponents(p, s, whole ? p.centroids + i0 * d : p.tail_centroids.data(),
                    whole ? p.precisions + i0 * dd : p.tail_precisions.data(), w);
    V chunk_max = V{} - std::numeric_limits<T>::infinity();
    for (int c = 0; c < kChunk; ++c) {
      if (c >= chunk) w[c] = V{} - std::numeric_limits<T>::infinity();  // padding: weight 0
      chunk_max = w[c] > chunk_max ? w[c] : chunk_max;
    }
    bool grew = false;
    for (int l = 0; l < L; ++l) grew |= chunk_max[l] > running[l];
    if (grew) {
      const V new_max = chunk_max > running ? chunk_max : running;
      s.acc.scale(exp_weight<T, Bytes>(running - new_max));  // exp(-inf) = 0 where nothing was summed yet
      running = new_max;
    }
    for (int c = 0; c < kChunk; ++c) w[c] = exp_weight<T, Bytes>(w[c] - running);
    // acc[e] += sum_c w_c M_{i0+c}[e], kGroup entries at a time, from the transposed precisions ([dd][N]: the chunk's
    // values of an entry side by side; the zero rows and columns of its padding meet zero weights or unread entries).
    for (const int64_t e : p.groups) {
      V a[kGroup];
      for (int j = 0; j < kGroup; ++j) a[j] = s.acc[e + j];
      const T* M = p.PT.data() + e * p.stride + i0;
      for (int c = 0; c < kChunk; ++c) {
#pragma GCC unroll 4
        for (int j = 0; j < kGroup; ++j) a[j] += w[c] * M[j * p.stride + c];
      }
      for (int j = 0; j < kGroup; ++j) s.acc[e + j] = a[j];
    }
  }
  const V prior = T(p.lam) * exp_weight<T, Bytes>(e0 - running);  // lam exp(-tau |z|^2) under the final scale
  for (int l = 0; l < count; ++l) {
    const int64_t b = b0 + l;
    scale[b] = running[l];
    T* Gb = G_s + b * dd;
    for (int64_t j = 0; j < d; ++j) {
      if (p.full) {
        for (int64_t k = j; k < d; ++k) Gb[j * d + k] = Gb[k * d + j] = s.acc[j * d + k][l] + (j == k ? prior[l] : T(0));
      } else {
        Gb[j] = s.acc[j][l] + prior[l];
      }
    }
  }
}

template <typename T>
void forward_tile_16(const Problem<T>& p, TileScratch<T, 16>& s, int64_t tile, int64_t B, T* G_s, T* scale) {
  forward_tile<T, 16>(p, s, tile, B, G_s, scale);
}
template <typename T>
PYGEO_TARGET_32 void forward_tile_32(const Problem<T>& p, TileScratch<T, 32>& s, int64_t tile, int64_t B, T* G_s,
                                     T* scale) {
  forward_tile<T, 32>(p, s, tile, B, G_s, scale);
}
template <typename T>
PYGEO_TARGET_64 void forward_tile_64(const Problem<T>& p, TileScratch<T, 64>& s, int64_t tile, int64_t B, T* G_s,
                                     T* scale) {
  forward_tile<T, 64>(p, s, tile, B, G_s, scale);
}

template <typename T, int Bytes>
void forward_tiles(const Problem<T>& p, T* G_s, T* scale, int64_t B,
                   void (*tile_fn)(const Problem<T>&, TileScratch<T, Bytes>&, int64_t, int64_t, T*, T*)) {
  const int64_t n_tiles = (B + Simd<T, Bytes>::lanes - 1) / Simd<T, Bytes>::lanes;
#pragma omp parallel if (B * p.N * p.dd >= kParallelWork)
  {
    TileScratch<T, Bytes> s(p.d, p.dd);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < n_tiles; ++tile) tile_fn(p, s, tile, B, G_s, scale);
  }
}

template <typename T>
void forward_metric_only(const Problem<T>& p, T* G_s, T* scale, int64_t B) {
  const int bytes = simd_bytes();
  if (bytes >= 64) return forward_tiles<T, 64>(p, G_s, scale, B, forward_tile_64<T>);
  if (bytes >= 32) return forward_tiles<T, 32>(p, G_s, scale, B, forward_tile_32<T>);
  forward_tiles<T, 16>(p, G_s, scale, B, forward_tile_16<T>);
}

// The backward pass on SIMD tiles of points, as the G-only path:
//   v[k] = sum_i exp(e_i - s) <A, M_i> (-2/rho^2) (M_i (z - c_i))_k
// with s the forward's scale, so no running maximum is needed.
template <typename T, int Bytes>
struct VjpScratch {
  using V = typename Simd<T, Bytes>::V;
  VjpScratch(int64_t d, int64_t dd) : z(d), A(dd), y(kChunk * d), v(d) {}
  VectorArray<V> z;  // [d]: the tile's points
  VectorArray<V> A;  // [dd]: A's entries, full: A_kk on the diagonal and A_kl + A_lk above it (M_i is symmetric)
  VectorArray<V> y;  // [kChunk, d]: M_c (z - c_c) for the chunk's centroids
  VectorArray<V> v;  // [d]: the result
};

// y_c = M_c (z - c_c) and the exponents -(z - c_c)^T y_c / rho^2 of the chunk's centroids (C [kChunk, d],
// M [kChunk, dd] as stored), the chunk's centroids side by side as in chunk_exponents.
template <typename T, int Bytes>
PYGEO_INLINE void chunk_projections(const Problem<T>& p, VjpScratch<T, Bytes>& s, const T* C, const T* M,
                                    typename Simd<T, Bytes>::V* e) {
  using V = typename Simd<T, Bytes>::V;
  const int64_t d = p.d;
  V q[kChunk];
  for (int c = 0; c < kChunk; ++c) q[c] = V{} + T(0);
  for (int64_t k = 0; k < d; ++k) {
    const V zk = s.z[k];
    V yk[kChunk];
    if (p.full) {
      for (int c = 0; c < kChunk; ++c) yk[c] = V{} + T(0);
      for (int64_t l = 0; l < d; ++l) {
        const V zl = s.z[l];
#pragma GCC unroll 8
        for (int c = 0; c < kChunk; ++c) yk[c] += M[(c * d + k) * d + l] * (zl - C[c * d + l]);
      }
    } else {
#pragma GCC unroll 8
      for (int c = 0; c < kChunk; ++c) yk[c] = M[c * d + k] * (zk - C[c * d + k]);
    }
#pragma GCC unroll 8
    for (int c = 0; c < kChunk; ++c) {
      s.y[c * d + k] = yk[c];
      q[c] += (zk - C[c * d + k]) * yk[c];
    }
  }
  for (int c = 0; c < kChunk; ++c) e[c] = q[c] * (-p.inv_rho2);
}

template <typename T, int Bytes>
PYGEO_INLINE void vjp_tile(const Problem<T>& p, VjpScratch<T, Bytes>& s, int64_t tile, int64_t B, const T* A,
                           const T* scale, T* v) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int L = Simd<T, Bytes>::lanes;
  const int64_t d = p.d, dd = p.dd, N = p.N;
  const int64_t b0 = tile * L;
  const int count = static_cast<int>(std::min<int64_t>(L, B - b0));
  V s_tile, trace = V{} + T(0);
  for (int l = 0; l < L; ++l) {
    const int64_t b = b0 + (l < count ? l : 0);  // padding lanes repeat point 0
    s_tile[l] = scale[b];
    for (int64_t k = 0; k < d; ++k) s.z[k][l] = p.z[b * d + k];
    const T* Ab = A + b * dd;
    for (int64_t k = 0; k < d; ++k) {
      if (!p.full) {
        s.A[k][l] = Ab[k];
        continue;
      }
      for (int64_t j = k; j < d; ++j) s.A[k * d + j][l] = j == k ? Ab[k * d + k] : Ab[k * d + j] + Ab[j * d + k];
    }
  }
  for (int64_t k = 0; k < d; ++k) {
    s.v[k] = V{} + T(0);
    trace += s.A[p.full ? k * d + k : k];
  }
  for (int64_t i0 = 0; i0 < N; i0 += kChunk) {
    const int chunk = static_cast<int>(std::min<int64_t>(kChunk, N - i0));
    const bool whole = i0 + kChunk <= N;
    const T* C = whole ? p.centroids + i0 * d : p.tail_centroids.data();
    const T* M = whole ? p.precisions + i0 * dd : p.tail_precisions.data();
    V coef[kChunk], inner[kChunk];  // exponents, then coefficients; <A, M_c>
    chunk_projections(p, s, C, M, coef);
    for (int c = 0; c < kChunk; ++c) inner[c] = V{} + T(0);
    for (int64_t k = 0; k < d; ++k) {
      for (int64_t j = p.full ? k : 0; j < (p.full ? d : 1); ++j) {
        const int64_t e = p.full ? k * d + j : k;
        const V a = s.A[e];
#pragma GCC unroll 8
        for (int c = 0; c < kChunk; ++c) inner[c] += a * M[c * dd + e];
      }
    }
    for (int c = 0; c < kChunk; ++c) {
      const V w = c < chunk ? exp_weight<T, Bytes>(coef[c] - s_tile) : V{} + T(0);
      coef[c] = (w * inner[c]) * p.derivative_factor;
    }
    for (int64_t k = 0; k < d; ++k) {
      V sum = s.v[k];
#pragma GCC unroll 8
      for (int c = 0; c < kChunk; ++c) sum += coef[c] * s.y[c * d + k];
      s.v[k] = sum;
    }
  }
  // The lam term lam exp(-tau |z|^2) I under the scale: its derivative is -2 tau z_k lam exp(e0 - s) tr(A).
  V norm2 = V{} + T(0);
  for (int64_t k = 0; k < d; ++k) norm2 += s.z[k] * s.z[k];
  const V prior = T(p.lam) * exp_weight<T, Bytes>(norm2 * T(-p.tau) - s_tile);
  for (int l = 0; l < count; ++l) {
    for (int64_t k = 0; k < d; ++k) v[(b0 + l) * d + k] = s.v[k][l] + T(-2.0 * p.tau) * prior[l] * trace[l] * s.z[k][l];
  }
}

template <typename T>
void vjp_tile_16(const Problem<T>& p, VjpScratch<T, 16>& s, int64_t tile, int64_t B, const T* A, const T* scale,
                 T* v) {
  vjp_tile<T, 16>(p, s, tile, B, A, scale, v);
}
template <typename T>
PYGEO_TARGET_32 void vjp_tile_32(const Problem<T>& p, VjpScratch<T, 32>& s, int64_t tile, int64_t B, const T* A,
                                 const T* scale, T* v) {
  vjp_tile<T, 32>(p, s, tile, B, A, scale, v);
}
template <typename T>
PYGEO_TARGET_64 void vjp_tile_64(const Problem<T>& p, VjpScratch<T, 64>& s, int64_t tile, int64_t B, const T* A,
                                 const T* scale, T* v) {
  vjp_tile<T, 64>(p, s, tile, B, A, scale, v);
}

template <typename T, int Bytes>
void vjp_tiles(const Problem<T>& p, const T* A, const T* scale, T* v, int64_t B,
               void (*tile_fn)(const Problem<T>&, VjpScratch<T, Bytes>&, int64_t, int64_t, const T*, const T*, T*)) {
  const int64_t n_tiles = (B + Simd<T, Bytes>::lanes - 1) / Simd<T, Bytes>::lanes;
#pragma omp parallel if (B * p.N * p.dd >= kParallelWork)
  {
    VjpScratch<T, Bytes> s(p.d, p.dd);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < n_tiles; ++tile) tile_fn(p, s, tile, B, A, scale, v);
  }
}

void check_sizes(int64_t B, int64_t N, int64_t d, double rho) {
  check_nonnegative(B, "B");
  check_positive(N, "N");
  check_positive(d, "d");
  PYGEO_CHECK(rho > 0, "rho must be positive");
}

}  // namespace

// z: [B, d]; centroids: [N, d]; precisions: [N, d] (full = false) or [N, d, d] (full = true).
// Outputs: G_s [B, d] (diagonal) or [B, d, d]; scale [B]; dG_s (nullptr = not wanted) [B, d, d] with
// dG_s[b, k, j] = d G_jj / d z_k (diagonal) or [B, d, d, d] with dG_s[b, k, i, j] = d G_ij / d z_k; all times exp(-scale).
template <typename T>
void latent_metric_forward_cpu(const T* z, const T* centroids, const T* precisions, bool full, double lam, double tau,
                               double rho, T* G_s, T* scale, T* dG_s, int64_t B, int64_t N, int64_t d) {
  check_sizes(B, N, d, rho);
  const Problem<T> p(z, centroids, precisions, full, lam, tau, rho, N, d);
  const int64_t dd = p.dd;
  if (!dG_s) {
    forward_metric_only(p, G_s, scale, B);
    return;
  }
#pragma omp parallel if (B * N * dd >= kParallelWork)
  {
    Scratch<T> s(d, dd, dG_s != nullptr);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* zb = z + b * d;
      T norm2 = 0;
      for (int64_t k = 0; k < d; ++k) norm2 += zb[k] * zb[k];
      const T e0 = T(-tau) * norm2;
      const T running = forward_point(p, zb, e0, s);
      // The lam term under the final scale: lam exp(e0 - s) I, and its derivative -2 tau z_k lam exp(e0 - s) I.
      const T prior = lam > 0 ? T(lam) * std::exp(e0 - running) : T(0);
      scale[b] = running;
      T* Gb = G_s + b * dd;
      for (int64_t j = 0; j < d; ++j) {
        if (full) {
          for (int64_t l = j; l < d; ++l) Gb[j * d + l] = Gb[l * d + j] = s.acc[j * d + l] + (j == l ? prior : T(0));
        } else {
          Gb[j] = s.acc[j] + prior;
        }
      }
      if (dG_s) {
        T* dGb = dG_s + b * d * dd;
        for (int64_t k = 0; k < d; ++k) {
          const T prior_k = T(-2.0 * tau) * zb[k] * prior;
          for (int64_t j = 0; j < d; ++j) {
            if (full) {
              for (int64_t l = j; l < d; ++l) {
                const T value = s.dacc[k * dd + j * d + l] + (j == l ? prior_k : T(0));
                dGb[k * dd + j * d + l] = dGb[k * dd + l * d + j] = value;
              }
            } else {
              dGb[k * d + j] = s.dacc[k * d + j] + prior_k;
            }
          }
        }
      }
    }
  }
}

// v[b, k] = sum_ij A[b, i, j] dG_s[b, k, i, j] with weights exp(e_i - scale[b]) (the backward of G when scale = 0 and
// A = dL/dG; the gradient of 1/2 log det G when A = G_s^-1 / 2 and scale is the forward's). A: [B, d] (diagonal
// precisions: A's diagonal) or [B, d, d]; v: [B, d].
template <typename T>
void latent_metric_vjp_cpu(const T* z, const T* centroids, const T* precisions, bool full, double lam, double tau,
                           double rho, const T* A, const T* scale, T* v, int64_t B, int64_t N, int64_t d) {
  check_sizes(B, N, d, rho);
  const Problem<T> p(z, centroids, precisions, full, lam, tau, rho, N, d);
  const int bytes = simd_bytes();
  if (bytes >= 64) return vjp_tiles<T, 64>(p, A, scale, v, B, vjp_tile_64<T>);
  if (bytes >= 32) return vjp_tiles<T, 32>(p, A, scale, v, B, vjp_tile_32<T>);
  vjp_tiles<T, 16>(p, A, scale, v, B, vjp_tile_16<T>);
}

template void latent_metric_forward_cpu<float>(const float*, const float*, const float*, bool, double, double, double,
                                               float*, float*, float*, int64_t, int64_t, int64_t);
template void latent_metric_forward_cpu<double>(const double*, const double*, const double*, bool, double, double,
                                                double, double*, double*, double*, int64_t, int64_t, int64_t);
template void latent_metric_vjp_cpu<float>(const float*, const float*, const float*, bool, double, double, double,
                                           const float*, const float*, float*, int64_t, int64_t, int64_t);
template void latent_metric_vjp_cpu<double>(const double*, const double*, const double*, bool, double, double, double,
                                            const double*, const double*, double*, int64_t, int64_t, int64_t);

}  // namespace pygeo
