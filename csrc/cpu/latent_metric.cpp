// The Chadebec-Allassonniere latent metric (MATH.md 2), OpenMP-parallel over SIMD tiles of points.
//
//   G(z) = sum_i w_i M_i + lam exp(-tau |z|^2) I,   w_i = exp(e_i),  e_i = -(z - c_i)^T M_i (z - c_i) / rho^2
//   dG[k] = sum_i (-2/rho^2) w_i (M_i (z - c_i))_k M_i - 2 lam tau z_k exp(-tau |z|^2) I
//
// Everything is accumulated in log space: each point keeps a running maximum s of the exponents (e_0 = -tau |z|^2 for
// the lam term, e_i for the centroids) and sums exp(e_i - s) M_i, rescaling its accumulators when s grows (the online
// softmax trick). Outputs are G_s = exp(-s) G, s and dG_s = exp(-s) dG, so far-away points never underflow to G = 0.
//
// Layout (common/simd.h): a tile is one SIMD vector of points, each point in one lane of every vector. A tile goes
// through the centroids in chunks of kChunk, the chunk's centroids side by side (kChunk independent sums, each z_k
// loaded once per chunk): the chunk's exponents, one running-maximum update per chunk, then the chunk's weighted
// precisions added kGroup entries at a time with the chunk's weights in registers. The precisions are transposed once
// per call to [dd][N] (dd = d diagonal, d * d full) for that last step, where one entry's values for the chunk's
// centroids lie side by side.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/simd.h"

namespace pygeo {

namespace {

constexpr int kChunk = 8;  // centroids per chunk
constexpr int kGroup = 4;  // entries of G per register block
// Below this many point-centroid-entry products a call runs on one thread: waking an OpenMP team costs more (samplers
// call with a few hundred points and few centroids, thousands of times).
constexpr int64_t kParallelWork = 1 << 16;

// The rows of x [rows, cols] past the last whole chunk of kChunk rows, zero-padded to kChunk rows.
template <typename T>
std::vector<T> last_chunk(const T* x, int64_t rows, int64_t cols) {
  std::vector<T> out(static_cast<size_t>(kChunk * cols), T(0));
  const int64_t first = rows / kChunk * kChunk;
  std::copy(x + first * cols, x + rows * cols, out.begin());
  return out;
}

// Row length of the transposed precisions: N rounded up to a multiple of 256 (so of kChunk), plus 16, so that rows
// read together are never a multiple of 4 KiB apart (they would evict each other from L1).
inline int64_t padded(int64_t N) { return (N + 255) / 256 * 256 + 16; }

// x [rows, cols] -> [cols rounded up to kGroup][padded(rows)], zero-padded.
template <typename T>
std::vector<T> transpose(const T* x, int64_t rows, int64_t cols) {
  const int64_t stride = padded(rows);
  const int64_t out_rows = (cols + kGroup - 1) / kGroup * kGroup;
  std::vector<T> out(static_cast<size_t>(stride * out_rows), T(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[c * stride + r] = x[r * cols + c];
  return out;
}

// One call's inputs.
template <typename T>
struct Problem {
  const T* z;           // [B, d]
  const T* centroids;   // [N, d]
  const T* precisions;  // [N, dd]
  std::vector<T> PT;    // [dd padded to kGroup][stride]: the precisions transposed
  std::vector<T> tail_centroids, tail_precisions;  // the centroids past the last whole chunk, zero-padded to kChunk
  std::vector<int64_t> groups;  // first entries of the groups of kGroup entries of G that are computed
  bool full;
  int64_t N, stride, d, dd, dd_padded;
  double lam, tau;
  T inv_rho2, derivative_factor;  // 1/rho^2 and -2/rho^2 (dw_i/dz = -(2/rho^2) w_i M_i (z - c_i))

  Problem(const T* z_, const T* centroids_, const T* precisions_, bool full_, double lam_, double tau_, double rho,
          int64_t N_, int64_t d_)
      : z(z_), centroids(centroids_), precisions(precisions_),
        PT(transpose(precisions_, N_, full_ ? d_ * d_ : d_)), tail_centroids(last_chunk(centroids_, N_, d_)),
        tail_precisions(last_chunk(precisions_, N_, full_ ? d_ * d_ : d_)), full(full_), N(N_), stride(padded(N_)),
        d(d_), dd(full_ ? d_ * d_ : d_), dd_padded((dd + kGroup - 1) / kGroup * kGroup), lam(lam_), tau(tau_),
        inv_rho2(T(1.0 / (rho * rho))), derivative_factor(T(-2.0 / (rho * rho))) {
    for (int64_t e = 0; e < dd; e += kGroup) {  // full: the groups with an entry on or above the diagonal
      bool needed = !full;
      for (int64_t j = e; j < std::min(e + kGroup, dd); ++j) needed |= j / d <= j % d;
      if (needed) groups.push_back(e);
    }
  }

  // The chunk starting at centroid i0: its centroids [kChunk, d] and precisions [kChunk, dd], as stored.
  const T* chunk_centroids(int64_t i0) const { return i0 + kChunk <= N ? centroids + i0 * d : tail_centroids.data(); }
  const T* chunk_precisions(int64_t i0) const { return i0 + kChunk <= N ? precisions + i0 * dd : tail_precisions.data(); }
};

// Per-thread state of one tile.
template <typename T, int Bytes>
struct TileScratch {
  using V = typename Simd<T, Bytes>::V;
  TileScratch(const Problem<T>& p, bool derivative, bool vjp)
      : z(p.d), acc(p.dd_padded), dacc(derivative ? p.d * p.dd_padded : 0),
        y(derivative || vjp ? kChunk * p.d : 0), A(vjp ? p.dd : 0), v(vjp ? p.d : 0) {}
  VectorArray<V> z;     // [d]: the tile's points
  VectorArray<V> acc;   // [dd_padded]: sum_i exp(e_i - s) M_i (full: upper triangle)
  VectorArray<V> dacc;  // [d, dd_padded]: sum_i exp(e_i - s) (-2/rho^2) (M_i (z - c_i))_k M_i
  VectorArray<V> y;     // [kChunk, d]: M_c (z - c_c) for the chunk's centroids
  VectorArray<V> A;     // [dd] (backward): A's entries; full: A_kk on the diagonal, A_kl + A_lk above it
  VectorArray<V> v;     // [d] (backward): the result

  // Loads points b0 .. b0 + count of z [B, d] into the lanes (padding lanes repeat the first point).
  PYGEO_INLINE void load_points(const Problem<T>& p, int64_t b0, int count) {
    for (int l = 0; l < Simd<T, Bytes>::lanes; ++l) {
      for (int64_t k = 0; k < p.d; ++k) z[k][l] = p.z[(b0 + (l < count ? l : 0)) * p.d + k];
    }
  }
};

// The exponents -(z - c_c)^T M_c (z - c_c) / rho^2 of the chunk's centroids (C [kChunk, d], M [kChunk, dd]). Full
// M_c over the upper triangle: q = sum_k 2 d_k (M_kk d_k / 2 + sum_{l>k} M_kl d_l).
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
        q[c] += dk * (M[c * d + k] * dk);  // as chunk_projections rounds it: d_k y_k with y_k = M_kk d_k
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

// The exponents of chunk_exponents, to the bit, and y_c = M_c (z - c_c) over whole rows, which it leaves in s.y.
// Bitwise the same exponents in every pass: the vjp weighs by exp(e_i - s) with s from the forward, and an exponent
// rounded differently (an absolute error ~|e| eps, 1e24 at |e| = 1e40) would scale its weight by exp of that (the
// log-volume gradient came out inf far from the centroids, and 3% off in float32 at |e| ~ 5e5).
template <typename T, int Bytes>
PYGEO_INLINE void chunk_projections(const Problem<T>& p, TileScratch<T, Bytes>& s, const T* C, const T* M,
                                    typename Simd<T, Bytes>::V* e) {
  using V = typename Simd<T, Bytes>::V;
  const int64_t d = p.d;
  if (p.full) chunk_exponents<T, Bytes>(p, s, C, M, e);  // the diagonal case rounds q below exactly as it does
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
  if (!p.full) {
    for (int c = 0; c < kChunk; ++c) e[c] = q[c] * (-p.inv_rho2);
  }
}

// acc[e] += sum_c w_c M_{i0+c}[e] over the computed groups of entries, from the transposed precisions (the chunk's
// values of an entry side by side; their zero padding meets zero weights or entries that are never read).
template <typename T, int Bytes>
PYGEO_INLINE void add_weighted(const Problem<T>& p, int64_t i0, const typename Simd<T, Bytes>::V* w,
                               typename Simd<T, Bytes>::V* acc) {
  using V = typename Simd<T, Bytes>::V;
  for (const int64_t e : p.groups) {
    V a[kGroup];
    for (int j = 0; j < kGroup; ++j) a[j] = acc[e + j];
    const T* M = p.PT.data() + e * p.stride + i0;
    for (int c = 0; c < kChunk; ++c) {
#pragma GCC unroll 4
      for (int j = 0; j < kGroup; ++j) a[j] += w[c] * M[j * p.stride + c];
    }
    for (int j = 0; j < kGroup; ++j) acc[e + j] = a[j];
  }
}

// The forward pass for one tile: G_s (exactly symmetric), scale and, if dG_s is not null, dG_s.
template <typename T, int Bytes>
PYGEO_INLINE void forward_tile(const Problem<T>& p, TileScratch<T, Bytes>& s, int64_t tile, int64_t B, T* G_s,
                               T* scale, T* dG_s) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int L = Simd<T, Bytes>::lanes;
  const int64_t d = p.d, dd = p.dd, ddp = p.dd_padded, N = p.N;
  const bool derivative = dG_s != nullptr;
  const int64_t b0 = tile * L;
  const int count = static_cast<int>(std::min<int64_t>(L, B - b0));
  s.load_points(p, b0, count);
  V norm2 = V{} + T(0);
  for (int64_t k = 0; k < d; ++k) norm2 += s.z[k] * s.z[k];
  const V e0 = norm2 * T(-p.tau);  // the lam term's exponent
  V running = p.lam > 0 ? e0 : V{} - std::numeric_limits<T>::infinity();
  s.acc.fill(V{} + T(0));
  s.dacc.fill(V{} + T(0));
  for (int64_t i0 = 0; i0 < N; i0 += kChunk) {
    const int chunk = static_cast<int>(std::min<int64_t>(kChunk, N - i0));
    V w[kChunk];  // exponents, then weights
    if (derivative) {
      chunk_projections(p, s, p.chunk_centroids(i0), p.chunk_precisions(i0), w);
    } else {
      chunk_exponents(p, s, p.chunk_centroids(i0), p.chunk_precisions(i0), w);
    }
    V chunk_max = V{} - std::numeric_limits<T>::infinity();
    for (int c = 0; c < kChunk; ++c) {
      if (c >= chunk) w[c] = V{} - std::numeric_limits<T>::infinity();  // padding: weight 0
      chunk_max = w[c] > chunk_max ? w[c] : chunk_max;
    }
    bool grew = false;
    for (int l = 0; l < L; ++l) grew |= chunk_max[l] > running[l];
    if (grew) {
      const V new_max = chunk_max > running ? chunk_max : running;
      const V factor = exp_weight<T, Bytes>(running - new_max);  // exp(-inf) = 0 where nothing was summed yet
      s.acc.scale(factor);
      s.dacc.scale(factor);
      running = new_max;
    }
    for (int c = 0; c < kChunk; ++c) w[c] = exp_weight<T, Bytes>(w[c] - running);
    add_weighted<T, Bytes>(p, i0, w, s.acc.data());
    for (int64_t k = 0; derivative && k < d; ++k) {
      V wy[kChunk];  // dw_c / dz_k under the scale
      for (int c = 0; c < kChunk; ++c) wy[c] = (w[c] * s.y[c * d + k]) * p.derivative_factor;
      add_weighted<T, Bytes>(p, i0, wy, s.dacc.data() + k * ddp);
    }
  }
  // The lam term under the final scale, lam exp(e0 - s) I, and its derivative -2 tau z_k lam exp(e0 - s) I. With
  // lam = 0 the running maximum never saw e0, so e0 - s can exceed exp's range (exp_weight is then inf or garbage and
  // 0 * inf = NaN): the term is exactly zero, so it is not evaluated at all.
  const V prior = p.lam > 0 ? T(p.lam) * exp_weight<T, Bytes>(e0 - running) : V{} + T(0);
  for (int l = 0; l < count; ++l) {
    const int64_t b = b0 + l;
    scale[b] = running[l];
    T* Gb = G_s + b * dd;
    for (int64_t j = 0; j < d; ++j) {
      if (!p.full) {
        Gb[j] = s.acc[j][l] + prior[l];
        continue;
      }
      for (int64_t k = j; k < d; ++k) Gb[j * d + k] = Gb[k * d + j] = s.acc[j * d + k][l] + (j == k ? prior[l] : T(0));
    }
    for (int64_t k = 0; derivative && k < d; ++k) {
      const T prior_k = T(-2.0 * p.tau) * s.z[k][l] * prior[l];
      const auto& dk = s.dacc;
      T* dGbk = dG_s + (b * d + k) * dd;
      for (int64_t j = 0; j < d; ++j) {
        if (!p.full) {
          dGbk[j] = dk[k * ddp + j][l] + prior_k;
          continue;
        }
        for (int64_t i = j; i < d; ++i) {
          dGbk[j * d + i] = dGbk[i * d + j] = dk[k * ddp + j * d + i][l] + (i == j ? prior_k : T(0));
        }
      }
    }
  }
}

// The backward pass for one tile, v[k] = sum_i exp(e_i - s) <A, M_i> (-2/rho^2) (M_i (z - c_i))_k with s the
// forward's scale (so no running maximum), plus the lam term's -2 tau z_k lam exp(e0 - s) tr(A).
template <typename T, int Bytes>
PYGEO_INLINE void vjp_tile(const Problem<T>& p, TileScratch<T, Bytes>& s, int64_t tile, int64_t B, const T* A,
                           const T* scale, T* v) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int L = Simd<T, Bytes>::lanes;
  const int64_t d = p.d, dd = p.dd, N = p.N;
  const int64_t b0 = tile * L;
  const int count = static_cast<int>(std::min<int64_t>(L, B - b0));
  s.load_points(p, b0, count);
  V s_tile, trace = V{} + T(0);
  for (int l = 0; l < L; ++l) {
    const int64_t b = b0 + (l < count ? l : 0);
    s_tile[l] = scale[b];
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
    const T* M = p.chunk_precisions(i0);
    V coef[kChunk], inner[kChunk];  // exponents, then coefficients; <A, M_c>
    chunk_projections(p, s, p.chunk_centroids(i0), M, coef);
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
  V norm2 = V{} + T(0);
  for (int64_t k = 0; k < d; ++k) norm2 += s.z[k] * s.z[k];
  // lam = 0: zero, not 0 * exp(e0 - s), which overflows where s (the forward's scale) is far below e0.
  const V prior = p.lam > 0 ? T(p.lam) * exp_weight<T, Bytes>(norm2 * T(-p.tau) - s_tile) : V{} + T(0);
  for (int l = 0; l < count; ++l) {
    for (int64_t k = 0; k < d; ++k) v[(b0 + l) * d + k] = s.v[k][l] + T(-2.0 * p.tau) * prior[l] * trace[l] * s.z[k][l];
  }
}

// Each pass for each vector width (common/simd.h).
template <typename T>
void forward_tile_16(const Problem<T>& p, TileScratch<T, 16>& s, int64_t tile, int64_t B, T* G_s, T* scale, T* dG_s) {
  forward_tile<T, 16>(p, s, tile, B, G_s, scale, dG_s);
}
template <typename T>
PYGEO_TARGET_32 void forward_tile_32(const Problem<T>& p, TileScratch<T, 32>& s, int64_t tile, int64_t B, T* G_s,
                                     T* scale, T* dG_s) {
  forward_tile<T, 32>(p, s, tile, B, G_s, scale, dG_s);
}
template <typename T>
PYGEO_TARGET_64 void forward_tile_64(const Problem<T>& p, TileScratch<T, 64>& s, int64_t tile, int64_t B, T* G_s,
                                     T* scale, T* dG_s) {
  forward_tile<T, 64>(p, s, tile, B, G_s, scale, dG_s);
}
template <typename T>
void vjp_tile_16(const Problem<T>& p, TileScratch<T, 16>& s, int64_t tile, int64_t B, const T* A, const T* scale,
                 T* v) {
  vjp_tile<T, 16>(p, s, tile, B, A, scale, v);
}
template <typename T>
PYGEO_TARGET_32 void vjp_tile_32(const Problem<T>& p, TileScratch<T, 32>& s, int64_t tile, int64_t B, const T* A,
                                 const T* scale, T* v) {
  vjp_tile<T, 32>(p, s, tile, B, A, scale, v);
}
template <typename T>
PYGEO_TARGET_64 void vjp_tile_64(const Problem<T>& p, TileScratch<T, 64>& s, int64_t tile, int64_t B, const T* A,
                                 const T* scale, T* v) {
  vjp_tile<T, 64>(p, s, tile, B, A, scale, v);
}

// Runs tile_fn(scratch, tile) over all tiles of B points, one OpenMP thread per tile.
template <int Bytes, typename T, typename TileFn>
void run_tiles(const Problem<T>& p, int64_t B, bool derivative, bool vjp, TileFn tile_fn) {
  const int64_t n_tiles = (B + Simd<T, Bytes>::lanes - 1) / Simd<T, Bytes>::lanes;
#pragma omp parallel if (B * p.N * p.dd >= kParallelWork)
  {
    TileScratch<T, Bytes> s(p, derivative, vjp);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < n_tiles; ++tile) tile_fn(s, tile);
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
  const bool derivative = dG_s != nullptr;
  const int bytes = simd_bytes();
  if (bytes >= 64) {
    run_tiles<64>(p, B, derivative, false, [&](auto& s, int64_t t) { forward_tile_64(p, s, t, B, G_s, scale, dG_s); });
  } else if (bytes >= 32) {
    run_tiles<32>(p, B, derivative, false, [&](auto& s, int64_t t) { forward_tile_32(p, s, t, B, G_s, scale, dG_s); });
  } else {
    run_tiles<16>(p, B, derivative, false, [&](auto& s, int64_t t) { forward_tile_16(p, s, t, B, G_s, scale, dG_s); });
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
  if (bytes >= 64) {
    run_tiles<64>(p, B, false, true, [&](auto& s, int64_t t) { vjp_tile_64(p, s, t, B, A, scale, v); });
  } else if (bytes >= 32) {
    run_tiles<32>(p, B, false, true, [&](auto& s, int64_t t) { vjp_tile_32(p, s, t, B, A, scale, v); });
  } else {
    run_tiles<16>(p, B, false, true, [&](auto& s, int64_t t) { vjp_tile_16(p, s, t, B, A, scale, v); });
  }
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
